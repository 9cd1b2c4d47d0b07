"""Temperature scaling: recovers a known temperature, lowers the ECE of an over- or
under-confident model, keeps its predictions, and lives in the weights (no new layer)."""
import keras
import numpy as np
import pytest
from conftest import COLORS, make_image, tiny_params

from imgclf.data.datasets import ImageSet
from imgclf.model import models
from imgclf.model.modelio import ModelInfo, load_model, save_model
from imgclf.params import params_from_dict
from imgclf.serve import evaluation
from imgclf.serve.evaluation import expected_calibration_error
from imgclf.train import calibration


def sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): T is the right answer."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    probs = calibration.softmax(logits / temperature)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5])
def test_fitted_temperature_recovers_the_true_one(true_t):
    logits, labels = sampled(true_t)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_calibration_lowers_ece_and_keeps_predictions():
    logits, labels = sampled(0.5)  # an under-confident model, as label smoothing makes them
    fitted = calibration.fit_temperature(logits, labels)
    before, after = calibration.softmax(logits), calibration.softmax(logits / fitted)
    assert expected_calibration_error(after, labels) < 0.02 < expected_calibration_error(before, labels)
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    np.testing.assert_allclose(evaluation.uncalibrated(after, fitted), before, atol=1e-6)


def test_temperature_is_folded_into_the_last_layer_and_survives_saving(tmp_path):
    params = params_from_dict(tiny_params())
    keras.utils.set_random_seed(0)
    model = models.build_baseline(params.baseline, 3)
    images = np.stack([make_image(i, COLORS[i % 3], 32) for i in range(30)])
    labels = np.arange(30) % 3
    val = ImageSet(images, labels, [""] * 30, ["a", "b", "c"])
    x = images.astype(np.float32)
    z = calibration.logits(model, val)
    before = model.predict(x, verbose=0)
    layers_before = len(model.layers)

    fitted = calibration.calibrate(model, val)
    after = model.predict(x, verbose=0)
    t = fitted["temperature"]
    assert len(model.layers) == layers_before
    np.testing.assert_allclose(after, calibration.softmax(z / t), atol=1e-5)
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    assert fitted["val_nll_calibrated"] <= fitted["val_nll_uncalibrated"] + 1e-9

    save_model(model, tmp_path / "m.keras", ModelInfo("baseline", "baseline_cnn", ["a", "b", "c"], 32, False, t))
    reloaded, info = load_model(tmp_path / "m.keras")
    assert info.temperature == t
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), after, atol=1e-6)
    calibration.fold_temperature(reloaded, 1 / info.temperature)  # what finetune does with the head
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), before, atol=1e-5)
