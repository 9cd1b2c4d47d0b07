"""Models and training phases on tiny generated images with random weights."""

import keras
import numpy as np
import pytest
from conftest import COLORS, make_image, tiny_params

from imgclf.data.datasets import ImageSet, load_subset
from imgclf.model import models
from imgclf.model.modelio import ModelInfo, load_model, save_model
from imgclf.params import params_from_dict
from imgclf.train import training
from imgclf.train.activations import backbone_cut, compute_activations


def tiny_set(n_per_class=8, classes=3, size=32, seed=0) -> ImageSet:
    images = np.stack([make_image(seed + c * 100 + i, COLORS[c], size)
                       for c in range(classes) for i in range(n_per_class)])
    labels = np.repeat(np.arange(classes, dtype=np.int32), n_per_class)
    return ImageSet(images, labels, [f"{i}.jpg" for i in range(len(labels))], [f"c{c}" for c in range(classes)])


def params_for(backbone="mobilenetv2", **sections):
    sections.setdefault("model", {}).update(backbone=backbone)
    return params_from_dict(tiny_params(**sections))


def configure(p):
    training.configure(p.seed, p.train)


def head(train, val, p, use_cache=True, workdir=None):
    """The head stage: on features pooled from the activations stage's output (written to
    ``workdir``), or on images with the frozen backbone running every step."""
    backbone, cut = backbone_cut(p.model, p.finetune)
    if not use_cache:
        return training.train_head(train, val, backbone, p.model, p.head, p.train, p.augment, p.seed)
    activations = compute_activations(backbone, cut, p.model.backbone, train, val, workdir / "acts")
    result = training.train_head_on_activations(activations, p.model, p.head, p.train, p.seed)
    result.activations = activations
    return result


def baseline(train, val, p):
    return training.train_baseline(train, val, p.baseline, p.train, p.augment, p.seed)


def finetune(model, train, val, p, activations=None, workdir=None):
    return training.train_finetune(model, train, val, p.finetune, p.train, p.augment, p.seed, activations, workdir)


def info(names, stage="head", backbone="mobilenetv2", size=32, tta=False):
    return ModelInfo(stage, backbone, names, size, tta)


@pytest.mark.parametrize("backbone", [pytest.param("efficientnetb0", marks=pytest.mark.slow), "mobilenetv2",
                                      pytest.param("resnet50", marks=pytest.mark.slow)])
def test_backbone_builds_trains_saves_and_reloads_in_safe_mode(backbone, tmp_path):
    params = params_for(backbone)
    configure(params)
    train, val = tiny_set(), tiny_set(seed=50)
    result = head(train, val, params, use_cache=False)
    assert result.epochs_run == 1
    path = tmp_path / f"{backbone}.keras"
    save_model(result.model, path, info(train.class_names, backbone=backbone))
    reloaded, metadata = load_model(path)
    raw = val.images[:5].astype("float32")  # raw pixels 0..255
    expected = result.model.predict(raw, verbose=0)
    got = reloaded.predict(raw, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (5, 3) and np.allclose(got.sum(axis=1), 1, atol=1e-5)
    assert metadata.class_names == ["c0", "c1", "c2"] and metadata.backbone == backbone
    # plain Keras, safe mode, in a process that imports nothing of this project
    import subprocess
    import sys

    np.save(tmp_path / "raw.npy", raw)
    code = ("import sys, keras, numpy as np; m = keras.models.load_model('model.keras', safe_mode=True); "
            "np.save('out.npy', m.predict(np.load('raw.npy'), verbose=0)); "
            "assert not [k for k in sys.modules if k.startswith('imgclf')]")
    path.rename(tmp_path / "model.keras")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_resnet50_preprocessing_equals_keras_own():
    params = params_for("resnet50")
    model = models.build_transfer_model(params.model, 3)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    got = keras.Model(model.input, model.get_layer("preprocessing").output)(x)
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
    assert not model.get_layer("preprocessing").trainable_weights


def test_head_training_leaves_the_frozen_backbone_unchanged():
    params = params_for(head={"learning_rate": 1e-2})
    train, val = tiny_set(), tiny_set(seed=50)
    configure(params)  # same seed: the same initial weights as the head's backbone
    initial = models.build_transfer_model(params.model, 3)
    configure(params)
    result = head(train, val, params, use_cache=False)
    for before, after in zip(models.find_backbone(initial).weights, models.find_backbone(result.model).weights):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    head_before = initial.get_layer("predictions").kernel.numpy()
    assert not np.array_equal(head_before, result.model.get_layer("predictions").kernel.numpy())


@pytest.mark.parametrize("cached,views", [(True, 1), pytest.param(True, 2, marks=pytest.mark.slow),
                                          pytest.param(False, 1, marks=pytest.mark.slow)])
def test_finetune_unfreezes_top_layers_but_keeps_batchnorm_statistics(cached, views, tmp_path):
    params = params_for(finetune={"unfreeze_layers": 20, "learning_rate": 1e-2, "cache_activations": cached,
                                  "cached_views": views})
    configure(params)
    train, val = tiny_set(), tiny_set(seed=50)
    trained_head = head(train, val, params, workdir=tmp_path)
    model = trained_head.model
    backbone = models.find_backbone(model)
    bn = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    stats_before = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in bn]
    top_conv = [l for l in backbone.layers[-20:] if isinstance(l, keras.layers.Conv2D)][-1]
    kernel_before = top_conv.kernel.numpy().copy()
    low_conv = [l for l in backbone.layers[:-20] if isinstance(l, keras.layers.Conv2D)][0]
    low_before = low_conv.kernel.numpy().copy()

    result = finetune(model, train, val, params, trained_head.activations if cached else None, tmp_path)

    for layer, (mean, var) in zip(bn, stats_before):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), var)
        assert not layer.trainable
    assert not np.array_equal(top_conv.kernel.numpy(), kernel_before), "unfrozen layer did not train"
    np.testing.assert_array_equal(low_conv.kernel.numpy(), low_before)
    assert result.numbers["unfrozen_layers_with_weights"] > 0
    assert result.numbers["cached_activations"] == int(cached)


def test_mixup_blends_each_example_with_its_mirror_and_repeats_on_rerun():
    from imgclf.data.datasets import batches
    from imgclf.train.augment import mixup

    count = 16
    inputs = np.random.default_rng(0).normal(size=(count, 4, 4, 2)).astype("float32")
    examples = ImageSet(inputs, np.arange(count, dtype=np.int32), [""] * count, [str(c) for c in range(count)])
    assert mixup(0.0, 1) is None

    def first_batch(mix):
        return [t.numpy() for t in next(iter(batches(examples, 8, shuffle=True, seed=3, mix=mix)))]

    plain_x, plain_y = first_batch(None)
    x, y = first_batch(mixup(0.4, 1))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.isin(y, (0.0, 1.0)).all(), "labels were not mixed"
    for i in range(8):  # each example: w * itself + (1 - w) * the example at the mirrored place
        mine, theirs = plain_y[i].argmax(), plain_y[7 - i].argmax()  # one class per example
        w = y[i, mine]
        np.testing.assert_allclose(y[i, theirs], 1 - w, atol=1e-6)
        np.testing.assert_allclose(x[i], w * plain_x[i] + (1 - w) * plain_x[7 - i], atol=1e-5)
    again_x, again_y = first_batch(mixup(0.4, 1))
    np.testing.assert_array_equal(x, again_x)
    np.testing.assert_array_equal(y, again_y)


def test_backbone_split_is_exact_and_shares_layers():
    params = params_for()
    model = models.build_transfer_model(params.model, 3)
    backbone = models.find_backbone(model)
    bottom, top, first = models.split_backbone(backbone, 30)
    assert first <= len(backbone.layers) - 30
    x = tiny_set().images[:4].astype("float32")
    extractor = models.bottom_extractor(model, bottom)
    classifier = models.top_classifier(model, top)
    np.testing.assert_allclose(classifier(extractor(x)), model(x), rtol=1e-5, atol=1e-6)
    assert top.layers[1] is backbone.layers[first]


def test_pooled_features_of_every_split_are_the_whole_backbones_and_a_store_of_their_own(tmp_path):
    """The activations stage writes each split's pooled features once: train and val through the
    frozen top from their cached activations, test through the whole backbone; the same numbers
    as the whole backbone on the images, readable without TensorFlow as a store."""
    from imgclf.data.store import open_split, read_info
    from imgclf.train.activations import FEATURES

    params = params_for()
    train, val, test = tiny_set(), tiny_set(seed=50), tiny_set(n_per_class=3, seed=90)
    backbone, cut = backbone_cut(params.model, params.finetune)
    acts = compute_activations(backbone, cut, params.model.backbone, train, val, tmp_path / "acts", test)
    whole = models.image_extractor(params.model.backbone, backbone, 32)
    for split, images in (("train", train), ("val", val), ("test", test)):
        expected = whole.predict(images.images.astype("float32"), verbose=0).mean(axis=(1, 2))
        stored = open_split(tmp_path / "acts" / FEATURES, split, 32)
        assert stored.paths == images.paths and list(stored.labels) == list(images.labels)
        np.testing.assert_allclose(stored.read(np.arange(len(stored))), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(acts.features[split].read(np.arange(len(stored))),
                                      stored.read(np.arange(len(stored))))
    info = read_info(tmp_path / "acts" / FEATURES)
    assert info["backbone"] == "mobilenetv2" and info["splits"] == {"train": 24, "val": 24, "test": 9}
    assert {"pooled_top", "bottom"} <= set(info["runtime"])
    assert sorted(p.name for p in (tmp_path / "acts" / FEATURES).glob("*.npy")) == ["test.npy", "train.npy", "val.npy"]


@pytest.mark.slow
def test_cached_feature_head_matches_the_uncached_path(tmp_path):
    """Features pooled from the cached activations through the frozen top train the same head
    as running the whole frozen backbone on the images every step."""
    params = params_for(model={"dropout": 0.0}, head={"epochs": 3, "patience": 0, "learning_rate": 1e-2})
    train, val = tiny_set(n_per_class=10), tiny_set(seed=50)
    configure(params)
    cached = head(train, val, params, use_cache=True, workdir=tmp_path)
    configure(params)
    uncached = head(train, val, params, use_cache=False)
    assert cached.numbers["cached_features"] == 1 and uncached.numbers["cached_features"] == 0
    np.testing.assert_allclose(cached.history["loss"], uncached.history["loss"], rtol=2e-3)
    np.testing.assert_allclose(cached.history["val_loss"], uncached.history["val_loss"], rtol=2e-3)
    # same kind of model: the full image model, predicting the same
    assert [l.name for l in cached.model.layers] == [l.name for l in uncached.model.layers]
    np.testing.assert_allclose(cached.model.predict(val.images[:4].astype("float32"), verbose=0),
                               uncached.model.predict(val.images[:4].astype("float32"), verbose=0),
                               rtol=1e-3, atol=1e-4)


def test_baseline_learns_colour_classes():
    params = params_for(baseline={"epochs": 8, "patience": 0, "learning_rate": 3e-3},
                        augment={"rotation": 0.0, "zoom": 0.0, "contrast": 0.0})
    configure(params)
    train, val = tiny_set(n_per_class=16), tiny_set(seed=70)
    result = baseline(train, val, params)
    assert result.epochs_run == 8
    assert result.history["accuracy"][-1] > result.history["accuracy"][0]
    assert max(result.history["val_accuracy"]) >= 0.6
    assert "learning_rate" in result.history
    summary = result.summary()
    assert summary["params_trainable"] > 0 and 1 <= summary["best_epoch"] <= 8


def test_baseline_cosine_schedule_decays_to_zero_and_stem_stride_halves_the_map():
    params = params_for(baseline={"epochs": 4, "patience": 0, "lr_schedule": "cosine", "learning_rate": 0.01,
                                  "stem_stride": 2, "filters": [8, 16]})
    configure(params)
    result = baseline(tiny_set(), tiny_set(seed=60), params)
    rates = result.history["learning_rate"]  # the rate after each epoch's last step
    assert rates == sorted(rates, reverse=True) and rates[0] < 0.01 and rates[-1] == pytest.approx(0, abs=1e-9)
    assert result.model.get_layer("block0_conv0").output.shape[1:3] == (16, 16)  # 32 px input
    constant = params_for(baseline={"epochs": 2, "patience": 0, "lr_schedule": "constant", "learning_rate": 0.01,
                                    "stem_stride": 1, "filters": [8, 16]})
    result = baseline(tiny_set(), tiny_set(seed=60), constant)
    assert result.history["learning_rate"] == pytest.approx([0.01, 0.01])
    assert result.model.get_layer("block0_conv0").output.shape[1:3] == (32, 32)


def test_finetune_cosine_schedule_warms_up_then_decays_to_zero_with_mixup(tmp_path):
    params = params_for(finetune={"unfreeze_layers": 20, "learning_rate": 1e-3, "epochs": 4, "patience": 0,
                                  "lr_schedule": "cosine", "warmup_epochs": 1, "mixup": 0.4})
    configure(params)
    train, val = tiny_set(), tiny_set(seed=50)
    trained_head = head(train, val, params, workdir=tmp_path)
    result = finetune(trained_head.model, train, val, params, trained_head.activations, tmp_path)
    rates = result.history["learning_rate"]  # the rate after each epoch's last step
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(0, abs=1e-9)
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 4
    assert training.finetune_rules(params.finetune).reduce_lr_patience == 0
    assert np.isfinite(result.history["loss"]).all()


def test_random_square_crop_keeps_size_and_a_large_part_of_each_image():
    from imgclf.train.augment import RandomSquareCrop

    size, crop = 32, 0.25
    columns = np.tile(np.arange(size, dtype=np.float32), (size, 1))  # pixel value = column index
    images = np.repeat(np.stack([columns] * 3, axis=-1)[None], 64, axis=0)
    layer = RandomSquareCrop(crop, seed=1)
    out = np.asarray(layer(images, training=True))
    assert out.shape == images.shape and out.dtype == np.float32
    spans = out[:, 0, -1, 0] - out[:, 0, 0, 0]  # columns covered by each crop
    assert (spans >= (1 - crop) * (size - 1) - 1e-3).all() and (spans <= size - 1 + 1e-3).all()
    assert len(np.unique(np.round(out[:, 0, 0, 0], 3))) > 10  # random place per image
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    uint8 = np.asarray(layer(images.astype(np.uint8), training=True))
    assert uint8.dtype == np.uint8 and uint8.shape == images.shape


def test_split_images_load_with_class_names(tmp_path):
    from conftest import make_folder

    make_folder(tmp_path / "split" / "train", classes=2, per_class=3)
    subset = load_subset(tmp_path / "split", "train", 16, ["class_0", "class_1"])
    assert subset.images.shape == (6, 16, 16, 3) and list(subset.labels) == [0, 0, 0, 1, 1, 1]


def test_separable_baseline_saves_reloads_and_explains(tmp_path):
    from imgclf.serve.gradcam import gradcam

    params = params_for(baseline={"separable": True, "convs_per_block": 2, "filters": [8, 16, 32]})
    model = models.build_baseline(params.baseline, 3)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("SeparableConv2D") == 4 and kinds.count("Conv2D") == 2
    save_model(model, tmp_path / "b.keras", info(["a", "b", "c"], "baseline", "baseline_cnn"))
    reloaded, _ = load_model(tmp_path / "b.keras")
    x = tiny_set().images[:3].astype("float32")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    heat, _ = gradcam(reloaded, x)
    assert heat.shape == (3, 32, 32)


def test_summary_reports_the_kept_epoch_not_maxima_over_epochs():
    """The checkpoint keeps the lowest val_loss; the metrics must describe that epoch."""
    history = {"loss": [1.0, 0.6, 0.3, 0.1], "val_loss": [0.9, 0.5, 0.7, 0.8],
               "accuracy": [0.5, 0.7, 0.9, 0.99], "val_accuracy": [0.6, 0.8, 0.85, 0.84]}
    model = models.build_baseline(params_for().baseline, 3)
    summary = training.TrainResult(model, history, 1.0).summary()
    assert summary["best_epoch"] == 2
    assert (summary["train_accuracy"], summary["val_accuracy"]) == (0.7, 0.8)
    assert (summary["train_loss"], summary["val_loss"]) == (0.6, 0.5)
    assert "best_val_accuracy" not in summary and "best_train_accuracy" not in summary


def test_the_kept_weights_are_those_of_the_reported_epoch():
    params = params_for(baseline={"epochs": 4, "patience": 0, "learning_rate": 0.05, "lr_schedule": "constant"})
    configure(params)
    train, val = tiny_set(), tiny_set(seed=50)
    result = baseline(train, val, params)
    summary = result.summary()
    result.model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.train.label_smoothing))
    from imgclf.data.datasets import batches

    loss = result.model.evaluate(batches(val, 8), verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(summary["val_loss"], rel=1e-4)


def test_finetune_members_train_apart_and_serve_as_one_calibrated_model(tmp_path):
    """``finetune.members: 2``: two tops trained from the same head, one image model averaging their
    probabilities over the shared frozen bottom; calibration folds one temperature into both; the
    saved file loads in safe mode and predicts the same; Grad-CAM explains it."""
    from imgclf.serve.gradcam import gradcam, split_at_feature_map
    from imgclf.serve.inference import ensemble_members
    from imgclf.train import calibration

    params = params_for(finetune={"unfreeze_layers": 20, "learning_rate": 1e-2, "epochs": 2, "members": 2})
    configure(params)
    train, val = tiny_set(), tiny_set(seed=50)
    trained_head = head(train, val, params, workdir=tmp_path)
    result = finetune(trained_head.model, train, val, params, trained_head.activations, tmp_path)

    model = result.model
    assert [layer.name for layer in model.layers][1:] == ["preprocessing", "backbone_bottom", "ensemble"]
    first, second = ensemble_members(model)
    assert [first.name, second.name] == ["member_1", "member_2"]
    assert not any(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights())
                   if a.ndim == 4), "the members' unfrozen convolutions should differ"
    assert result.numbers["members"] == 2 and result.numbers["member2_epochs_run"] == 2
    assert 0 <= result.numbers["ensemble_val_accuracy"] <= 1
    x = val.images[:6].astype("float32")
    bottom = model.get_layer("backbone_bottom")
    acts = bottom(model.get_layer("preprocessing")(x))
    np.testing.assert_allclose(model(x), (first(acts) + second(acts)) / 2, rtol=1e-5, atol=1e-6)

    before = [calibration.logits(m, trained_head.activations.val) for m in (first, second)]
    temperature = training.calibrate_result(result, True)
    assert temperature != 1.0
    for member, z in zip((first, second), before):  # one T folded into each member, once
        np.testing.assert_allclose(calibration.logits(member, trained_head.activations.val), z / temperature,
                                   rtol=1e-4, atol=1e-4)
    expected = calibration.probabilities([calibration.logits(m, trained_head.activations.val)
                                          for m in (first, second)])
    np.testing.assert_allclose(model.predict(val.images.astype("float32"), verbose=0), expected, atol=1e-5)

    path = tmp_path / "finetune.keras"
    save_model(model, path, info(train.class_names, stage="finetune"))
    reloaded, _ = load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert split_at_feature_map(reloaded)[0][-1].name == "backbone_bottom"  # the map both members see
    heatmaps, probs = gradcam(reloaded, x)
    assert heatmaps.shape == (6, 32, 32) and np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_finetune_members_need_the_cached_activations():
    from imgclf.params import ParamsError

    with pytest.raises(ParamsError, match="finetune.members"):
        params_for(finetune={"members": 2, "cache_activations": False})


def test_member_numbers_name_the_member_and_its_kept_epoch():
    history = {"val_loss": [0.9, 0.5, 0.7], "val_accuracy": [0.6, 0.8, 0.9]}
    assert training.member_numbers(history, 1) == {"member2_epochs_run": 3, "member2_best_epoch": 2,
                                                   "member2_val_accuracy": 0.8}
    assert training.member_numbers({}, 1) == {}  # finetune.epochs: 0
