"""Temperature scaling: confidences that match accuracy, folded into the model's weights.

One scalar T is fitted on the validation split (the T that minimises the negative
log-likelihood of ``softmax(logits / T)``) and folded into the last Dense layer
(``W / T``, ``b / T``): no new layer, the same saved-model format, the same argmax, so
accuracy does not change. Label smoothing leaves models under-confident (T < 1 sharpens).
An ensemble (the mean of several members' probabilities) gets one T, fitted on that mean and folded
into every member's last layer.
"""
from __future__ import annotations

import keras
import numpy as np

from ..data.datasets import Examples, batches
from ..serve.evaluation import expected_calibration_error, softmax
from ..serve.inference import ensemble_members, inference_batch_size


def nll(logits: np.ndarray | list[np.ndarray], labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)``; given a list of members' logits, of
    the mean of their softmaxes (an ensemble)."""
    if isinstance(logits, list):
        if len(logits) > 1:
            probs = np.mean([softmax(z / temperature) for z in logits], axis=0)
            return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None)).mean())
        logits = logits[0]
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float((log_norm - shifted[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray | list[np.ndarray], labels: np.ndarray, low: float = 0.05,
                    high: float = 20.0) -> float:
    """The T in [low, high] minimising the NLL. The NLL is convex in 1/T (for one model), so a
    golden-section search over 1/T finds the minimum."""
    logits = [z.astype(np.float64) for z in logits] if isinstance(logits, list) else logits.astype(np.float64)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = 1 / high, 1 / low  # inverse temperatures
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, 1 / c), nll(logits, labels, 1 / d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, 1 / d)
    return float(2 / (a + b))


def output_layer(model: keras.Model) -> keras.layers.Dense:
    """The softmax Dense layer every model of the pipeline ends with."""
    layer = model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(f"{model.name} does not end with a Dense layer")
    return layer


def logits(model: keras.Model, inputs: Examples) -> np.ndarray:
    """The last layer's pre-softmax outputs for ``inputs`` (whatever the model takes: images,
    cached features or activations), from its input features (one streamed pass)."""
    batch = inference_batch_size(inputs.record_shape)
    features = _pre_logits(model).predict(batches(inputs, batch, labels=False), verbose=0)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in output_layer(model).get_weights())
    return features.astype(np.float64) @ kernel + bias


def _pre_logits(model: keras.Model) -> keras.Model:
    """``model`` without its last layer. Our models are chains of layers; they are called again
    on a new input because a model that shares its layers with another (fine-tuning's top
    classifier) cannot be cut at ``layer.input``, which belongs to the first model."""
    inputs = keras.Input(model.input.shape[1:])
    x = inputs
    for layer in model.layers[1:-1]:  # after the InputLayer, before the output layer
        x = layer(x, training=False)
    return keras.Model(inputs, x)


def fold_temperature(model: keras.Model, temperature: float) -> None:
    """Divide the last layer's weights by ``temperature`` (1 / temperature undoes it); in an
    ensemble, every member's."""
    for member in ensemble_members(model):
        layer = output_layer(member)
        layer.set_weights([w / temperature for w in layer.get_weights()])


def probabilities(member_logits: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """What a model (one member) or an ensemble (the mean) serves for these logits at ``temperature``."""
    return np.mean([softmax(z / temperature) for z in member_logits], axis=0)


def calibrate(model: keras.Model, val: Examples, bins: int = 10) -> dict[str, float]:
    """Fit T on the validation examples, fold it into ``model`` (every member of an ensemble);
    return T and the validation NLL and ECE before and after."""
    z = [logits(member, val) for member in ensemble_members(model)]
    temperature = fit_temperature(z, val.labels)
    fold_temperature(model, temperature)
    before, after = probabilities(z), probabilities(z, temperature)
    return {"temperature": round(temperature, 6),
            "val_nll_uncalibrated": round(nll(z, val.labels, 1.0), 6),
            "val_nll_calibrated": round(nll(z, val.labels, temperature), 6),
            "val_ece_uncalibrated": round(expected_calibration_error(before, val.labels, bins), 6),
            "val_ece_calibrated": round(expected_calibration_error(after, val.labels, bins), 6)}
