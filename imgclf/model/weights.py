"""The backbones' ImageNet weights files in Keras' cache, read without importing TensorFlow or Keras:
the weights stage checks a cached file in a second, and builds the backbone (which downloads a
missing file) only when it must."""
from __future__ import annotations

import os
from pathlib import Path

from ..params import ModelParams

# MobileNetV2 has ImageNet weights for these input sizes; at any other size Keras loads the 224 px ones
MOBILENETV2_WEIGHT_SIZES = (96, 128, 160, 192, 224)


def keras_cache() -> Path:
    """Where Keras looks for a weights file before downloading it: ``$KERAS_HOME/models``, else
    ``~/.keras/models`` (``/tmp/.keras/models`` where the home folder cannot be written)."""
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"]) / "models"
    home = Path.home() / ".keras"
    if not os.access(home if home.exists() else home.parent, os.W_OK):
        home = Path("/tmp/.keras")
    return home / "models"


def weights_file_name(backbone: str, image_size: int) -> str:
    """The file name Keras gives ``backbone``'s ImageNet weights without the classifier top."""
    if backbone == "mobilenetv2":
        rows = image_size if image_size in MOBILENETV2_WEIGHT_SIZES else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    if backbone == "efficientnetb0":
        return "efficientnetb0_notop.h5"
    if backbone == "resnet50":
        return "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    raise ValueError(f"unknown backbone {backbone!r}")


def file_parameters(path: Path) -> int:
    """The number of values in an HDF5 weights file (every layer's weights, BatchNorm statistics
    included: what ``count_params`` of the built backbone gives). Raises OSError for a file that
    is not a whole HDF5 file."""
    import h5py
    import numpy as np

    total = 0

    def add(_name: str, item) -> None:
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += int(np.prod(item.shape))

    with h5py.File(path, "r") as weights:
        weights.visititems(add)
    return total


def fetch_weights(config: ModelParams) -> dict:
    """Make sure the configured backbone's weights are at hand before any stage trains, so a run
    that cannot get them stops in seconds, not after the baseline's minutes. A readable file in
    Keras' cache is counted as it is; otherwise the backbone is built once, which downloads the
    file (or fails naming it), and counted."""
    info = {"backbone": config.backbone, "weights": config.weights, "image_size": config.image_size}
    if config.weights == "imagenet":
        cached = keras_cache() / weights_file_name(config.backbone, config.image_size)
        try:
            return {**info, "parameters": file_parameters(cached)}
        except OSError:  # absent or damaged: Keras downloads it again
            pass
    from .models import build_backbone

    backbone = build_backbone(config.backbone, config.weights, config.image_size)
    return {**info, "parameters": int(backbone.count_params())}
