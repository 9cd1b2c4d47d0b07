"""`python -m imgclf.review` in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) against the real server on a tiny audited project: the keys, the rows they
write, undo, memory across a restart, what the server answers to a traversal, where it listens, and
`dvc repro split` applying the decisions. Fails, never skips, when the browser is missing."""
import csv
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, answers, clean_env, dvc, free_port, make_folder, make_project, stop, tiny_params, wait_until

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("review")
    photos = make_folder(base / "photos", classes=3, per_class=12)
    for i in range(3):  # a few wrong labels for the audit to find
        shutil.move(photos / "class_0" / f"img_{i:03d}.jpg", photos / "class_1" / f"moved_{i}.jpg")
    root = make_project(base / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    dvc(root, "repro", "audit")
    return root


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), \
        "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def start_review(root: Path, port: int) -> subprocess.Popen:
    log = (root / "review.log").open("a")
    server = subprocess.Popen([sys.executable, "-m", "imgclf.review", "--port", str(port)], cwd=root,
                              env=clean_env(PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/"), "the review page", server, timeout=60)
    return server


def corrections(root: Path) -> dict[str, list[str]]:
    with (root / "corrections.csv").open(newline="") as fh:
        return {row[0]: row[1:] for row in list(csv.reader(fh))[1:]}


def kept(root: Path) -> set[str]:
    memory = root / "reviewed.csv"
    return {row["path"] for row in csv.DictReader(memory.open())} if memory.exists() else set()


def shown(driver) -> str:
    return driver.find_element("id", "path").text


def press(driver, key: str, then, what: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    deadline = time.time() + 20
    while not then():
        assert time.time() < deadline, f"after pressing {key!r}: {what}"
        time.sleep(0.1)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_keys_write_corrections_undo_and_remember_across_a_restart(project, browser):
    suspects = json.loads((project / "reports/audit/suspects.json").read_text())["suspects"]
    assert len(suspects) >= 4, "the tiny audit should flag a few photos"
    classes = json.loads((project / "reports/audit/suspects.json").read_text())["classes"]
    (project / "corrections.csv").write_text("path,action,label\n")
    port = free_port()
    server = start_review(project, port)
    try:
        assert {c.laddr.ip for c in psutil.Process(server.pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}
        for url in ("/image/../../etc/passwd", "/image/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
                    f"/data/raw/{suspects[0]['path']}", "/image/99999/large", "/..%2fparams.yaml"):
            assert status(f"http://127.0.0.1:{port}{url}") == 404, url

        browser.get(f"http://127.0.0.1:{port}/")
        wait_until(lambda: shown(browser) == suspects[0]["path"], "the first suspect", timeout=30)
        first, second, third, fourth = (s["path"] for s in suspects[:4])
        # each key decides the photo on screen: the next key waits until the page shows the next one
        press(browser, "x", lambda: corrections(project).get(first) == ["exclude", "", "photos"]
              and shown(browser) == second, "an exclude row, and on to the next suspect")
        press(browser, "s", lambda: corrections(project).get(second) == ["relabel", suspects[1]["suggested"], "photos"]
              and shown(browser) == third, "a relabel row to the suggested class")
        other = next(i for i, c in enumerate(classes) if c != suspects[2]["given"])
        press(browser, str(other + 1), lambda: corrections(project).get(third) == ["relabel", classes[other], "photos"]
              and shown(browser) == fourth, f"a relabel row to class {other + 1}")
        press(browser, "k", lambda: fourth in kept(project), "the photo remembered as right")
        assert fourth not in corrections(project)
        press(browser, "u", lambda: fourth not in kept(project) and shown(browser) == fourth, "the keep undone")
        press(browser, "\ue012", lambda: shown(browser) == third, "back one without deciding")
        press(browser, "\ue014", lambda: shown(browser) == fourth, "forward one without deciding")
        assert browser.find_element("id", "counter").text == f"reviewed 3 of {len(suspects)}"
        assert list(corrections(project)) == [first, second, third]  # one row per photo, in decision order
        press(browser, "k", lambda: fourth in kept(project) and (len(suspects) == 4 or shown(browser) != fourth),
              "kept again")
        browser.save_screenshot(str(project / "review.png"))
    finally:
        stop(server)

    server = start_review(project, port)  # a restart: the decisions are still there
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        fifth = suspects[4]["path"] if len(suspects) > 4 else fourth
        wait_until(lambda: shown(browser) == fifth, "the first suspect nobody decided", timeout=30)
        assert browser.find_element("id", "counter").text == f"reviewed 4 of {len(suspects)}"
        press(browser, "\ue012", lambda: shown(browser) == fourth, "back to the kept photo")
        assert browser.find_element("id", "decision").text == "kept: the label is right"
    finally:
        stop(server)

    done = dvc(project, "repro", "split")  # the decisions apply as any corrections do
    summary = json.loads((project / "reports/split/summary.json").read_text())["corrections"]
    assert (summary["excluded"], summary["relabelled"]) == (1, 2), done.stdout
