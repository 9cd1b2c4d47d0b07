"""Training under tf.distribute.MirroredStrategy, on two logical CPU devices."""
import pytest

from conftest import run_program


@pytest.mark.slow
def test_training_runs_under_mirrored_strategy_on_two_devices():
    result = run_program("mirrored_training.py")
    assert "MIRRORED-OK 2" in result.stdout, result.stderr[-3000:]
