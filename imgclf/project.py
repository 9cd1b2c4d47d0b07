"""Where the project's files live. DVC runs every stage from the project root."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import console
from .concurrency import forbid_fork
from .errors import StageError


def project_root() -> Path:
    """The working directory. Not DVC_ROOT: queued experiments inherit the main workspace's
    DVC_ROOT while they run in a temporary copy."""
    return Path.cwd().resolve()


@dataclass(frozen=True)
class Layout:
    """Output paths of every stage, relative to one root (mirrors dvc.yaml)."""

    root: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    def store(self, name: str) -> Path:
        """The decoded images at one input size (``baseline`` or ``transfer``), per split."""
        return self.root / "data" / "store" / name

    def model_store(self, model: str) -> Path:
        """The store holding images at a model's input size: the baseline's own, else the transfer one."""
        return self.store("baseline" if model == "baseline" else "transfer")

    @property
    def activations(self) -> Path:
        """The frozen backbone bottom's outputs for the train and val images, and that backbone."""
        return self.root / "data" / "activations"

    @property
    def features(self) -> Path:
        """The backbone's pooled features of every split, beside the activations they came from
        (``imgclf.train.activations.FEATURES``): a store the audit reads without TensorFlow."""
        return self.activations / "features"

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary folder under data/ (on the data's disk, not a RAM-backed /tmp), removed after."""
        folder = self.root / "data"
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=folder) as tmp:
            yield Path(tmp)

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.keras"

    @property
    def headline_metrics(self) -> Path:
        """The one DVC metrics file: what `dvc exp show` and `dvc metrics diff` compare."""
        return self.root / "metrics" / "evaluate.json"

    def summary(self, stage: str) -> Path:
        """Every number a stage measured (also in MLflow); not a DVC metric, to keep tables short."""
        return self.reports(stage) / "summary.json"

    def plots(self, stage: str) -> Path:
        return self.root / "plots" / stage

    def reports(self, stage: str) -> Path:
        return self.root / "reports" / stage


CACHE_ENV = "IMGCLF_CACHE_DIR"


def user_cache(kind: str) -> Path:
    """A folder of this user's cache, outside DVC's outputs (converted models, thumbnails):
    ``$IMGCLF_CACHE_DIR/<kind>``, else ``$XDG_CACHE_HOME/imgclf/<kind>`` or ``~/.cache/imgclf/<kind>``."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgclf"
    return Path(base) / kind


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """``rows`` as CSV with ``columns`` (other keys ignored), written atomically."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc at two arenas for this process. By default it opens up to 8 per core
    for the threads tf.data and LiteRT start, and batches freed across them stay resident: a
    second pass over 2,250 images at 288 px grew the process by 0.6 GiB, by 0.1 GiB with two
    arenas, at the same speed. Does nothing where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


STAGE_TIME_LIMIT_ENV = "IMGCLF_STAGE_TIME_LIMIT"


def limit_stage_time() -> None:
    """Past ``IMGCLF_STAGE_TIME_LIMIT`` seconds, dump every thread's stack to stderr and exit 1:
    faulthandler's watchdog is a C thread, so it fires even when the main thread is stuck in C."""
    import faulthandler

    raw = os.environ.get(STAGE_TIME_LIMIT_ENV, "").strip()
    if not raw:
        return
    try:
        seconds = float(raw)
    except ValueError:
        raise StageError(f"{STAGE_TIME_LIMIT_ENV}={raw!r}: not a number of seconds") from None
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True)


def run_stage(main: Callable[[], str | None]) -> None:
    """Run a stage's main() and print the one line it returns with its time (:mod:`imgclf.console`);
    an expected failure (:class:`StageError`, or a missing input file)
    ends it with one clear line and exit status 1. SIGTERM (``kill``, a scheduler stopping the
    job) ends it as Ctrl-C does: its MLflow run closed as KILLED, exit status 130. Memory:
    :func:`limit_malloc_arenas`. Cores: threads only, never a fork (:mod:`imgclf.concurrency`).
    A stage that runs longer than ``IMGCLF_STAGE_TIME_LIMIT`` seconds, when set, prints every
    thread's stack and exits with status 1 instead of hanging (the slow tests set it)."""
    limit_malloc_arenas()
    forbid_fork()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    try:
        limit_stage_time()
        line = main()
    except (StageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"error: stopped by {err or 'SIGINT'}", file=sys.stderr)
        sys.exit(130)
    if line:
        print(f"{line} ({console.seconds(time.perf_counter() - started)})", flush=True)
