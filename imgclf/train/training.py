"""Training phases: baseline CNN, frozen-backbone head, fine-tuning.

The frozen bottom of the backbone runs once per image (:func:`compute_activations`, the
activations stage); the head trains on features pooled from those activations through the
frozen top, and fine-tuning trains the top on the same activations. Every pass streams
batches from disk, so memory does not grow with the data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from .. import console
from ..data.datasets import Examples, batches
from ..errors import DataError
from ..model import models
from ..params import AugmentParams, BaselineParams, FinetuneParams, HeadParams, ModelParams, TrainParams
from ..serve.inference import ensemble_members, inference_batch_size, runner_for
from . import calibration, distributed
from .activations import Activations, compute_outputs
from .augment import augmentation, mixup
from .rules import EpochHook, RuleKeeper, TrainingRules, record


@dataclass
class TrainResult:
    model: keras.Model  # the full image model
    history: dict[str, list[float]]
    seconds: float
    numbers: dict[str, float] = field(default_factory=dict)  # what the phase measured besides its history
    fitted_model: keras.Model | None = None  # the model that trained, on its own inputs (None: ``model``)
    fitted_val_set: Examples | None = None  # validation examples as ``fitted_model`` takes them

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))

    def summary(self) -> dict[str, float]:
        """Training cost and the numbers of the epoch whose weights were kept (lowest
        val_loss, as the checkpoint restores), not maxima over all epochs."""
        h = self.history
        out = {"train_seconds": round(self.seconds, 2), "epochs_run": self.epochs_run}
        kept = kept_epoch(h)
        if kept is not None:
            out["best_epoch"] = kept + 1
            for name in ("accuracy", "loss"):
                out[f"train_{name}"] = round(h[name][kept], 6)
                out[f"val_{name}"] = round(h[f"val_{name}"][kept], 6)
        out.update(models.count_params(self.model))
        out.update(self.numbers)
        return out


def kept_epoch(history: dict[str, list[float]]) -> int | None:
    """Index of the epoch whose weights were kept: the first lowest val_loss (the checkpoint saves
    only improvements); None when no epoch ran."""
    return int(np.argmin(history["val_loss"])) if history.get("val_loss") else None


def configure(seed: int, train: TrainParams) -> None:
    """Seed every generator; enable mixed precision only where a GPU can use it. Under
    ``TF_CONFIG`` the multi-worker strategy is created first, as TensorFlow requires."""
    import tensorflow as tf

    distributed.strategy()
    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    policy = "mixed_float16" if train.mixed_precision and gpus else "float32"
    keras.mixed_precision.set_global_policy(policy)


class RulesCallback(keras.callbacks.Callback):
    """The rules inside Keras' ``fit``: records each epoch's logs with the learning rate it used,
    passes them to ``on_epoch`` (MLflow shows the curves while the stage trains), keeps the best
    weights in memory, stops early, cuts the learning rate, and restores the kept weights at the end."""

    def __init__(self, rules: TrainingRules, on_epoch: EpochHook | None = None):
        super().__init__()
        self.keeper = RuleKeeper(rules)
        self.on_epoch = on_epoch
        self.history: dict[str, list[float]] = {}
        self.kept_weights = None

    def on_epoch_end(self, epoch, logs=None):
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs = {key: float(value) for key, value in (logs or {}).items()}
        logs["learning_rate"] = rate
        record(self.history, logs)
        if self.on_epoch:
            self.on_epoch(epoch, logs)
        decision = self.keeper.end_epoch(logs["val_loss"], rate)
        if decision.keep:
            self.kept_weights = self.model.get_weights()
        if decision.learning_rate is not None:
            self.model.optimizer.learning_rate.assign(decision.learning_rate)
        if decision.stop:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.kept_weights is not None:
            self.model.set_weights(self.kept_weights)


def fit(model: keras.Model, train_set: Examples, val_set: Examples, train: TrainParams, rules: TrainingRules,
        seed: int, augment=None, steps_per_epoch: int | None = None,
        on_epoch: EpochHook | None = None, mix=None) -> tuple[dict[str, list[float]], float]:
    """Fit on shuffled (and augmented, if asked) batches of ``train_set`` under the training
    ``rules`` (the best epoch's weights kept, early stopping, learning rate cut on a plateau).
    ``steps_per_epoch``: an epoch of that many batches from an endless reshuffled stream (several
    cached views per image). ``mix``: a batch-level blend of inputs and labels (mixup). Under
    ``TF_CONFIG``, across the cluster (:func:`imgclf.train.distributed.fit`)."""
    started = time.perf_counter()
    multi_worker = distributed.multi_worker_strategy()
    if multi_worker is not None:
        history = distributed.fit(multi_worker, model, train_set, val_set, train, rules, seed=seed, augment=augment,
                                  mix=mix, steps_per_epoch=steps_per_epoch, on_epoch=on_epoch)
        return history, time.perf_counter() - started
    train_ds = batches(train_set, train.batch_size, shuffle=True, seed=seed, augment=augment,
                       repeat=steps_per_epoch is not None, mix=mix)
    val_ds = batches(val_set, train.batch_size)
    callback = RulesCallback(rules, on_epoch)
    if rules.epochs:
        model.fit(train_ds, validation_data=val_ds, epochs=rules.epochs, callbacks=[callback], verbose=2 if console.verbose() else 0,
                  shuffle=False, steps_per_epoch=steps_per_epoch)
    return callback.history, time.perf_counter() - started


def head_rules(head: HeadParams) -> TrainingRules:
    return TrainingRules(head.epochs, head.patience, reduce_lr_patience=0)


def finetune_rules(finetune: FinetuneParams) -> TrainingRules:
    """A cosine schedule sets the rate itself: no cut on a plateau then."""
    cut_patience = finetune.reduce_lr_patience if finetune.lr_schedule == "constant" else 0
    return TrainingRules(finetune.epochs, finetune.patience, cut_patience)


def finetune_learning_rate(finetune: FinetuneParams, steps_per_epoch: int):
    """``finetune.learning_rate``, or with ``lr_schedule: cosine`` a linear rise from 0 over
    ``warmup_epochs`` (the freshly unfrozen layers start gently; at most all epochs but one) and
    a cosine decay to 0 over the remaining epochs."""
    if finetune.lr_schedule == "constant" or not finetune.epochs:
        return finetune.learning_rate
    warmup_epochs = min(finetune.warmup_epochs, finetune.epochs - 1)
    warmup = warmup_epochs * steps_per_epoch
    decay = (finetune.epochs - warmup_epochs) * steps_per_epoch
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(finetune.learning_rate, decay_steps=decay)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=decay, warmup_target=finetune.learning_rate,
                                                  warmup_steps=warmup)


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
    history, seconds = fit(model, train_set, val_set, train, TrainingRules(baseline.epochs, baseline.patience, 0),
                           seed, augment=augmentation(augment, seed), on_epoch=on_epoch)
    return TrainResult(model, history, seconds, fitted_val_set=val_set)


def train_head(train_set: Examples, val_set: Examples, backbone: keras.Model, model_config: ModelParams,
               head: HeadParams, train: TrainParams, augment: AugmentParams, seed: int,
               on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 1 on images: the frozen ``backbone`` runs every step (``head.augment``, or
    ``cache_features: false``), with on-the-fly augmentation when ``head.augment``."""
    n = len(train_set.class_names)
    with distributed.strategy().scope():
        model = models.build_transfer_model(model_config, n, backbone)
        _compile(model, head.learning_rate, train.label_smoothing)
    aug = augmentation(augment, seed) if head.augment else None
    history, seconds = fit(model, train_set, val_set, train, head_rules(head), seed, augment=aug, on_epoch=on_epoch)
    return TrainResult(model, history, seconds, {"cached_features": 0}, fitted_val_set=val_set)


def train_head_on_activations(activations: Activations, model_config: ModelParams, head: HeadParams,
                              train: TrainParams, seed: int, on_epoch: EpochHook | None = None) -> TrainResult:
    """Phase 1 on the pooled features that the activations were cached with (the frozen top run
    once per image: :func:`imgclf.train.activations.write_features`): the head trains on them,
    and its weights are copied into the full image model, so both paths give the same kind of model."""
    n = len(activations.train.class_names)
    with distributed.strategy().scope():
        model = models.build_transfer_model(model_config, n, activations.backbone)
        _compile(model, head.learning_rate, train.label_smoothing)
    train_features, val_features = activations.features["train"], activations.features["val"]
    with distributed.strategy().scope():
        head_model = models.build_head_model(train_features.record_shape[0], model_config, n)
        _compile(head_model, head.learning_rate, train.label_smoothing)
    history, fit_seconds = fit(head_model, train_features, val_features, train, head_rules(head), seed,
                               on_epoch=on_epoch)
    models.copy_head_weights(head_model, model)
    return TrainResult(model, history, fit_seconds,
                       {"cached_features": 1, **runtime_numbers("features", activations.features_runtime["pooled_top"])},
                       fitted_model=head_model, fitted_val_set=val_features)


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
    """Phase 2: unfreeze the top backbone layers (BatchNorm frozen) at a low learning rate
    (constant, or warmed up and decayed: :func:`finetune_learning_rate`).

    Given the cached ``activations`` of the frozen bottom (the stage passes them when
    ``finetune.cache_activations`` is on), only the unfrozen top and the head train, on them, each
    epoch on one view of every image: the original, or one of ``cached_views - 1`` augmented
    copies (computed here, into ``workdir``). With ``finetune.members`` above 1, that many tops train
    from the head, one after the other, and the result is one image model averaging their
    probabilities over the shared bottom (:func:`imgclf.model.models.build_ensemble`). Without the
    activations, the whole model runs every step with fresh augmentation on ``train_set``/``val_set``
    (images).
    """
    batch = train.batch_size
    bottom, top, first = models.split_backbone(models.find_backbone(model), finetune.unfreeze_layers)
    trainable_layers = models.unfreeze_from(model, first)
    numbers = {"unfrozen_layers_with_weights": trainable_layers,
               "unfrozen_from_layer": first, "cached_activations": int(activations is not None)}
    aug = augmentation(augment, seed)
    if activations is None:
        steps = int(np.ceil(len(train_set) / batch))  # recompile after trainable changes:
        _compile(model, finetune_learning_rate(finetune, steps), train.label_smoothing)
        history, seconds = fit(model, train_set, val_set, train, finetune_rules(finetune), seed, augment=aug,
                               on_epoch=on_epoch, mix=mixup(finetune.mixup, seed))
        return TrainResult(model, history, seconds, numbers, fitted_val_set=val_set)

    if activations.cut != first:
        raise DataError(f"finetune.unfreeze_layers={finetune.unfreeze_layers} cuts the backbone at layer "
                        f"{first}; the cached activations are cut at layer {activations.cut} "
                        "(rerun the activations stage)")
    started = time.perf_counter()
    views = [activations.train]
    if finetune.cached_views > 1:
        extractor = runner_for(models.bottom_extractor(model, bottom), train_set,
                               len(train_set) * (finetune.cached_views - 1))
        views += [compute_outputs(extractor, train_set, workdir / f"view_{v}.npy", aug)
                  for v in range(1, finetune.cached_views)]
        numbers.update(runtime_numbers("views", extractor.report))
    extract_seconds = time.perf_counter() - started
    classifier = models.top_classifier(model, top)
    steps = int(np.ceil(len(activations.train) / batch))  # an epoch = one view of every image, on average
    start_weights = classifier.get_weights() if finetune.members > 1 else None
    members, history, fit_seconds = [], {}, 0.0
    for index in range(finetune.members):  # each member from the head, on its own shuffling and dropout
        if index:
            classifier.set_weights(start_weights)
        _compile(classifier, finetune_learning_rate(finetune, steps), train.label_smoothing)
        member_history, seconds = fit(classifier, _Views(views), activations.val, train, finetune_rules(finetune),
                                      seed + index, steps_per_epoch=steps, mix=mixup(finetune.mixup, seed + index),
                                      on_epoch=member_hook(on_epoch, index))
        fit_seconds += seconds
        if index == 0:
            history = member_history
        else:
            numbers.update(member_numbers(member_history, index))
        if finetune.members > 1:
            members.append(models.copy_of(classifier, f"member_{index + 1}"))
    numbers["activation_seconds"] = round(extract_seconds, 2)  # extra views only: the rest were cached
    if not members:
        return TrainResult(model, history, extract_seconds + fit_seconds, numbers,
                           fitted_model=classifier, fitted_val_set=activations.val)
    ensemble = models.build_ensemble(model, bottom, members)
    fitted = ensemble.get_layer(models.ENSEMBLE_LAYER)
    numbers.update(members=len(members), ensemble_val_accuracy=round(accuracy(fitted, activations.val), 6))
    return TrainResult(ensemble, history, extract_seconds + fit_seconds, numbers,
                       fitted_model=fitted, fitted_val_set=activations.val)


def member_hook(on_epoch: EpochHook | None, index: int) -> EpochHook | None:
    """The epoch hook of ensemble member ``index`` (0-based): the first member's curves keep the
    plain names, the others' are named ``member<N>_<metric>``."""
    if on_epoch is None or index == 0:
        return on_epoch
    return lambda epoch, logs: on_epoch(epoch, {f"member{index + 1}_{key}": value for key, value in logs.items()})


def member_numbers(history: dict[str, list[float]], index: int) -> dict[str, float]:
    """An ensemble member's epochs run and its kept epoch's validation numbers (the first member's
    are the phase's own; none with ``finetune.epochs: 0``)."""
    kept = kept_epoch(history)
    if kept is None:
        return {}
    return {f"member{index + 1}_epochs_run": len(history["val_loss"]), f"member{index + 1}_best_epoch": kept + 1,
            f"member{index + 1}_val_accuracy": round(history["val_accuracy"][kept], 6)}


def accuracy(model: keras.Model, examples: Examples) -> float:
    """Top-1 accuracy of ``model`` on ``examples`` (whatever it takes), in one streamed pass."""
    probs = model.predict(batches(examples, inference_batch_size(examples.record_shape), labels=False), verbose=0)
    return float(np.mean(probs.argmax(axis=1) == examples.labels))


def runtime_numbers(name: str, report: dict) -> dict[str, float]:
    """A pass's runtime report (:func:`imgclf.serve.inference.runner`) as numbers for a phase summary."""
    numbers = {f"{name}_on_litert": int(report["runtime"] == "litert")}
    if "parity" in report:
        numbers[f"{name}_parity_max_abs_diff"] = report["parity"]["max_abs_diff"]
    return numbers


def calibrate_result(result: TrainResult, enabled: bool) -> float:
    """Fit a temperature on the validation split (through the model that trained, on its own
    inputs: no second pass of the frozen layers) and fold it into ``result.model``; its
    numbers join the training metrics. Returns the temperature (1: off)."""
    if not enabled:
        return 1.0
    started = time.perf_counter()
    fitted_model = result.fitted_model or result.model
    fitted = calibration.calibrate(fitted_model, result.fitted_val_set)
    fitted_outputs = [calibration.output_layer(m) for m in ensemble_members(fitted_model)]
    if fitted_outputs != [calibration.output_layer(m) for m in ensemble_members(result.model)]:
        calibration.fold_temperature(result.model, fitted["temperature"])
    result.numbers.update(fitted, calibration_seconds=round(time.perf_counter() - started, 2))
    return fitted["temperature"]


