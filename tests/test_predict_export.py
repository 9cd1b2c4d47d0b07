"""The predict command and the export formats, on a tiny trained model."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from imgclf import models, training
from imgclf.datasets import to_dataset
from imgclf.export import export_all, saved_model_predictor, tflite_predictor
from imgclf.modelio import save_model
from imgclf.params import params_from_dict
from imgclf.predict import main as predict_main
from imgclf.predict import predict_files
from conftest import COLORS, make_image, tiny_params

NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    params = params_from_dict(tiny_params())
    training.configure(params)
    images = np.stack([make_image(c * 100 + i, COLORS[c], 32) for c in range(3) for i in range(16)])
    labels = np.repeat(np.arange(3), 16)
    model = models.build_transfer_model(params.model, 3)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(to_dataset(images, labels, 3, 8, shuffle=True), epochs=2, verbose=0)
    path = tmp_path_factory.mktemp("model") / "finetune.keras"
    save_model(model, path, {"class_names": NAMES, "image_size": 32, "stage": "finetune"})
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


def test_missing_model_is_a_usage_error(tmp_path, capsys):
    assert predict_main([str(tmp_path), "--model", str(tmp_path / "none.keras")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_exported_formats_match_keras(trained, tmp_path):
    model, _ = trained
    images = np.stack([make_image(50 + i, COLORS[i % 3], 32) for i in range(6)]).astype(np.float32)
    report = export_all(model, NAMES, 32, tmp_path / "export", "float16", images)
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
