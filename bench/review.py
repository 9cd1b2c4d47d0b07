"""The review page at scale: an audit of N suspects (default 10,000, each a distinct generated photo),
served by `python -m imgclf.review`, opened in headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium). Measures the time from opening the page to the first suspect on screen, and from a
key press (→ and x) to the next suspect on screen, thumbnails made on the fly (a cold cache). The aims:
under 2 s to open, moves without waiting.

    python bench/review.py [--suspects 10000] [--moves 30]      # JSON in bench/results/review.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def make_project(root: Path, count: int) -> None:
    """data/raw with ``count`` photos (640x480 JPEGs), and the audit's suspects.json naming all of them."""
    rng = np.random.default_rng(0)
    paths = []
    base = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        path = f"{label}/img_{i:05d}.jpg"
        (root / "data/raw" / label).mkdir(parents=True, exist_ok=True)
        image = np.roll(base, i * 7, axis=1)
        Image.fromarray(image).save(root / "data/raw" / path, quality=85)
        paths.append(path)
    suspects = [{"path": p, "split": "train", "given": p.split("/")[0], "suggested": CLASSES[(i + 1) % 5],
                 "score": round(i / count, 6), "top": [[CLASSES[(i + 1) % 5], 0.8], [CLASSES[i % 5], 0.1],
                                                       [CLASSES[(i + 2) % 5], 0.05]],
                 "like_given": paths[(i + 5) % count:(i + 5) % count + 4],
                 "like_suggested": paths[(i + 6) % count:(i + 6) % count + 4]} for i, p in enumerate(paths)]
    (root / "reports/audit").mkdir(parents=True)
    (root / "reports/audit/suspects.json").write_text(json.dumps({"classes": CLASSES, "suspects": suspects}))
    (root / "reports/audit/cross_split_copies.csv").write_text("path_a,split_a,path_b,split_b,similarity\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", path="photos")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "corrections.csv").write_text("path,action,label\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(profile: Path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))


def shown_when(driver, path: str, started: float, timeout: float = 30) -> float:
    """Seconds from ``started`` until ``path`` is the suspect on screen with its photo loaded."""
    script = ("return document.getElementById('path').textContent === arguments[0] && "
              "document.getElementById('photo').complete;")
    while not driver.execute_script(script, path):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{path} not shown after {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suspects", type=int, default=10_000)
    parser.add_argument("--moves", type=int, default=30)
    args = parser.parse_args()
    from selenium.webdriver.common.action_chains import ActionChains

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        started = time.perf_counter()
        make_project(root, args.suspects)
        print(f"made {args.suspects:,} photos and their audit in {time.perf_counter() - started:.0f} s")
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLF_CACHE_DIR": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "imgclf.review", "--port", str(port)], cwd=root, env=env)
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        start_s = time.perf_counter() - started
        driver = browser(Path(tmp) / "chromium")
        try:
            suspects = json.loads((root / "reports/audit/suspects.json").read_text())["suspects"]
            started = time.perf_counter()
            driver.get(f"http://127.0.0.1:{port}/")
            open_s = shown_when(driver, suspects[0]["path"], started)
            moves = []
            for i in range(1, args.moves + 1):
                key = "x" if i % 3 == 0 else "\ue014"  # every third a decision (saved, then the next), else →
                started = time.perf_counter()
                ActionChains(driver).send_keys(key).perform()
                moves.append(shown_when(driver, suspects[i]["path"], started))
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=30)
    result = {"suspects": args.suspects, "server_start_s": round(start_s, 2), "page_open_s": round(open_s, 3),
              "move_median_s": round(statistics.median(moves), 3), "move_max_s": round(max(moves), 3),
              "moves": len(moves)}
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "review.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
