"""Shared test helpers: generated image folders, throw-away DVC projects, free loopback ports,
servers started and stopped, and the test programs run as subprocesses (tests/programs/)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml
from PIL import Image

from imgclf.project import STAGE_TIME_LIMIT_ENV

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "tests" / "programs"
PROJECT_FILES = ["imgclf", "stages", "params.yaml", "dvc.yaml", "inputs", ".gitignore", ".dvcignore"]
# Past this a whole command (a dvc repro of a tiny project) has hung: fail with its output instead of
# waiting for CI's time-out. Each stage's own limit (IMGCLF_STAGE_TIME_LIMIT) usually fires first.
COMMAND_TIMEOUT_S = 1800
COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 200, 40), (200, 40, 200)]


def make_image(seed: int, color: tuple[int, int, int], size: int = 48) -> np.ndarray:
    """A noisy image whose dominant colour (the class) is learnable in a few steps."""
    rng = np.random.default_rng(seed)
    base = np.array(color, dtype=np.int16) + rng.integers(-40, 40, (size, size, 3))
    y, x = rng.integers(0, size - 12, 2)
    base[y:y + 12, x:x + 12] = rng.integers(0, 255, 3)  # a random blob: every image is unique
    return base.clip(0, 255).astype(np.uint8)


def make_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 48, seed: int = 0) -> Path:
    """``root/<class>/<n>.jpg`` with ``per_class`` distinct images per class."""
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = make_image(seed * 100_000 + c * 1000 + i, COLORS[c % len(COLORS)], size)
            Image.fromarray(image).save(folder / f"img_{i:03d}.jpg", quality=95)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "photos")


def tiny_params(**sections) -> dict:
    """The committed params.yaml with quick settings, overridden per section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(backbone="mobilenetv2", weights="none", image_size=32)
    params["baseline"].update(image_size=32, epochs=1, filters=[8, 16])
    params["head"].update(epochs=1)
    params["finetune"].update(epochs=1, unfreeze_layers=5, members=1)  # tests of members set them
    params["train"].update(batch_size=8)
    params["gradcam"].update(num_images=4)
    params["evaluate"].update(gallery_size=4)
    for section, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    return params


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    full_env.update(env or {})
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        output = b"".join(part or b"" for part in (err.stdout, err.stderr)).decode(errors="replace")
        raise AssertionError(f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT_S} s:\n{output[-5000:]}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(dest: Path, params: dict) -> Path:
    """A fresh git + DVC repository holding this project's pipeline and ``params``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "corrections.csv").write_text("path,action,label\n")  # the committed one holds tf_flowers' fixes
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")  # the repository's cache settings
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


def dvc(project: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, check=check, env=env)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(check, what: str, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll ``check()`` until it returns true; fail if ``process`` exits or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout} s")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """Terminate ``process`` and wait for it; kill it if it does not stop within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2):
        return True


def clean_env(**extra: str) -> dict:
    """This process's environment without DVC's and MLflow's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(extra)
    return env


@contextmanager
def mlflow_server(backend_uri: str, artifacts: str, log: Path, env: dict | None = None,
                  extra_args: tuple[str, ...] = (), port: int | None = None) -> Iterator[str]:
    """`mlflow server` on ``port`` (a free loopback port if None); yields its URL once it answers,
    stops it after."""
    port = port or free_port()
    with log.open("a") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts, "--workers", "1",
             *extra_args],
            cwd=log.parent, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: answers(f"{url}/health"), "mlflow server", server, timeout=180)
            yield url
        finally:
            stop(server)


def run_program(name: str, *args: str, cwd: Path = ROOT, env: dict | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``tests/programs/<name>`` with the project and the tests importable."""
    full_env = {**(env or os.environ), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, str(PROGRAMS / name), *args], cwd=cwd, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def pytest_configure(config):
    """Models the tests convert for LiteRT go to a cache of this test session, not the user's."""
    import tempfile

    config.litert_cache = tempfile.mkdtemp(prefix="imgclf-test-cache-")
    os.environ["IMGCLF_CACHE_DIR"] = config.litert_cache
    # A stage that stops making progress (a hang) fails with every thread's stack instead of
    # holding the run until CI's time-out; the slowest test stage takes a few minutes
    os.environ.setdefault(STAGE_TIME_LIMIT_ENV, "900")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "litert_cache", ""), ignore_errors=True)


@pytest.fixture
def litert_cache(tmp_path, monkeypatch) -> Path:
    """A cache of converted models of this test alone (the stages it runs inherit it)."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "litert"
