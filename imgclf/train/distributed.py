"""Training on several machines with TensorFlow's own engine.

When ``TF_CONFIG`` is set, training stages run under ``tf.distribute.MultiWorkerMirroredStrategy``:
every machine runs the same stage on the same inputs, each takes its share of every batch, and
gradients are summed across all of them, so their weights stay equal. Only the chief (task
``chief``, or ``worker`` 0 when the cluster has no chief) writes models, reports and MLflow runs.

Keras 3's ``model.fit`` does not run under this strategy (keras-team/keras#20585), so training
there goes through :func:`fit`, a small loop that applies the same training rules as Keras' fit
(:mod:`imgclf.train.rules`: the best epoch kept, early stopping, the learning rate cut on a plateau) and
logs the same history. Decisions are taken on numbers all-reduced across workers, so workers never
diverge.
A worker that dies makes the others fail within :data:`COLLECTIVE_TIMEOUT_S` with one line,
instead of waiting forever.
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np

from .. import console
from ..cluster import DistributedError, cluster, task_name
from ..params import TrainParams
from .rules import EpochHook, RuleKeeper, TrainingRules, record

COLLECTIVE_TIMEOUT_S = 60  # an all-reduce waiting longer than this means a worker is gone


@functools.lru_cache(maxsize=1)
def multi_worker_strategy():
    """The one MultiWorkerMirroredStrategy of this process (TensorFlow allows one, created
    before any other TensorFlow work), or None without TF_CONFIG."""
    if cluster() is None:
        return None
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def strategy():
    """The training strategy: MultiWorkerMirroredStrategy under ``TF_CONFIG``, else
    MirroredStrategy over all GPUs when there are several, else the default strategy."""
    import tensorflow as tf

    multi_worker = multi_worker_strategy()
    if multi_worker is not None:
        return multi_worker
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def lost_worker(err: Exception) -> DistributedError:
    return DistributedError(f"{task_name()}: lost contact with the cluster in TF_CONFIG "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                            "every worker must run the same stage at the same time")


def fit(strategy, model, train_set, val_set, train: TrainParams, rules: TrainingRules, *, seed: int, augment,
        mix=None, steps_per_epoch: int | None, on_epoch: EpochHook | None) -> dict[str, list[float]]:
    """Train ``model`` (compiled, built in ``strategy``'s scope) across the cluster under the
    training ``rules`` (:mod:`imgclf.train.rules`, as Keras' fit applies them); returns the per-epoch
    history. ``train.batch_size`` is the global batch: each of the workers' replicas takes
    ``batch_size / replicas`` examples of every step from its own shard of the shuffled data."""
    import keras
    import tensorflow as tf

    from ..data.datasets import batches

    batch_size, smoothing = train.batch_size, train.label_smoothing
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise DistributedError(f"train.batch_size {batch_size} must be a multiple of the {replicas} replicas")
    steps = steps_per_epoch or math.ceil(len(train_set) / batch_size)

    def dataset(context):
        return batches(train_set, context.get_per_replica_batch_size(batch_size), shuffle=True, seed=seed,
                       augment=augment, mix=mix, repeat=True,
                       shard=(context.num_input_pipelines, context.input_pipeline_id))

    iterator = iter(strategy.distribute_datasets_from_function(dataset))
    optimizer = model.optimizer
    with strategy.scope():
        optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                per_example = keras.losses.categorical_crossentropy(y, probs, label_smoothing=smoothing)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch_size)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            right = tf.cast(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)), tf.float32)
            return tf.stack([tf.reduce_sum(per_example), tf.reduce_sum(right), tf.cast(tf.shape(y)[0], tf.float32)])

        return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)

    @tf.function
    def all_mean(values):
        return strategy.reduce("MEAN", strategy.run(lambda: tf.identity(values)), axis=None)

    predict = tf.function(lambda x: model(x, training=False))
    history: dict[str, list[float]] = {}
    keeper, kept_weights = RuleKeeper(rules), None
    try:
        for epoch in range(rules.epochs):
            started = time.perf_counter()
            totals = np.zeros(3)
            for _ in range(steps):
                totals += train_step(iterator).numpy()
            # every worker validates the whole (small) split with the same weights; the mean
            # across workers makes the rules decide identically everywhere
            val = _evaluate(predict, batches(val_set, batch_size), smoothing)
            val_loss, val_accuracy = (float(v) for v in all_mean(tf.constant(val, tf.float32)).numpy())
            rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2], "val_loss": val_loss,
                    "val_accuracy": val_accuracy, "learning_rate": rate}
            record(history, logs)
            if console.verbose():
                print(f"Epoch {epoch + 1}/{rules.epochs} ({task_name()}): "
                      + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                      + f" - {time.perf_counter() - started:.0f}s", flush=True)
            if on_epoch:
                on_epoch(epoch, logs)
            decision = keeper.end_epoch(val_loss, rate)
            if decision.keep:
                kept_weights = [v.numpy() for v in model.weights]
            if decision.learning_rate is not None:
                optimizer.learning_rate.assign(decision.learning_rate)
            if decision.stop:
                break
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.InternalError,
            tf.errors.CancelledError, tf.errors.AbortedError) as err:
        raise lost_worker(err) from None
    if kept_weights is not None:
        for variable, value in zip(model.weights, kept_weights):
            variable.assign(value)
    return history


def _evaluate(predict, dataset, smoothing: float) -> list[float]:
    """(mean loss, accuracy) of ``predict`` over a dataset of (images, one-hot labels)."""
    import keras

    loss = right = count = 0.0
    for x, y in dataset:
        probs = predict(x)
        loss += float(keras.ops.sum(keras.losses.categorical_crossentropy(y, probs, label_smoothing=smoothing)))
        right += float(np.sum(np.argmax(probs, 1) == np.argmax(y, 1)))
        count += len(y)
    return [loss / count, right / count]
