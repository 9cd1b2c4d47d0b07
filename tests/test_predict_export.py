"""The predict command and the export formats, on a tiny trained model."""
import io
import json

import numpy as np
import pytest
from conftest import COLORS, make_image, tiny_params
from PIL import Image

from imgclf.data.datasets import ImageSet, batches
from imgclf.model import models
from imgclf.model.modelio import ModelInfo, save_model
from imgclf.params import params_from_dict
from imgclf.predict import main as predict_main
from imgclf.predict import predict_files
from imgclf.serve.export import export_all, saved_model_predictor, tflite_predictor
from imgclf.serve.inference import inference_batch_size, predict_probs
from imgclf.train import training

NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    params = params_from_dict(tiny_params())
    training.configure(params.seed, params.train)
    images = np.stack([make_image(c * 100 + i, COLORS[c], 32) for c in range(3) for i in range(16)])
    labels = np.repeat(np.arange(3), 16)
    model = models.build_transfer_model(params.model, 3)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(batches(ImageSet(images, labels, [], ["a", "b", "c"]), 8, shuffle=True), epochs=2, verbose=0, shuffle=False)
    folder = tmp_path_factory.mktemp("model")
    path = folder / "finetune.keras"
    save_model(model, path, ModelInfo("finetune", "mobilenetv2", NAMES, 32, tta=False))
    return model, path


@pytest.fixture(scope="module")
def asymmetric(tmp_path_factory):
    """A model whose output changes when the image is mirrored (a random-weight CNN: the tiny
    trained MobileNetV2 above is nearly constant at 32 px), saved with tta on."""
    params = params_from_dict(tiny_params())
    training.configure(params.seed, params.train)
    model = models.build_baseline(params.baseline, 3)
    path = tmp_path_factory.mktemp("tta") / "tta.keras"
    save_model(model, path, ModelInfo("baseline", "baseline_cnn", NAMES, 32, tta=True))
    return model, path


def write_inputs(folder):
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(make_image(1, COLORS[0], 50)).save(folder / "a.jpg")
    Image.fromarray(make_image(2, COLORS[1], 40)).convert("L").save(folder / "nested" / "gray.png")
    Image.fromarray(make_image(3, COLORS[2], 64)).convert("CMYK").save(folder / "nested" / "cmyk.jpg")
    rgba = np.dstack([make_image(4, COLORS[2], 30), np.full((30, 30), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    return 4


def test_json_output_has_one_line_per_valid_image(trained, tmp_path):
    _, path = trained
    valid = write_inputs(tmp_path / "in")
    out, err = io.StringIO(), io.StringIO()
    status = predict_files(path, [str(tmp_path / "in")], k=2, as_json=True, out=out, err=err)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == valid and status == 1
    for line in lines:
        assert set(line) == {"path", "top_k"} and len(line["top_k"]) == 2
        confidences = [r["confidence"] for r in line["top_k"]]
        assert confidences == sorted(confidences, reverse=True)
        assert {r["label"] for r in line["top_k"]} <= set(NAMES)  # names from the model metadata
    assert "notes.txt" in err.getvalue() and "broken.jpg" in err.getvalue()
    assert "2 file(s) skipped" in err.getvalue()


def test_table_output_and_clean_exit_for_good_files(trained, tmp_path, capsys):
    _, path = trained
    Image.fromarray(make_image(5, COLORS[0], 32)).save(tmp_path / "one.jpg")
    status = predict_main([str(tmp_path / "one.jpg"), "--model", str(path), "--top-k", "3"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert out[0].split("\t") == ["path", "top1", "top2", "top3"]
    assert out[1].startswith(str(tmp_path / "one.jpg")) and len(out[1].split("\t")) == 4


def test_predictions_match_the_model(trained, tmp_path):
    model, path = trained
    image = make_image(7, COLORS[1], 32)
    Image.fromarray(image).save(tmp_path / "x.png")
    out = io.StringIO()
    predict_files(path, [str(tmp_path / "x.png")], k=3, as_json=True, out=out, err=io.StringIO())
    result = json.loads(out.getvalue())
    expected = model.predict(image[None].astype(np.float32), verbose=0)[0]
    assert result["top_k"][0]["label"] == NAMES[int(expected.argmax())]
    assert result["top_k"][0]["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_cpu_inference_batches_keep_a_batch_of_pixels_small(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [])  # a CPU-only machine
    assert inference_batch_size((224, 224, 3)) == 4
    assert inference_batch_size((96, 96, 3)) == 21
    assert inference_batch_size((7, 7, 160)) == 64
    assert inference_batch_size((1280,)) == 64
    assert inference_batch_size((1024, 1024, 3)) == 1
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["/device:GPU:0"])
    assert inference_batch_size((224, 224, 3)) == 64


def test_the_inference_batch_size_does_not_change_predictions(trained):
    model, _ = trained
    images = np.stack([make_image(i, COLORS[i % 3], 32) for i in range(11)])
    by_default = predict_probs(model, images, tta=False)
    for batch_size in (1, 4, 64):
        np.testing.assert_allclose(predict_probs(model, images, tta=False, batch_size=batch_size), by_default,
                                   atol=1e-6)


def test_missing_model_is_a_usage_error(tmp_path, capsys):
    assert predict_main([str(tmp_path), "--model", str(tmp_path / "none.keras")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and str(tmp_path / "none.keras") in err


@pytest.mark.parametrize("kind", ["text", "no_metadata", "old_metadata"])
def test_a_bad_model_file_is_one_line_naming_it(trained, tmp_path, kind, capsys):
    import zipfile

    model, good = trained
    bad = tmp_path / "bad.keras"
    if kind == "text":
        bad.write_text("not a model")
        expected = "not a .keras model file"
    elif kind == "no_metadata":
        model.save(bad)
        expected = "has no imgclf.json"
    else:
        model.save(bad)
        with zipfile.ZipFile(bad, "a") as archive:
            archive.writestr("imgclf.json", json.dumps({"class_names": NAMES, "image_size": 32}))
        expected = "lacks stage, backbone, tta"
    image = tmp_path / "x.png"
    Image.fromarray(make_image(1, COLORS[0], 32)).save(image)
    assert predict_main([str(image), "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {bad}: ") and expected in lines[0], lines[0]


def test_predict_serves_test_time_augmentation_when_the_model_says_so(asymmetric, tmp_path):
    model, tta_path = asymmetric
    image = make_image(8, COLORS[2], 32)
    image[:, :16] = 0  # not symmetric: the mirrored image gives other probabilities
    Image.fromarray(image).save(tmp_path / "x.png")
    out = io.StringIO()
    predict_files(tta_path, [str(tmp_path / "x.png")], k=3, as_json=True, out=out, err=io.StringIO())
    served = {r["label"]: r["confidence"] for r in json.loads(out.getvalue())["top_k"]}
    plain = model.predict(image[None].astype(np.float32), verbose=0)[0]
    mirrored = model.predict(image[None, :, ::-1].astype(np.float32), verbose=0)[0]
    assert not np.allclose(plain, mirrored, atol=1e-4)
    for i, name in enumerate(NAMES):
        assert served[name] == pytest.approx((plain[i] + mirrored[i]) / 2, abs=1e-5)


@pytest.mark.slow
def test_exported_formats_match_keras(trained, tmp_path):
    model, _ = trained
    images = np.stack([make_image(50 + i, COLORS[i % 3], 32) for i in range(6)]).astype(np.float32)
    report = export_all(model, ModelInfo("finetune", "mobilenetv2", NAMES, 32, tta=False),
                        tmp_path / "export", "float16", images)
    assert (tmp_path / "export" / "saved_model" / "saved_model.pb").exists()
    assert json.loads((tmp_path / "export" / "class_names.json").read_text())["class_names"] == NAMES
    reference = model.predict(images, verbose=0)
    np.testing.assert_allclose(saved_model_predictor(tmp_path / "export" / "saved_model")(images),
                               reference, atol=1e-5)
    np.testing.assert_allclose(tflite_predictor(tmp_path / "export" / "model_float32.tflite")(images),
                               reference, atol=1e-4)
    assert report["tflite_float16"]["max_abs_diff_vs_keras"] < 0.02
    assert report["tflite_float16"]["size_mb"] < report["tflite_float32"]["size_mb"]
    for fmt in ("saved_model", "tflite_float32", "tflite_float16"):
        assert report[fmt]["latency_ms"] > 0 and report[fmt]["top1_agreement"] >= 0.8
    # both TFLite files come from one converter: the float32 file is what a converter of its own writes
    import tensorflow as tf

    alone = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "export" / "saved_model")).convert()
    assert (tmp_path / "export" / "model_float32.tflite").read_bytes() == alone


def test_export_with_tta_serves_what_evaluate_measured(asymmetric, tmp_path):
    model, _ = asymmetric
    images = np.stack([make_image(60 + i, COLORS[i % 3], 32) for i in range(4)]).astype(np.float32)
    images[:, :, :10] = 0
    report = export_all(model, ModelInfo("finetune", "mobilenetv2", NAMES, 32, tta=True),
                        tmp_path / "export", "none", images)
    expected = predict_probs(model, images, tta=True)
    assert not np.allclose(expected, predict_probs(model, images, tta=False), atol=1e-4)
    np.testing.assert_allclose(saved_model_predictor(tmp_path / "export" / "saved_model")(images),
                               expected, atol=1e-5)
    assert report["tflite_float32"]["max_abs_diff_vs_keras"] < 1e-4
