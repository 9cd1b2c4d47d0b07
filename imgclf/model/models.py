"""Model builders (functional API). Every model takes raw RGB pixels in 0..255.

Top-level models are linear chains of layers, which Grad-CAM relies on:
``image -> preprocessing -> backbone -> avg_pool -> head_dropout -> [head_hidden] -> predictions``,
or for an ensemble of fine-tuned tops
``image -> preprocessing -> backbone_bottom -> ensemble (members' probabilities averaged)``.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from ..network import RETRY_DELAYS, with_retries
from ..params import BaselineParams, ModelParams

BACKBONE_LAYER = "backbone"
POOL_LAYER = "avg_pool"
OUTPUT_LAYER = "predictions"
ENSEMBLE_LAYER = "ensemble"
# ImageNet channel means in BGR order (caffe-style preprocessing of ResNet50).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(x, backbone: str):
    """The backbone's own input scaling, as standard Keras layers (so saved models load in
    safe mode with plain ``keras.models.load_model``, without this package)."""
    if backbone == "mobilenetv2":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(x)
    if backbone == "resnet50":
        # Caffe style, as ResNet50's ImageNet weights expect: RGB -> BGR minus the ImageNet mean,
        # written as a frozen Dense map on the channel axis (exact: each output is one input
        # times 1 plus the bias).
        layer = layers.Dense(3, trainable=False, name="preprocessing")
        x = layer(x)
        layer.set_weights([np.eye(3, dtype="float32")[::-1], -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")])
        return x
    if backbone == "efficientnetb0":
        return x  # EfficientNet rescales and normalises 0..255 input itself
    raise ValueError(f"unknown backbone {backbone!r}")


_APPLICATIONS = {"efficientnetb0": "EfficientNetB0", "mobilenetv2": "MobileNetV2", "resnet50": "ResNet50"}


def build_backbone(backbone: str, weights: str, image_size: int) -> keras.Model:
    """A Keras application without its top. ImageNet weights come from Keras' cache
    (``~/.keras/models``) or are downloaded once; failing that, a NetworkError names the
    file and the offline way."""
    if backbone not in _APPLICATIONS:
        raise ValueError(f"unknown backbone {backbone!r}")
    application = getattr(keras.applications, _APPLICATIONS[backbone])

    def build() -> keras.Model:
        try:
            with warnings.catch_warnings():  # MobileNetV2 at sizes it has no weights for: its 224 px ones, as meant
                warnings.filterwarnings("ignore", message=".*will be loaded as the default", category=UserWarning)
                return application(include_top=False, weights=None if weights == "none" else weights,
                                   input_shape=(image_size, image_size, 3))
        except Exception as err:  # Keras reports a failed download as a bare Exception
            if "URL fetch failure" in str(err):
                raise ConnectionError(str(err)) from None
            raise

    try:
        model = build()
    except ConnectionError as err:  # the first try names the file; two more tries, then one line
        match = re.search(r"URL fetch failure on (\S+?): ", str(err))
        file = match.group(1).rsplit("/", 1)[-1] if match else f"the {backbone} ImageNet weights file"
        cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
        model = with_retries(build, f"the ImageNet weights of {backbone} ({file})",
                             f"Offline: copy {file} into {cache}/ (Keras looks there before downloading), "
                             "or set model.weights: none to start from random weights",
                             delays=RETRY_DELAYS[1:], tried_before=1)  # 3 attempts in all
    model.name = BACKBONE_LAYER
    return model


def _head(x, config: ModelParams, num_classes: int):
    x = layers.Dropout(config.dropout, name="head_dropout")(x)
    if config.hidden_units:
        x = layers.Dense(config.hidden_units, activation="relu", name="head_hidden")(x)
        x = layers.Dropout(config.dropout, name="head_hidden_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name=OUTPUT_LAYER)(x)


def build_transfer_model(config: ModelParams, num_classes: int, backbone: keras.Model | None = None
                         ) -> keras.Model:
    """Frozen backbone (built from ``config``, or the given one) plus a fresh classification head."""
    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    x = preprocess(inputs, config.backbone)
    if backbone is None:
        backbone = build_backbone(config.backbone, config.weights, config.image_size)
    backbone.trainable = False
    x = backbone(x, training=False)  # BatchNorm stays in inference mode, also when fine-tuning
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    return keras.Model(inputs, _head(x, config, num_classes), name=f"{config.backbone}_classifier")


def image_extractor(backbone_name: str, bottom: keras.Model, image_size: int) -> keras.Model:
    """Raw image -> the backbone's preprocessing -> its frozen bottom (what the activations
    stage runs once per image)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    return keras.Model(inputs, bottom(preprocess(inputs, backbone_name), training=False), name="bottom_extractor")


def pooled_top(top: keras.Model) -> keras.Model:
    """Bottom activations -> the (frozen) backbone top -> global average pooling: the head's
    features, computed from cached activations instead of a second pass over the images."""
    inputs = keras.Input(top.input.shape[1:], name="activations")
    pooled = layers.GlobalAveragePooling2D(name=POOL_LAYER)(top(inputs, training=False))
    return keras.Model(inputs, pooled, name="pooled_top")


def build_head_model(feature_dim: int, config: ModelParams, num_classes: int) -> keras.Model:
    """The head alone, on cached features; its layers share names with the full model's head."""
    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, _head(inputs, config, num_classes), name="head")


def copy_head_weights(source: keras.Model, target: keras.Model) -> None:
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def build_baseline(config: BaselineParams, num_classes: int, synchronized_bn: bool = False) -> keras.Model:
    """A small CNN from scratch: [conv-BN-ReLU x convs_per_block, max-pool] per filter count,
    global average pooling, dropout, softmax. The first convolution has stride ``stem_stride``
    (2: a larger input for the cost of a smaller one). With ``separable`` every block after
    the first uses depthwise-separable convolutions (several times fewer multiply-adds).
    ``synchronized_bn``: batch statistics over the global batch of every worker (multi-worker
    training), so all workers keep the same moving statistics."""
    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255, name="preprocessing")(inputs)
    for i, filters in enumerate(config.filters):
        conv = layers.SeparableConv2D if config.separable and i > 0 else layers.Conv2D
        for j in range(config.convs_per_block):
            stride = config.stem_stride if i == j == 0 else 1
            x = conv(filters, 3, strides=stride, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            # momentum 0.9: with ~100 steps per epoch the default 0.99 leaves the moving
            # statistics (used for validation) lagging for several epochs
            x = layers.BatchNormalization(momentum=0.9, synchronized=synchronized_bn, name=f"block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"block{i}_relu{j}")(x)
        if i < len(config.filters) - 1:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    x = layers.Dropout(config.dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def find_backbone(model: keras.Model) -> keras.Model:
    layer = model.get_layer(BACKBONE_LAYER)
    if not isinstance(layer, keras.Model):
        raise ValueError(f"{model.name} has no nested backbone model")
    return layer


def split_backbone(backbone: keras.Model, count: int) -> tuple[keras.Model, keras.Model, int]:
    """Split the backbone below its top ``count`` layers: (bottom, top, index of top's first layer).

    The cut moves down to the nearest point that no skip connection crosses (a block
    boundary), so ``top(bottom(x)) == backbone(x)`` and top shares the backbone's layers.
    """
    layer_list = backbone.layers
    start = min(max(len(layer_list) - count, 1), len(layer_list) - 1)
    for index in range(start, 0, -1):
        try:
            bottom, top = split_at(backbone, index)
        except ValueError:  # a skip connection from below the cut: not separable here
            continue
        return bottom, top, index
    raise ValueError(f"cannot split backbone {backbone.name} below its top {count} layers")


def split_at(backbone: keras.Model, index: int) -> tuple[keras.Model, keras.Model]:
    """(bottom, top) of ``backbone`` cut at the input of layer ``index``; ValueError where a
    skip connection crosses that point."""
    tensor = backbone.layers[index].input
    if isinstance(tensor, (list, tuple)):
        raise ValueError(f"layer {index} of {backbone.name} has several inputs")
    top = keras.Model(tensor, backbone.output, name="backbone_top")
    return keras.Model(backbone.input, tensor, name="backbone_bottom"), top


def unfreeze_from(model: keras.Model, first: int) -> int:
    """Backbone layers from index ``first`` on become trainable, BatchNormalization excepted
    (frozen BN layers run in inference mode). Returns the number of trainable layers with
    weights. Recompile the model afterwards."""
    backbone = find_backbone(model)
    backbone.trainable = True
    trainable = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= first and not isinstance(layer, layers.BatchNormalization)
        trainable += layer.trainable and bool(layer.weights)
    return trainable


def bottom_extractor(model: keras.Model, bottom: keras.Model) -> keras.Model:
    """Raw image -> preprocessing -> frozen bottom of the backbone (shared layers)."""
    inputs = keras.Input(model.input.shape[1:], name="image")
    x = inputs
    if "preprocessing" in [layer.name for layer in model.layers]:
        x = model.get_layer("preprocessing")(x)
    return keras.Model(inputs, bottom(x, training=False), name="bottom_extractor")


def top_classifier(model: keras.Model, top: keras.Model) -> keras.Model:
    """Cached bottom activations -> trainable backbone top -> pooling -> the model's head.

    Shares every layer with ``model``: training this trains the full model."""
    inputs = keras.Input(top.input.shape[1:], name="activations")
    x = top(inputs, training=False)
    names = [layer.name for layer in model.layers]
    for layer in model.layers[names.index(POOL_LAYER):]:
        x = layer(x)
    return keras.Model(inputs, x, name="top_classifier")


def copy_of(model: keras.Model, name: str) -> keras.Model:
    """A copy of ``model`` with layers (and weights) of its own."""
    copy = keras.models.clone_model(model, recursive=True)
    copy.set_weights(model.get_weights())
    copy.name = name
    return copy


def build_ensemble(model: keras.Model, bottom: keras.Model, members: list[keras.Model]) -> keras.Model:
    """One image model serving several fine-tuned tops: ``model``'s preprocessing, the frozen
    ``bottom`` of its backbone once, and the mean of the ``members``' probabilities (each member
    takes the bottom's activations, as :func:`top_classifier` does)."""
    activations = keras.Input(bottom.output.shape[1:], name="activations")
    mean = layers.Average(name="mean_probabilities")([member(activations) for member in members])
    ensemble = keras.Model(activations, mean, name=ENSEMBLE_LAYER)
    inputs = keras.Input(model.input.shape[1:], name="image")
    x = inputs
    if "preprocessing" in [layer.name for layer in model.layers]:
        x = model.get_layer("preprocessing")(x)
    return keras.Model(inputs, ensemble(bottom(x, training=False)), name=f"{model.name}_ensemble")


def count_params(model: keras.Model) -> dict[str, int]:
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    return {"params_total": total, "params_trainable": trainable}
