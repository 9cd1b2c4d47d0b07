"""Grad-CAM in two steps, so it works on nested Keras 3 backbones.

The usual recipe (``model.get_layer(...).output`` into a new Model) fails when the last
convolutional feature map lives inside a nested backbone. Our models are linear chains at
the top level, so we run the layers up to the last 4-D output (the backbone, or the last
conv block of the baseline), watch that feature map under the tape, then run the head.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .inference import GPU_BATCH, gpu_visible

# Run layer by layer, the backbone keeps every intermediate output of a batch. 12 images of the
# two-top model at 352 px on 2 cores: 6.7 s one at a time (1.1 GiB peak), 3.3 s four at a time
# (1.6 GiB), 5.3 s all at once (3.1 GiB): past a few images a batch buys only memory.
CPU_BATCH_PIXELS = 4 * 352 * 352


def gradcam_batch_size(image_size: tuple[int, int]) -> int:
    """Images per Grad-CAM step: a few at a time on a CPU (``CPU_BATCH_PIXELS``), a GPU batch on a GPU."""
    if gpu_visible():
        return GPU_BATCH
    return max(1, CPU_BATCH_PIXELS // (image_size[0] * image_size[1]))


def split_at_feature_map(model: keras.Model) -> tuple[list, list]:
    """(layers producing the last 4-D feature map, layers after it)."""
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    index = max(i for i, layer in enumerate(chain) if len(layer.output.shape) == 4)
    return chain[: index + 1], chain[index + 1:]


def _run(layers: list, x):
    for layer in layers:
        x = layer(x, training=False)
    return x


def gradcam(model: keras.Model, images: np.ndarray, class_indices: np.ndarray | None = None,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps in [0, 1] at the input size, and the model's probabilities.

    ``class_indices``: the class explained per image (default: the predicted class).
    ``batch_size``: images per step (default :func:`gradcam_batch_size`).
    """
    body, head = split_at_feature_map(model)
    batch_size = batch_size or gradcam_batch_size(images.shape[1:3])
    heatmaps, probabilities = [], []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start:start + batch_size], dtype=tf.float32)
        features = _run(body, batch)
        with tf.GradientTape() as tape:
            tape.watch(features)
            probs = _run(head, features)
            if class_indices is None:
                chosen = tf.argmax(probs, axis=1, output_type=tf.int32)
            else:
                chosen = tf.convert_to_tensor(class_indices[start:start + batch_size], dtype=tf.int32)
            score = tf.gather(probs, chosen, axis=1, batch_dims=1)
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
        heatmaps.append(tf.clip_by_value(cam, 0.0, 1.0).numpy())
        probabilities.append(probs.numpy())
    return np.concatenate(heatmaps), np.concatenate(probabilities)


def pick_examples(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, count: int) -> np.ndarray:
    """Half confidently right, half confidently wrong (fewer wrong if there are fewer)."""
    right = np.flatnonzero(predicted == labels)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: count // 2]
    right = right[np.argsort(-confidence[right], kind="stable")]
    # spread the correct ones across confidence levels rather than only the easiest
    if len(right) > count - len(wrong):
        right = right[np.linspace(0, len(right) - 1, count - len(wrong)).astype(int)]
    return np.concatenate([right, wrong]).astype(int)
