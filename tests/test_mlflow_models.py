"""MLflow as a user meets it: a training experiment, curves while a stage trains, models with a
signature, registered, and served by `mlflow models serve` in a process that imports nothing of
this project."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import COLORS, answers, free_port, make_image, stop, tiny_params, wait_until

from imgclf.model import models
from imgclf.model.modelio import ModelInfo, save_model
from imgclf.params import params_from_dict
from imgclf.track.model_packaging import log_served_model
from imgclf.track.tracking import stage_run
from imgclf.train import training


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-models")
    return uri


def test_epochs_are_logged_while_training_and_the_experiment_is_a_training_one(store, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_training import tiny_set

    params = params_from_dict(tiny_params(baseline={"epochs": 3, "patience": 0}))
    client = MlflowClient(store)
    seen = []
    with stage_run("baseline", params, tmp_path) as run:
        def log_and_look(epoch, logs):
            run.log_epoch(epoch, logs)
            seen.append(len(client.get_metric_history(run.run_id, "val_loss")))  # visible at once

        training.configure(params.seed, params.train)
        training.train_baseline(tiny_set(), tiny_set(seed=50), params.baseline, params.train, params.augment,
                                params.seed, on_epoch=log_and_look)
    assert seen == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.run_id, "learning_rate")] == [0, 1, 2]
    experiment = client.get_experiment_by_name("image-classification")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def bad_images(folder) -> list[tuple[str, str]]:
    """Request rows that are no good image, base64-encoded as a client sends them, and the start of
    what the served model must answer for each: a text file, a truncated JPEG, a decompression bomb
    (100 megapixels of one colour: a small PNG), and something that is not base64."""
    import base64
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(make_image(1, COLORS[0], 64)).save(jpeg, "JPEG", quality=90)
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")
    encoded = [base64.b64encode(data).decode() for data in (b"just some text", jpeg.getvalue()[:400], bomb.getvalue())]
    return [(encoded[0], "not an image"), (encoded[1], "corrupt or truncated image"),
            (encoded[2], "image too large"), ("%%% not base64 %%%", "not a base64-encoded image file")]


def served(tmp_path, monkeypatch, runtime: str):
    """The served model (imgclf/track/mlflow_model.py) loaded as MLflow loads it, over a tiny saved
    model and the LiteRT file that logging it ships."""
    from types import SimpleNamespace

    from imgclf.data import images
    from imgclf.track.model_packaging import served_litert_file

    monkeypatch.setitem(sys.modules, "imgclf_images", images)  # the copy shipped in the model's code folder
    monkeypatch.setenv("IMGCLF_RUNTIME", runtime)
    from imgclf.track.mlflow_model import ImageClassifier

    path = tmp_path / "finetune.keras"
    if not path.exists():
        training.configure(0, params_from_dict(tiny_params()).train)
        model = models.build_transfer_model(params_from_dict(tiny_params()).model, 3)
        save_model(model, path, ModelInfo("finetune", "mobilenetv2", ["a", "b", "c"], 32, True))
    litert = served_litert_file(path, make_image(3, COLORS[0], 32)[None])
    assert litert is not None and litert.suffix == ".tflite"
    classifier = ImageClassifier()
    classifier.load_context(SimpleNamespace(artifacts={"keras_model": str(path), "litert_model": str(litert)}))
    return classifier


@pytest.mark.slow
def test_the_served_model_answers_every_good_row_and_names_each_bad_one(tmp_path, monkeypatch):
    """One undecodable image does not fail the request: its row says why; the others are answered,
    on LiteRT as `predict` runs, within the parity tolerance of Keras."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from imgclf.serve.inference import PARITY_TOLERANCE

    good = io.BytesIO()
    Image.fromarray(make_image(2, COLORS[1], 48)).save(good, "PNG")
    bad = bad_images(None)
    rows = [base64.b64encode(good.getvalue()).decode(), *(value for value, _ in bad), good.getvalue()]
    on_litert = served(tmp_path, monkeypatch, "auto")
    assert on_litert.interpreter is not None and on_litert.model is None
    answer = on_litert.predict(None, pd.DataFrame({"image": rows}))
    assert list(answer.columns) == ["label", "error", "a", "b", "c"]
    assert list(answer["error"][[0, 5]]) == ["", ""] and answer["label"][0] in ("a", "b", "c")
    np.testing.assert_allclose(answer.loc[0, ["a", "b", "c"]].sum(), 1.0, atol=1e-5)
    for i, (_, reason) in enumerate(bad, start=1):
        assert answer["error"][i].startswith(reason) and answer["label"][i] == ""
        assert answer.loc[i, ["a", "b", "c"]].isna().all()
    on_keras = served(tmp_path, monkeypatch, "keras")
    assert on_keras.interpreter is None and on_keras.model is not None
    keras_answer = on_keras.predict(None, pd.DataFrame({"image": rows}))
    assert list(keras_answer["label"]) == list(answer["label"])
    np.testing.assert_allclose(keras_answer.loc[[0, 5], ["a", "b", "c"]], answer.loc[[0, 5], ["a", "b", "c"]],
                               atol=PARITY_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_registered_model_is_served_by_mlflow_models_serve(store, tmp_path, backbone):
    import base64

    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from imgclf.data.images import decode_rgb
    from imgclf.serve.inference import PARITY_TOLERANCE, predict_probs

    raw = tiny_params()
    raw["model"].update(backbone=backbone)
    params = params_from_dict(raw)
    training.configure(params.seed, params.train)
    model = models.build_transfer_model(params.model, 3)
    path = tmp_path / "finetune.keras"
    names = ["daisy", "roses", "tulips"]
    save_model(model, path, ModelInfo("finetune", backbone, names, 32, True))
    with stage_run("finetune", params, tmp_path) as run:
        version = log_served_model(run, path, "finetune", make_image(3, COLORS[1], 32)[None], register_as="flowers")
    client = MlflowClient(store)
    assert version == "1"
    registered = client.get_model_version("flowers", "1")
    assert registered.tags == {"dvc_exp_name": "exp-models", "git_commit": registered.tags["git_commit"]}
    logged = mlflow.models.get_model_info("models:/flowers/1")
    assert logged.signature.inputs.input_names() == ["image"]
    assert logged.signature.outputs.input_names() == ["label", "error", *names]
    assert logged.saved_input_example_info is not None  # an input example, shown in the UI

    # a photo file larger than the model's input, sent as a user would: its bytes, base64; then rows
    # that are no good image, in the same request
    photo = tmp_path / "photo.jpg"
    Image.fromarray(make_image(7, COLORS[2], 80)).save(photo, quality=90)
    bad_rows = bad_images(tmp_path)
    port = free_port()
    # every process of the server starts with this project's package made unimportable
    blocker = tmp_path / "no_imgclf"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['imgclf'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "MLFLOW_TRACKING_URI": store}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/flowers/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/ping"), "mlflow models serve", server, timeout=180)
        rows = [{"image": base64.b64encode(photo.read_bytes()).decode()}] + [{"image": v} for v, _ in bad_rows]
        body = {"dataframe_records": rows}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    finally:
        stop(server)
    assert status == 200 and "Traceback" not in text and "stack_trace" not in text
    row, *answered_bad = json.loads(text)["predictions"]
    expected = predict_probs(model, decode_rgb(photo, 32)[None], tta=True)[0]
    np.testing.assert_allclose([row[n] for n in names], expected, atol=PARITY_TOLERANCE)  # served on LiteRT
    assert row["label"] == names[int(expected.argmax())] and row["error"] == ""
    for answered, (_, reason) in zip(answered_bad, bad_rows):
        assert answered["label"] == "" and answered["error"].startswith(reason), answered


def test_stage_runs_record_system_metrics_and_the_split_they_used(store, tmp_path, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient

    from imgclf.track import tracking

    monkeypatch.setattr(tracking, "SYSTEM_METRICS_INTERVAL_S", 0.5)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"split": {
        "cmd": "python -m stages.split",
        "outs": [{"path": "data/split", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    params = params_from_dict(tiny_params())
    with stage_run("head", params, tmp_path) as run:
        run.log_split(tmp_path, tmp_path / "data" / "split", {"train": 20, "val": 5}, "training")
        time.sleep(2.5)
    logged = MlflowClient(store).get_run(run.run_id)
    assert any(key.startswith("system/cpu_utilization") for key in logged.data.metrics), logged.data.metrics
    assert any(key.startswith("system/system_memory_usage") for key in logged.data.metrics)
    (used,) = logged.inputs.dataset_inputs
    assert used.dataset.name == "data/split" and used.dataset.digest == "0123456789abcdef0123456789abcdef.dir"
    assert json.loads(used.dataset.profile) == {"train": 20, "val": 5}
    assert {t.key: t.value for t in used.tags}["mlflow.data.context"] == "training"
