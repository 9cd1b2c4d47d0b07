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


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_registered_model_is_served_by_mlflow_models_serve(store, tmp_path, backbone):
    import base64

    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from imgclf.data.images import decode_rgb
    from imgclf.serve.inference import predict_probs

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
    assert logged.signature.outputs.input_names() == ["label", *names]
    assert logged.saved_input_example_info is not None  # an input example, shown in the UI

    # a photo file larger than the model's input, sent as a user would: its bytes, base64
    photo = tmp_path / "photo.jpg"
    Image.fromarray(make_image(7, COLORS[2], 80)).save(photo, quality=90)
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
        body = {"dataframe_records": [{"image": base64.b64encode(photo.read_bytes()).decode()}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        stop(server)
    (row,) = answer["predictions"]
    expected = predict_probs(model, decode_rgb(photo, 32)[None], tta=True)[0]
    np.testing.assert_allclose([row[n] for n in names], expected, atol=1e-5)
    assert row["label"] == names[int(expected.argmax())]


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
