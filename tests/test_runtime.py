"""The inference runtime: LiteRT on a CPU, converted once and checked against Keras, Keras where
it cannot convert or a pass is too small to repay a conversion, and no wrong answer ever."""
import numpy as np
import pytest
from conftest import COLORS, make_image, tiny_params

from imgclf.data.datasets import ImageSet
from imgclf.errors import StageError
from imgclf.model import models
from imgclf.params import params_from_dict
from imgclf.serve import inference
from imgclf.serve.inference import ParityError, predict_probs, runner, runner_for
from imgclf.train import training
from imgclf.train.activations import compute_outputs


@pytest.fixture(scope="module")
def classifier():
    """A random-weight MobileNetV2 classifier and a random-weight CNN at 32 px, and images."""
    params = params_from_dict(tiny_params())
    training.configure(params.seed, params.train)
    model = models.build_transfer_model(params.model, 3)
    cnn = models.build_baseline(params.baseline, 3)
    images = np.stack([make_image(c * 100 + i, COLORS[c], 32) for c in range(3) for i in range(12)])
    return model, cnn, images


def test_litert_serves_what_keras_computes_and_converts_once(classifier, litert_cache, monkeypatch):
    model, cnn, images = classifier
    monkeypatch.setenv(inference.RUNTIME_ENV, "litert")
    first = runner(model, len(images), images)
    assert first.runtime == "litert" and first.report["convert_seconds"] > 0
    assert first.report["parity"]["images"] == inference.PARITY_IMAGES
    assert first.report["parity"]["max_abs_diff"] <= 1e-4 and first.report["parity"]["top1_agreement"] == 1.0
    assert len(list(litert_cache.glob("*.tflite"))) == 1
    again = runner(model, len(images), images)  # a second pass (another stage) reuses the file
    assert again.runtime == "litert" and again.report["convert_seconds"] == 0
    assert len(list(litert_cache.glob("*.tflite"))) == 1
    for tta, net in ((False, model), (True, cnn)):  # tta: the mirror images through LiteRT too
        keras_probs = net.predict(images.astype(np.float32), verbose=0)
        if tta:
            keras_probs = (keras_probs + net.predict(images[:, :, ::-1].astype(np.float32), verbose=0)) / 2
        got = predict_probs(net, images, tta=tta)
        np.testing.assert_allclose(got, keras_probs, atol=1e-4)
        assert (got.argmax(1) == keras_probs.argmax(1)).all()


def test_feature_passes_stream_litert_outputs_to_disk(classifier, tmp_path, monkeypatch):
    model, _, images = classifier
    monkeypatch.setenv(inference.RUNTIME_ENV, "litert")
    extractor = models.bottom_extractor(model, models.split_backbone(models.find_backbone(model), 5)[0])
    examples = ImageSet(images, np.repeat(np.arange(3), 12), [f"{i}.jpg" for i in range(36)], ["a", "b", "c"])
    run = runner_for(extractor, examples)
    stored = compute_outputs(run, examples, tmp_path / "acts.npy")
    expected = extractor.predict(images.astype(np.float32), verbose=0)
    got = stored.read(np.arange(len(stored)))
    assert run.runtime == "litert" and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert "top1_agreement" not in run.report["parity"]  # activations, not class probabilities


def test_small_passes_stay_on_keras_unless_converted(classifier, litert_cache, monkeypatch):
    """With a cache of its own: other tests convert models equal to this one."""
    model, _, images = classifier
    monkeypatch.delenv(inference.RUNTIME_ENV, raising=False)
    small = runner(model, 10, images)
    assert small.runtime == "keras" and "fewer than 256" in small.report["why"]
    assert runner(model, 1000, images).runtime == "litert"  # large: converted
    assert runner(model, 10, images).runtime == "litert"  # now in the cache: any pass uses it
    monkeypatch.setenv(inference.RUNTIME_ENV, "keras")
    assert runner(model, 1000, images).report == {"runtime": "keras", "why": "IMGCLF_RUNTIME=keras"}
    monkeypatch.setenv(inference.RUNTIME_ENV, "fast")
    with pytest.raises(StageError, match="IMGCLF_RUNTIME='fast'"):
        runner(model, 10, images)


def test_a_model_litert_cannot_convert_runs_on_keras_with_one_warning(classifier, monkeypatch, capsys):
    import keras
    import tensorflow as tf

    class HostOp(keras.layers.Layer):  # a Python function inside the graph: no SavedModel, no TFLite
        def call(self, x):
            y = tf.numpy_function(lambda a: a * 2, [x], tf.float32)
            return tf.ensure_shape(y, x.shape)

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(HostOp()(inputs)), name="host_op_net")
    monkeypatch.setenv(inference.RUNTIME_ENV, "litert")
    _, _, images = classifier
    run = runner(model, 1000, images)
    warning = capsys.readouterr().err.strip().splitlines()
    assert run.runtime == "keras" and "LiteRT conversion failed" in run.report["why"]
    assert len(warning) == 1 and warning[0].startswith("warning: LiteRT cannot run host_op_net (")
    assert warning[0].endswith("; it runs on Keras")
    np.testing.assert_allclose(run(images[:4]), images[:4].astype(np.float32).mean(axis=(1, 2)) * 2, rtol=1e-5)


def test_a_converted_model_that_disagrees_stops_the_pass_naming_both_numbers(classifier, litert_cache,
                                                                            monkeypatch):
    model, cnn, images = classifier
    monkeypatch.setenv(inference.RUNTIME_ENV, "litert")
    runner(cnn, len(images), images)
    # a cache entry holding another network's conversion (a damaged or stale cache)
    other = next(litert_cache.glob("*.tflite"))
    target = litert_cache / f"{inference.fingerprint(model)}.tflite"
    target.write_bytes(other.read_bytes())
    with pytest.raises(ParityError, match=r"LiteRT's conversion of .* disagrees with Keras on 16 images: "
                                          r"max \|difference\| [0-9.e-]+ > 0.0001") as caught:
        runner(model, len(images), images)
    assert "IMGCLF_RUNTIME=keras" in str(caught.value)


def test_the_fingerprint_names_architecture_and_weights(classifier):
    model, _, _ = classifier
    params = params_from_dict(tiny_params())
    same = models.build_transfer_model(params.model, 3)
    same.set_weights(model.get_weights())
    assert inference.fingerprint(same) == inference.fingerprint(model)
    weights = same.get_weights()
    weights[-1] = weights[-1] + 1e-3
    same.set_weights(weights)
    assert inference.fingerprint(same) != inference.fingerprint(model)


def test_a_saved_models_recorded_conversion_serves_it_without_tensorflow(classifier, litert_cache, tmp_path,
                                                                         monkeypatch):
    """The first pass over a saved file loads Keras, converts and records the conversion; the next
    serves that file on LiteRT alone (a new process imports no TensorFlow) with the same outputs;
    a file whose bytes changed, or IMGCLF_RUNTIME=keras, goes back to Keras."""
    import subprocess
    import sys

    from imgclf.model.modelio import ModelInfo, save_model
    from imgclf.serve.saved import load_runner

    model, _, images = classifier
    path = tmp_path / "finetune.keras"
    save_model(model, path, ModelInfo("finetune", "mobilenetv2", ["a", "b", "c"], 32, tta=True))
    monkeypatch.delenv(inference.RUNTIME_ENV, raising=False)
    first = load_runner(path, 1000, images)
    assert first.model is not None and first.runtime == "litert" and first.report["convert_seconds"] > 0
    assert first.parameters == model.count_params()
    again = load_runner(path, 10, images)  # a small pass: the recorded file serves it
    assert again.model is None and again.runtime == "litert" and again.parameters == model.count_params()
    assert again.report["parity"] == first.report["parity"] and again.report["parity_checked"] == "when converted"
    np.testing.assert_array_equal(predict_probs(again, images, tta=True), predict_probs(first, images, tta=True))
    assert predict_probs(again, images[:0], tta=True).shape == (0, 3)

    probe = (f"import sys, numpy as np; from imgclf.serve.saved import load_runner; "
             f"run = load_runner(__import__('pathlib').Path({str(path)!r}), 10, np.zeros((1, 32, 32, 3))); "
             f"print(run.runtime, run.model is None, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["litert", "True", "False", "False"], out.stderr

    monkeypatch.setenv(inference.RUNTIME_ENV, "keras")
    assert load_runner(path, 1000, images).runtime == "keras"
    monkeypatch.delenv(inference.RUNTIME_ENV)
    with open(path, "ab") as handle:  # other bytes: no record of this file, Keras loads it again
        handle.write(b"\0")
    assert load_runner(path, 1000, images).model is not None
