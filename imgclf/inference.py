"""The one inference path: evaluate, Grad-CAM, `predict` and the export parity check all call
:func:`predict_probs`, and export serves :func:`serving_function`, so every consumer gets
exactly what `evaluate` measured (test-time augmentation included when the model says so)."""
from __future__ import annotations

import keras
import numpy as np

from .datasets import Examples, ImageSet, batches

GPU_BATCH = 64
# On a CPU a batch's first, largest activations should stay in the processor's cache:
# MobileNetV2's frozen bottom at 224 px ran at 50-74 images/s 4 at a time against 29-37 at 64
# (2-core EPYC, 32 MiB L3), while the 96 px baseline is as fast at 16 as at 64.
CPU_BATCH_PIXELS = 4 * 224 * 224


def inference_batch_size(record_shape: tuple[int, ...]) -> int:
    """Batch size of an inference-only pass over records of ``record_shape`` (images, cached
    activations or features). No batch statistics at inference: it cannot change a prediction."""
    import tensorflow as tf

    if len(record_shape) < 3 or tf.config.list_logical_devices("GPU"):
        return GPU_BATCH
    return max(1, min(GPU_BATCH, CPU_BATCH_PIXELS // (record_shape[0] * record_shape[1])))


def serving_function(model: keras.Model, tta: bool):
    """``images (N, H, W, 3) float32 0..255 -> probabilities``; with ``tta`` the mean of the
    predictions for the images and their horizontal mirror images."""
    import tensorflow as tf

    if not tta:
        return lambda images: model(images, training=False)
    return lambda images: (model(images, training=False)
                           + model(tf.reverse(images, axis=[2]), training=False)) / 2


def predict_probs(model: keras.Model, images: np.ndarray | Examples, tta: bool,
                  batch_size: int | None = None) -> np.ndarray:
    """Class probabilities for images in 0..255: an array (uint8 or float) or a set of examples
    (a split of the store), streamed in batches and cast to float32 per batch."""
    if isinstance(images, np.ndarray):
        images = ImageSet(images, np.zeros(len(images), np.int32), [], ["_"])
    if len(images) == 0:
        return np.empty((0, model.output.shape[-1]), np.float32)
    import tensorflow as tf

    ds = batches(images, batch_size or inference_batch_size(images.record_shape), labels=False)
    probs = model.predict(ds, verbose=0)
    if tta:
        mirrored = ds.map(lambda x: tf.reverse(x, axis=[2]))
        probs = (probs + model.predict(mirrored, verbose=0)) / 2
    return probs
