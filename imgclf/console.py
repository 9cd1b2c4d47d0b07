"""What a stage prints: one short line of its own by default (what it made, its headline numbers,
its time), a ``warning:`` line when something needs attention, an ``error:`` line when it fails.

``IMGCLF_VERBOSE=1`` brings back everything the libraries print, for debugging: TensorFlow's and
LiteRT's C++ log, MLflow's INFO lines and progress bars, Keras' epoch lines. By default those are
turned down before TensorFlow or MLflow is imported (:func:`quiet_libraries`, run by the package's
``__init__``). Details stay in ``reports/<stage>/`` and MLflow either way.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

VERBOSE_ENV = "IMGCLF_VERBOSE"
# Native log lines in absl's format (I1206 14:01:19.808487  5863 port.cc:153] ..., or I0000 00:00:<epoch>...
# before absl is set up), absl's note about that, and LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate".
NATIVE_NOISE = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |INFO: |"
                          r"WARNING: All log messages before absl::InitializeLog\(\) is called)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_libraries() -> None:
    """Turn the libraries' own output down, unless ``IMGCLF_VERBOSE`` is set. Must run before
    TensorFlow and MLflow are imported: they read these settings once, on import."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also hides cuInit's error on a machine without GPU
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not any(isinstance(finder, _FilteredImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FilteredImport("tensorflow"))


@contextlib.contextmanager
def native_log_filtered() -> Iterator[None]:
    """Run a block with file descriptor 2 caught in a file, then pass on every line but native log
    noise (:data:`NATIVE_NOISE`). For the C++ code that logs whatever TF_CPP_MIN_LOG_LEVEL says:
    TensorFlow's import and LiteRT's first interpreter. Does nothing when verbose."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _FilteredImport(importlib.abc.MetaPathFinder):
    """Imports one package (TensorFlow) inside :func:`native_log_filtered`: it logs several lines
    on import that no environment variable turns off (tensorflow/tensorflow#100442)."""

    def __init__(self, name: str):
        self.name = name
        self.finding = False

    def find_spec(self, fullname, path, target=None):
        # a library may only ask whether TensorFlow is there (importlib.util.find_spec) long before
        # importing it: stay in place until it is imported
        if fullname != self.name or self.finding:
            return None
        self.finding = True  # the real finders answer the look-up below
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader, self)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader, finder: _FilteredImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # the package's own loader, after
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)  # imported once: nothing more to filter
        with native_log_filtered():
            self.loader.exec_module(module)


def count(n: int, noun: str, plural: str = "") -> str:
    """``3,666 images``, ``1 image``, ``5 classes``."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def seconds(value: float) -> str:
    """``0.4 s``, ``12 s``, ``9 min 05 s``."""
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s"


def warn(message: str) -> None:
    """A line of its own on stderr, for something the user should look at."""
    print(f"warning: {message}", file=sys.stderr)
