"""Training phases: baseline CNN, frozen-backbone head (cached features or not), fine-tuning."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from . import models
from .datasets import ImageSet, augmentation, image_batches, to_dataset
from .params import Params


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
        h = self.history
        out = {"train_seconds": round(self.seconds, 2), "epochs_run": self.epochs_run}
        if h.get("val_accuracy"):
            best = int(np.argmin(h["val_loss"]))
            out.update(best_epoch=best + 1, best_val_loss=h["val_loss"][best],
                       best_val_accuracy=max(h["val_accuracy"]), best_train_accuracy=max(h["accuracy"]))
        out.update(models.count_params(self.model))
        out.update(self.extra)
        return out


def configure(params: Params) -> None:
    """Seed every generator; enable mixed precision only where a GPU can use it."""
    import tensorflow as tf

    keras.utils.set_random_seed(params.seed)
    gpus = tf.config.list_physical_devices("GPU")
    policy = "mixed_float16" if params.train.mixed_precision and gpus else "float32"
    keras.mixed_precision.set_global_policy(policy)


def strategy():
    """MirroredStrategy over all GPUs when there are several, else the default strategy."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


class _Recorder(keras.callbacks.Callback):
    """Per-epoch logs plus the learning rate actually used."""

    def __init__(self):
        super().__init__()
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))


def fit(model: keras.Model, train_ds, val_ds, epochs: int, patience: int,
        reduce_lr_patience: int = 0, steps_per_epoch: int | None = None) -> tuple[dict[str, list[float]], float]:
    """Fit with early stopping on val_loss and keep the best epoch's weights."""
    recorder = _Recorder()
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


def train_baseline(train: ImageSet, val: ImageSet, params: Params) -> TrainResult:
    """A CNN from scratch on augmented images; with ``lr_schedule: cosine`` the learning
    rate decays from ``learning_rate`` to 0 over ``epochs`` (the best epoch is kept)."""
    n, bp, batch = len(train.class_names), params.baseline, params.train.batch_size
    learning_rate = bp.learning_rate
    if bp.lr_schedule == "cosine" and bp.epochs:
        steps = int(np.ceil(len(train) / batch)) * bp.epochs
        learning_rate = keras.optimizers.schedules.CosineDecay(bp.learning_rate, decay_steps=steps)
    with strategy().scope():
        model = models.build_baseline(bp, n)
        _compile(model, learning_rate, params.train.label_smoothing)
    train_ds = to_dataset(train.images, train.labels, n, batch, shuffle=True,
                          seed=params.seed, augment=augmentation(params.augment, params.seed))
    val_ds = to_dataset(val.images, val.labels, n, batch)
    history, seconds = fit(model, train_ds, val_ds, bp.epochs, bp.patience)
    return TrainResult(model, history, seconds)


# Inference-only passes use larger batches: a little faster on CPU, no effect on results.
EXTRACT_BATCH = 64


def extract_features(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Pooled backbone features, computed once (the backbone is frozen)."""
    return models.feature_extractor(model).predict(image_batches(images, EXTRACT_BATCH), verbose=0)


def train_head(train: ImageSet, val: ImageSet, params: Params, use_cache: bool | None = None) -> TrainResult:
    """Phase 1: the backbone frozen, only the head trains.

    With ``head.cache_features`` (and no ``head.augment``) the backbone runs once per image
    and the head trains on the cached pooled features; the weights are then copied into the
    full model, so both paths give the same kind of model.
    """
    n = len(train.class_names)
    hp, batch = params.head, params.train.batch_size
    if use_cache is None:
        use_cache = hp.cache_features and not hp.augment
    with strategy().scope():
        model = models.build_transfer_model(params.model, n)
        _compile(model, hp.learning_rate, params.train.label_smoothing)
    if not use_cache:
        aug = augmentation(params.augment, params.seed) if hp.augment else None
        train_ds = to_dataset(train.images, train.labels, n, batch, shuffle=True, seed=params.seed, augment=aug)
        val_ds = to_dataset(val.images, val.labels, n, batch)
        history, seconds = fit(model, train_ds, val_ds, hp.epochs, hp.patience)
        return TrainResult(model, history, seconds, {"cached_features": 0})

    started = time.perf_counter()
    train_features = extract_features(model, train.images)
    val_features = extract_features(model, val.images)
    feature_seconds = time.perf_counter() - started
    with strategy().scope():
        head = models.build_head_model(train_features.shape[1], params.model, n)
        _compile(head, hp.learning_rate, params.train.label_smoothing)
    train_ds = to_dataset(train_features, train.labels, n, batch, shuffle=True, seed=params.seed)
    val_ds = to_dataset(val_features, val.labels, n, batch)
    history, fit_seconds = fit(head, train_ds, val_ds, hp.epochs, hp.patience)
    models.copy_head_weights(head, model)
    return TrainResult(model, history, feature_seconds + fit_seconds,
                       {"cached_features": 1, "feature_seconds": round(feature_seconds, 2)})


def _extract(extractor: keras.Model, images: np.ndarray, augment=None) -> np.ndarray:
    return extractor.predict(image_batches(images, EXTRACT_BATCH, augment), verbose=0)


def train_finetune(model: keras.Model, train: ImageSet, val: ImageSet, params: Params) -> TrainResult:
    """Phase 2: unfreeze the top backbone layers (BatchNorm frozen) at a low learning rate.

    With ``finetune.cache_activations`` the frozen bottom of the backbone runs once per
    image view (``cached_views``: the original plus randomly augmented copies) and only the
    unfrozen top and the head train, each epoch on one random view of every image. Without
    it, the whole model runs every step with fresh augmentation.
    """
    n = len(train.class_names)
    fp, batch = params.finetune, params.train.batch_size
    bottom, top, first = models.split_backbone(models.find_backbone(model), fp.unfreeze_layers)
    trainable_layers = models.unfreeze_from(model, first)
    extra = {"unfrozen_layers_with_weights": trainable_layers,
             "unfrozen_from_layer": first, "cached_activations": int(fp.cache_activations)}
    aug = augmentation(params.augment, params.seed)
    if not fp.cache_activations:
        _compile(model, fp.learning_rate, params.train.label_smoothing)  # recompile after trainable changes
        train_ds = to_dataset(train.images, train.labels, n, batch, shuffle=True, seed=params.seed, augment=aug)
        val_ds = to_dataset(val.images, val.labels, n, batch)
        history, seconds = fit(model, train_ds, val_ds, fp.epochs, fp.patience, fp.reduce_lr_patience)
        return TrainResult(model, history, seconds, extra)

    started = time.perf_counter()
    extractor = models.bottom_extractor(model, bottom)
    views = [_extract(extractor, train.images)]
    for _ in range(1, fp.cached_views):
        views.append(_extract(extractor, train.images, aug))
    val_act = _extract(extractor, val.images)
    extract_seconds = time.perf_counter() - started
    classifier = models.top_classifier(model, top)
    _compile(classifier, fp.learning_rate, params.train.label_smoothing)
    import tensorflow as tf

    acts = np.concatenate(views)
    labels = np.eye(n, dtype=np.float32)[np.tile(train.labels, len(views))]
    train_ds = (tf.data.Dataset.from_tensor_slices((acts, labels))
                .shuffle(len(acts), seed=params.seed).repeat().batch(batch).prefetch(tf.data.AUTOTUNE))
    val_ds = to_dataset(val_act, val.labels, n, batch)
    steps = int(np.ceil(len(train) / batch))  # an epoch = one view of every image, on average
    history, fit_seconds = fit(classifier, train_ds, val_ds, fp.epochs, fp.patience,
                               fp.reduce_lr_patience, steps_per_epoch=steps)
    extra["activation_seconds"] = round(extract_seconds, 2)
    return TrainResult(model, history, extract_seconds + fit_seconds, extra)


def predict(model: keras.Model, images: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """Class probabilities for uint8/float images 0..255; with ``tta`` averaged with the
    horizontally flipped images (test-time augmentation)."""
    probs = model.predict(image_batches(images, batch_size), verbose=0)
    if tta:
        flipped = np.ascontiguousarray(images[:, :, ::-1])
        probs = (probs + model.predict(image_batches(flipped, batch_size), verbose=0)) / 2
    return probs
