"""What a stage prints: TensorFlow's and LiteRT's native log lines filtered out by default and
kept with IMGCLF_VERBOSE=1, and the small formatting helpers of the stage lines."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from imgclf import console

NATIVE = ("I0000 00:00:1796565896.068026    6583 port.cc:153] oneDNN custom operations are on.\n"
          "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          "E1206 14:01:19.808487    5863 cuda_platform.cc:52] failed call to cuInit\n"
          "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")


def write_from_c(verbose: str) -> subprocess.CompletedProcess:
    """Native lines and one real message written straight to file descriptor 2 inside the filter."""
    code = ("import os\nfrom imgclf import console\nwith console.native_log_filtered():\n"
            f"    os.write(2, {NATIVE!r}.encode() + b'a real message\\n')\n")
    env = {**os.environ, console.VERBOSE_ENV: verbose}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_native_log_lines_are_filtered_and_other_output_kept():
    assert write_from_c("").stderr == "a real message\n"


def test_verbose_keeps_every_native_line():
    assert write_from_c("1").stderr == NATIVE + "a real message\n"


def test_importing_tensorflow_through_the_package_prints_nothing():
    """Also after a library has only asked whether TensorFlow is there (as TFDS does)."""
    code = ("import importlib.util\nimport imgclf\nassert importlib.util.find_spec('tensorflow')\n"
            "import tensorflow_datasets\nimport tensorflow as tf\nprint(float(tf.constant(1.0) + 1))\n")
    env = {k: v for k, v in os.environ.items() if k not in (console.VERBOSE_ENV, "TF_CPP_MIN_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout, done.stderr) == ("2.0\n", "")


@pytest.mark.parametrize("value,text", [(0.42, "0.4 s"), (12.4, "12 s"), (545, "9 min 05 s")])
def test_seconds(value, text):
    assert console.seconds(value) == text


def test_counts_have_thousands_separators_and_plurals():
    assert console.count(3666, "image") == "3,666 images"
    assert console.count(1, "class", "classes") == "1 class"
    assert console.count(5, "class", "classes") == "5 classes"
