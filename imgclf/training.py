"""Training phases: baseline CNN, frozen-backbone head, fine-tuning.

The frozen bottom of the backbone runs once per image (:func:`compute_activations`, the
activations stage); the head trains on features pooled from those activations through the
frozen top, and fine-tuning trains the top on the same activations. Every pass streams
batches from disk, so memory does not grow with the data.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from . import calibration, distributed, models
from .activations import Activations, compute_outputs
from .augment import augmentation
from .datasets import Examples, batches
from .params import AugmentParams, BaselineParams, FinetuneParams, HeadParams, ModelParams, TrainParams
from .errors import DataError


@dataclass
class TrainResult:
    model: keras.Model  # the full image model
    history: dict[str, list[float]]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    trained: keras.Model | None = None  # the model that trained, on its own inputs (None: ``model``)
    val_inputs: Examples | None = None  # validation examples as ``trained`` takes them

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))

    def summary(self) -> dict[str, float]:
        """Training cost and the numbers of the epoch whose weights were kept (lowest
        val_loss, as the checkpoint restores), not maxima over all epochs."""
        h = self.history
        out = {"train_seconds": round(self.seconds, 2), "epochs_run": self.epochs_run}
        if h.get("val_loss"):
            kept = int(np.argmin(h["val_loss"]))  # first minimum: the checkpoint saves only improvements
            out["best_epoch"] = kept + 1
            for name in ("accuracy", "loss"):
                out[f"train_{name}"] = round(h[name][kept], 6)
                out[f"val_{name}"] = round(h[f"val_{name}"][kept], 6)
        out.update(models.count_params(self.model))
        out.update(self.extra)
        return out


def configure(seed: int, train: TrainParams) -> None:
    """Seed every generator; enable mixed precision only where a GPU can use it. Under
    ``TF_CONFIG`` the multi-worker strategy is created first, as TensorFlow requires."""
    import tensorflow as tf

    distributed.strategy()
    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    policy = "mixed_float16" if train.mixed_precision and gpus else "float32"
    keras.mixed_precision.set_global_policy(policy)


EpochHook = Callable[[int, dict[str, float]], None]  # (0-based epoch, that epoch's logs)


class _Recorder(keras.callbacks.Callback):
    """Per-epoch logs plus the learning rate actually used, passed on to ``on_epoch`` as each
    epoch ends (MLflow shows the curves while the stage trains)."""

    def __init__(self, on_epoch: EpochHook | None = None):
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.on_epoch = on_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        if self.on_epoch:
            self.on_epoch(epoch, logs)


def fit(model: keras.Model, train_set: Examples, val_set: Examples, batch_size: int, epochs: int, patience: int,
        reduce_lr_patience: int = 0, seed: int = 0, augment=None, steps_per_epoch: int | None = None,
        on_epoch: EpochHook | None = None) -> tuple[dict[str, list[float]], float]:
    """Fit on shuffled (and augmented, if asked) batches of ``train_set`` with early stopping on
    val_loss and keep the best epoch's weights. ``steps_per_epoch``: an epoch of that many
    batches from an endless reshuffled stream (several cached views per image). Under
    ``TF_CONFIG``, across the cluster (:func:`imgclf.distributed.fit`)."""
    started = time.perf_counter()
    multi_worker = distributed.multi_worker_strategy()
    if multi_worker is not None:
        history = distributed.fit(multi_worker, model, train_set, val_set, batch_size, epochs, patience,
                                  reduce_lr_patience, seed, augment, steps_per_epoch, on_epoch)
        return history, time.perf_counter() - started
    train_ds = batches(train_set, batch_size, shuffle=True, seed=seed, augment=augment,
                       repeat=steps_per_epoch is not None)
    val_ds = batches(val_set, batch_size)
    recorder = _Recorder(on_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.weights.h5"
        callbacks = [recorder, keras.callbacks.ModelCheckpoint(
            best, monitor="val_loss", save_best_only=True, save_weights_only=True)]
        if patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience))
        if reduce_lr_patience:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.3, patience=reduce_lr_patience, min_lr=1e-7))
        if epochs:
            model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=2, shuffle=False,
                      steps_per_epoch=steps_per_epoch)
        if best.exists():
            model.load_weights(best)
    return recorder.history, time.perf_counter() - started


def _compile(model: keras.Model, learning_rate, label_smoothing: float) -> None:
    """Adam with ``learning_rate`` (a number or a schedule), smoothed cross-entropy; the optimizer
    belongs to the training strategy (its variables mirror the model's)."""
    with distributed.strategy().scope():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                      metrics=["accuracy"])


def train_baseline(train_set: Examples, val_set: Examples, baseline: BaselineParams, train: TrainParams,
                   augment: AugmentParams, seed: int, on_epoch: EpochHook | None = None) -> TrainResult:
    """A CNN from scratch on augmented images; with ``lr_schedule: cosine`` the learning
    rate decays from ``learning_rate`` to 0 over ``epochs`` (the best epoch is kept)."""
    n, batch = len(train_set.class_names), train.batch_size
    learning_rate = baseline.learning_rate
    if baseline.lr_schedule == "cosine" and baseline.epochs:
        steps = int(np.ceil(len(train_set) / batch)) * baseline.epochs
        learning_rate = keras.optimizers.schedules.CosineDecay(baseline.learning_rate, decay_steps=steps)
    with distributed.strategy().scope():
        model = models.build_baseline(baseline, n, synchronized_bn=distributed.multi_worker_strategy() is not None)
        _compile(model, learning_rate, train.label_smoothing)
    history, seconds = fit(model, train_set, val_set, batch, baseline.epochs, baseline.patience, seed=seed,
                           augment=augmentation(augment, seed), on_epoch=on_epoch)
    return TrainResult(model, history, seconds, val_inputs=val_set)


def train_head(train_set: Examples, val_set: Examples, backbone: keras.Model, model_config: ModelParams,
               head: HeadParams, train: TrainParams, augment: AugmentParams, seed: int,
               on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 1 on images: the frozen ``backbone`` runs every step (``head.augment``, or
    ``cache_features: false``), with on-the-fly augmentation when ``head.augment``."""
    n, batch = len(train_set.class_names), train.batch_size
    with distributed.strategy().scope():
        model = models.build_transfer_model(model_config, n, backbone)
        _compile(model, head.learning_rate, train.label_smoothing)
    aug = augmentation(augment, seed) if head.augment else None
    history, seconds = fit(model, train_set, val_set, batch, head.epochs, head.patience, seed=seed, augment=aug,
                           on_epoch=on_epoch)
    return TrainResult(model, history, seconds, {"cached_features": 0}, val_inputs=val_set)


def train_head_on_activations(activations: Activations, model_config: ModelParams, head: HeadParams,
                              train: TrainParams, seed: int, workdir: Path,
                              on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 1 from the cached activations: the frozen top runs once per image into pooled
    features (on disk in ``workdir``), the head trains on them, and its weights are copied
    into the full image model, so both paths give the same kind of model."""
    n, batch = len(activations.train.class_names), train.batch_size
    with distributed.strategy().scope():
        model = models.build_transfer_model(model_config, n, activations.backbone)
        _compile(model, head.learning_rate, train.label_smoothing)
    started = time.perf_counter()
    _, top = models.split_at(activations.backbone, activations.cut)
    pooled = models.pooled_top(top)
    train_features = compute_outputs(pooled, activations.train, workdir / "features_train.npy")
    val_features = compute_outputs(pooled, activations.val, workdir / "features_val.npy")
    feature_seconds = time.perf_counter() - started
    with distributed.strategy().scope():
        head_model = models.build_head_model(train_features.record_shape[0], model_config, n)
        _compile(head_model, head.learning_rate, train.label_smoothing)
    history, fit_seconds = fit(head_model, train_features, val_features, batch, head.epochs, head.patience,
                               seed=seed, on_epoch=on_epoch)
    models.copy_head_weights(head_model, model)
    return TrainResult(model, history, feature_seconds + fit_seconds,
                       {"cached_features": 1, "feature_seconds": round(feature_seconds, 2)},
                       trained=head_model, val_inputs=val_features)


class _Views:
    """Several record sets of the same examples (the original and augmented views) as one."""

    def __init__(self, views: list[Examples]):
        self.views, self.size = views, len(views[0])
        self.labels = np.tile(views[0].labels, len(views))
        self.class_names = views[0].class_names
        self.record_shape, self.dtype = views[0].record_shape, views[0].dtype

    def __len__(self) -> int:
        return self.size * len(self.views)

    def read(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.record_shape), self.dtype)
        for v, view in enumerate(self.views):
            mask = indices // self.size == v
            if mask.any():
                out[mask] = view.read(indices[mask] % self.size)
        return out


def train_finetune(model: keras.Model, train_set: Examples, val_set: Examples, finetune: FinetuneParams,
                   train: TrainParams, augment: AugmentParams, seed: int,
                   activations: Activations | None = None, workdir: Path | None = None,
                   on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 2: unfreeze the top backbone layers (BatchNorm frozen) at a low learning rate.

    With ``finetune.cache_activations`` only the unfrozen top and the head train, on the
    cached ``activations`` of the frozen bottom, each epoch on one view of every image: the
    original, or one of ``cached_views - 1`` augmented copies (computed here, into
    ``workdir``). Without it, the whole model runs every step with fresh augmentation on
    ``train_set``/``val_set`` (images).
    """
    batch = train.batch_size
    bottom, top, first = models.split_backbone(models.find_backbone(model), finetune.unfreeze_layers)
    trainable_layers = models.unfreeze_from(model, first)
    extra = {"unfrozen_layers_with_weights": trainable_layers,
             "unfrozen_from_layer": first, "cached_activations": int(finetune.cache_activations)}
    aug = augmentation(augment, seed)
    if not finetune.cache_activations:
        _compile(model, finetune.learning_rate, train.label_smoothing)  # recompile after trainable changes
        history, seconds = fit(model, train_set, val_set, batch, finetune.epochs, finetune.patience,
                               finetune.reduce_lr_patience, seed=seed, augment=aug, on_epoch=on_epoch)
        return TrainResult(model, history, seconds, extra, val_inputs=val_set)

    if activations is None or activations.cut != first:
        have = "none" if activations is None else f"cut at layer {activations.cut}"
        raise DataError(f"finetune.unfreeze_layers={finetune.unfreeze_layers} cuts the backbone at layer "
                         f"{first}; the cached activations: {have} (rerun the activations stage)")
    started = time.perf_counter()
    views = [activations.train]
    if finetune.cached_views > 1:
        extractor = models.bottom_extractor(model, bottom)
        views += [compute_outputs(extractor, train_set, workdir / f"view_{v}.npy", aug)
                  for v in range(1, finetune.cached_views)]
    extract_seconds = time.perf_counter() - started
    classifier = models.top_classifier(model, top)
    _compile(classifier, finetune.learning_rate, train.label_smoothing)
    steps = int(np.ceil(len(activations.train) / batch))  # an epoch = one view of every image, on average
    history, fit_seconds = fit(classifier, _Views(views), activations.val, batch, finetune.epochs,
                               finetune.patience, finetune.reduce_lr_patience, seed=seed, steps_per_epoch=steps,
                               on_epoch=on_epoch)
    extra["activation_seconds"] = round(extract_seconds, 2)  # extra views only: the rest were cached
    return TrainResult(model, history, extract_seconds + fit_seconds, extra,
                       trained=classifier, val_inputs=activations.val)


def calibrate(result: TrainResult, enabled: bool) -> float:
    """Fit a temperature on the validation split (through the model that trained, on its own
    inputs: no second pass of the frozen layers) and fold it into ``result.model``; its
    numbers join the training metrics. Returns the temperature (1: off)."""
    if not enabled:
        return 1.0
    started = time.perf_counter()
    trained = result.trained or result.model
    fitted = calibration.calibrate(trained, result.val_inputs)
    if calibration.output_layer(trained) is not calibration.output_layer(result.model):
        calibration.fold_temperature(result.model, fitted["temperature"])
    result.extra.update(fitted, calibration_seconds=round(time.perf_counter() - started, 2))
    return fitted["temperature"]


