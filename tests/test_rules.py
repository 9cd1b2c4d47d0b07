"""The training rules, written once (imgclf/train/rules.py), decide alike in Keras' fit and in the
multi-worker loop, and as Keras' own callbacks would."""
import keras
import numpy as np
import pytest
from conftest import tiny_params

from imgclf.data.datasets import ImageSet
from imgclf.params import params_from_dict
from imgclf.train import distributed, training
from imgclf.train.rules import MIN_LEARNING_RATE, PLATEAU_FACTOR, RuleKeeper, TrainingRules


def scripted(losses, rules, rate=1e-3):
    """(kept epoch, epochs run, learning rate of every epoch) for a given val_loss sequence."""
    keeper, rates, kept = RuleKeeper(rules), [], None
    for epoch, loss in enumerate(losses):
        rates.append(rate)
        decision = keeper.end_epoch(loss, rate)
        kept = epoch if decision.keep else kept
        rate = decision.learning_rate or rate
        if decision.stop:
            break
    return kept, len(rates), rates


def keras_scripted(losses, rules, rate=1e-3):
    """The same through Keras' own EarlyStopping and ReduceLROnPlateau (and the checkpoint's
    strict improvement), driven epoch by epoch."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=rules.patience)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=PLATEAU_FACTOR,
                                                patience=rules.reduce_lr_patience, min_lr=MIN_LEARNING_RATE)
    callbacks = [c for c, on in ((stop, rules.patience), (plateau, rules.reduce_lr_patience)) if on]
    for c in callbacks:
        c.set_model(model)
        c.on_train_begin()
    rates, best, kept = [], np.inf, None
    for epoch, loss in enumerate(losses):
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        if loss < best:
            best, kept = loss, epoch
        for c in callbacks:
            c.on_epoch_end(epoch, {"val_loss": loss})
        if model.stop_training:
            break
    return kept, len(rates), rates


@pytest.mark.parametrize("losses,rules", [
    ([1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.5], TrainingRules(7, 3, 0)),
    ([1.0, 0.9, 0.89995, 0.95, 0.8, 0.81, 0.82, 0.83, 0.84], TrainingRules(9, 0, 2)),
    ([1.0, 1.1, 1.2, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], TrainingRules(9, 4, 1)),
    ([2.0] * 12, TrainingRules(12, 0, 1)),
])
def test_the_rules_decide_as_keras_own_callbacks(losses, rules):
    ours = scripted(losses, rules)
    theirs = keras_scripted(losses, rules)
    assert ours[:2] == theirs[:2]
    np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-6)


def clusters(labels_shift: int, seed: int) -> ImageSet:
    """Three separable clusters of 8-dimensional points; labels shifted by ``labels_shift``
    classes (a validation set that disagrees with training: its loss rises as training goes)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 8, dtype=np.float32) * 4
    labels = np.repeat(np.arange(3), 8)
    points = centres[labels] + rng.normal(0, 0.3, (24, 8)).astype(np.float32)
    return ImageSet(points, ((labels + labels_shift) % 3).astype(np.int32), [""] * 24, ["a", "b", "c"])


def fresh_model(weights=None):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    if weights is not None:
        model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    return model


def test_keras_fit_and_the_multi_worker_loop_keep_the_same_epoch_and_rates_and_log_the_same_history():
    import tensorflow as tf

    params = params_from_dict(tiny_params(train={"batch_size": 8}))
    training.configure(params.seed, params.train)
    rules = TrainingRules(epochs=8, patience=3, reduce_lr_patience=1)
    train_set, val_set = clusters(0, seed=1), clusters(1, seed=2)
    initial = fresh_model().get_weights()

    keras_model = fresh_model(initial)
    keras_history, _ = training.fit(keras_model, train_set, val_set, params.train, rules, seed=0)
    loop_model = fresh_model(initial)
    loop_history = distributed.fit(tf.distribute.get_strategy(), loop_model, train_set, val_set, params.train,
                                   rules, seed=0, augment=None, steps_per_epoch=None, on_epoch=None)

    assert sorted(keras_history) == sorted(loop_history) == [
        "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
    # validation loss rises after the first epoch: epoch 0 is kept, the rate is cut after each
    # epoch of plateau, and training stops after `patience` epochs without improvement
    for history in (keras_history, loop_history):
        assert int(np.argmin(history["val_loss"])) == 0
        np.testing.assert_allclose(history["learning_rate"], [0.05, 0.05, 0.015, 0.0045], rtol=1e-5)
    # the same numbers for the first epoch; after it the two input pipelines draw the reshuffled
    # batches in another order (an endless stream against one pass per epoch), so only close
    for key in keras_history:
        np.testing.assert_allclose(keras_history[key][0], loop_history[key][0], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(keras_history[key], loop_history[key], rtol=0.05, err_msg=key)
    for a, b in zip(keras_model.get_weights(), loop_model.get_weights()):  # both restored the kept epoch 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
