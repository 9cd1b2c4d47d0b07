"""Training phases: baseline CNN, frozen-backbone head (cached features or not), fine-tuning."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from . import calibration, models
from .augment import augmentation
from .datasets import ImageSet, image_batches, to_dataset
from .inference import INFERENCE_BATCH
from .params import AugmentParams, BaselineParams, FinetuneParams, HeadParams, ModelParams, TrainParams


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

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
    """Seed every generator; enable mixed precision only where a GPU can use it."""
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    policy = "mixed_float16" if train.mixed_precision and gpus else "float32"
    keras.mixed_precision.set_global_policy(policy)


def strategy():
    """MirroredStrategy over all GPUs when there are several, else the default strategy."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


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


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int, reduce_lr_patience: int = 0,
        steps_per_epoch: int | None = None, on_epoch: EpochHook | None = None
        ) -> tuple[dict[str, list[float]], float]:
    """Fit with early stopping on val_loss and keep the best epoch's weights."""
    recorder = _Recorder(on_epoch)
    started = time.perf_counter()
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
    """Adam with ``learning_rate`` (a number or a schedule), smoothed cross-entropy."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=["accuracy"])


def train_baseline(train_set: ImageSet, val_set: ImageSet, baseline: BaselineParams, train: TrainParams,
                   augment: AugmentParams, seed: int, on_epoch: EpochHook | None = None) -> TrainResult:
    """A CNN from scratch on augmented images; with ``lr_schedule: cosine`` the learning
    rate decays from ``learning_rate`` to 0 over ``epochs`` (the best epoch is kept)."""
    n, batch = len(train_set.class_names), train.batch_size
    learning_rate = baseline.learning_rate
    if baseline.lr_schedule == "cosine" and baseline.epochs:
        steps = int(np.ceil(len(train_set) / batch)) * baseline.epochs
        learning_rate = keras.optimizers.schedules.CosineDecay(baseline.learning_rate, decay_steps=steps)
    with strategy().scope():
        model = models.build_baseline(baseline, n)
        _compile(model, learning_rate, train.label_smoothing)
    train_ds = to_dataset(train_set.images, train_set.labels, n, batch, shuffle=True,
                          seed=seed, augment=augmentation(augment, seed))
    val_ds = to_dataset(val_set.images, val_set.labels, n, batch)
    history, seconds = fit(model, train_ds, val_ds, baseline.epochs, baseline.patience, on_epoch=on_epoch)
    return TrainResult(model, history, seconds)


def extract_features(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Pooled backbone features, computed once (the backbone is frozen)."""
    return models.feature_extractor(model).predict(image_batches(images, INFERENCE_BATCH), verbose=0)


def train_head(train_set: ImageSet, val_set: ImageSet, model_config: ModelParams, head: HeadParams,
               train: TrainParams, augment: AugmentParams, seed: int,
               use_cache: bool | None = None, on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 1: the backbone frozen, only the head trains.

    With ``head.cache_features`` (and no ``head.augment``) the backbone runs once per image
    and the head trains on the cached pooled features; the weights are then copied into the
    full model, so both paths give the same kind of model.
    """
    n, batch = len(train_set.class_names), train.batch_size
    if use_cache is None:
        use_cache = head.cache_features and not head.augment
    with strategy().scope():
        model = models.build_transfer_model(model_config, n)
        _compile(model, head.learning_rate, train.label_smoothing)
    if not use_cache:
        aug = augmentation(augment, seed) if head.augment else None
        train_ds = to_dataset(train_set.images, train_set.labels, n, batch, shuffle=True, seed=seed, augment=aug)
        val_ds = to_dataset(val_set.images, val_set.labels, n, batch)
        history, seconds = fit(model, train_ds, val_ds, head.epochs, head.patience, on_epoch=on_epoch)
        return TrainResult(model, history, seconds, {"cached_features": 0})

    started = time.perf_counter()
    train_features = extract_features(model, train_set.images)
    val_features = extract_features(model, val_set.images)
    feature_seconds = time.perf_counter() - started
    with strategy().scope():
        head_model = models.build_head_model(train_features.shape[1], model_config, n)
        _compile(head_model, head.learning_rate, train.label_smoothing)
    train_ds = to_dataset(train_features, train_set.labels, n, batch, shuffle=True, seed=seed)
    val_ds = to_dataset(val_features, val_set.labels, n, batch)
    history, fit_seconds = fit(head_model, train_ds, val_ds, head.epochs, head.patience, on_epoch=on_epoch)
    models.copy_head_weights(head_model, model)
    return TrainResult(model, history, feature_seconds + fit_seconds,
                       {"cached_features": 1, "feature_seconds": round(feature_seconds, 2)})


def _extract(extractor: keras.Model, images: np.ndarray, augment=None) -> np.ndarray:
    return extractor.predict(image_batches(images, INFERENCE_BATCH, augment), verbose=0)


def train_finetune(model: keras.Model, train_set: ImageSet, val_set: ImageSet, finetune: FinetuneParams,
                   train: TrainParams, augment: AugmentParams, seed: int,
                   on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 2: unfreeze the top backbone layers (BatchNorm frozen) at a low learning rate.

    With ``finetune.cache_activations`` the frozen bottom of the backbone runs once per
    image view (``cached_views``: the original plus randomly augmented copies) and only the
    unfrozen top and the head train, each epoch on one random view of every image. Without
    it, the whole model runs every step with fresh augmentation.
    """
    n, batch = len(train_set.class_names), train.batch_size
    bottom, top, first = models.split_backbone(models.find_backbone(model), finetune.unfreeze_layers)
    trainable_layers = models.unfreeze_from(model, first)
    extra = {"unfrozen_layers_with_weights": trainable_layers,
             "unfrozen_from_layer": first, "cached_activations": int(finetune.cache_activations)}
    aug = augmentation(augment, seed)
    if not finetune.cache_activations:
        _compile(model, finetune.learning_rate, train.label_smoothing)  # recompile after trainable changes
        train_ds = to_dataset(train_set.images, train_set.labels, n, batch, shuffle=True, seed=seed, augment=aug)
        val_ds = to_dataset(val_set.images, val_set.labels, n, batch)
        history, seconds = fit(model, train_ds, val_ds, finetune.epochs, finetune.patience,
                               finetune.reduce_lr_patience, on_epoch=on_epoch)
        return TrainResult(model, history, seconds, extra)

    started = time.perf_counter()
    extractor = models.bottom_extractor(model, bottom)
    views = [_extract(extractor, train_set.images)]
    for _ in range(1, finetune.cached_views):
        views.append(_extract(extractor, train_set.images, aug))
    val_act = _extract(extractor, val_set.images)
    extract_seconds = time.perf_counter() - started
    classifier = models.top_classifier(model, top)
    _compile(classifier, finetune.learning_rate, train.label_smoothing)
    import tensorflow as tf

    acts = np.concatenate(views)
    labels = np.eye(n, dtype=np.float32)[np.tile(train_set.labels, len(views))]
    train_ds = (tf.data.Dataset.from_tensor_slices((acts, labels))
                .shuffle(len(acts), seed=seed).repeat().batch(batch).prefetch(tf.data.AUTOTUNE))
    val_ds = to_dataset(val_act, val_set.labels, n, batch)
    steps = int(np.ceil(len(train_set) / batch))  # an epoch = one view of every image, on average
    history, fit_seconds = fit(classifier, train_ds, val_ds, finetune.epochs, finetune.patience,
                               finetune.reduce_lr_patience, steps_per_epoch=steps, on_epoch=on_epoch)
    extra["activation_seconds"] = round(extract_seconds, 2)
    return TrainResult(model, history, extract_seconds + fit_seconds, extra)


def calibrate(result: TrainResult, val_set: ImageSet, enabled: bool) -> float:
    """Fit a temperature on the validation images and fold it into ``result.model`` (when
    ``enabled``); its numbers join the training metrics. Returns the temperature (1: off)."""
    if not enabled:
        return 1.0
    started = time.perf_counter()
    fitted = calibration.calibrate(result.model, val_set)
    result.extra.update(fitted, calibration_seconds=round(time.perf_counter() - started, 2))
    return fitted["temperature"]
