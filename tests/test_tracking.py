"""MLflow tracking: store location, fail-fast on a dead server, a real server, tracking off."""
import os
import subprocess
import sys
import time

import pytest
from conftest import (
    PROGRAMS,
    ROOT,
    clean_env,
    dvc,
    free_port,
    make_folder,
    make_project,
    mlflow_server,
    run,
    tiny_params,
)

from imgclf.track.tracking import TrackingError, check_server, main_project_root, tracking_uri


def test_queued_experiment_copies_map_to_the_main_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert main_project_root(temp_copy) == (tmp_path / "proj").resolve()
    assert tracking_uri(temp_copy) == f"sqlite:///{(tmp_path / 'proj' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking_uri(temp_copy) == "http://example.invalid:5000"


def test_unreachable_server_is_reported_at_once_with_its_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=f"{uri} is unreachable"):
        check_server(uri)
    assert time.perf_counter() - started < 10


@pytest.fixture
def small_project(tmp_path):
    photos = make_folder(tmp_path / "photos", classes=2, per_class=6)
    return make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))

@pytest.mark.slow
def test_stage_fails_before_work_when_the_server_is_down(small_project):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run([sys.executable, "-m", "stages.download"], small_project, check=False,
                 env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1
    assert uri in result.stderr and "mlflow.enabled: false" in result.stderr
    assert not (small_project / "data" / "raw").exists()

@pytest.mark.slow
def test_tracking_can_be_turned_off(small_project):
    import yaml

    params = yaml.safe_load((small_project / "params.yaml").read_text())
    params["mlflow"]["enabled"] = False
    (small_project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(small_project, "repro", "split")
    assert (small_project / "data" / "split").is_dir()
    assert not (small_project / "mlflow.db").exists()


@pytest.mark.slow
def test_stages_log_to_a_real_tracking_server(small_project, tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts"),
                       tmp_path / "server.log") as uri:
        dvc(small_project, "repro", "split", env={"MLFLOW_TRACKING_URI": uri})
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("image-classification")
        runs = client.search_runs([experiment.experiment_id])
        stages = {r.data.tags.get("stage") for r in runs}
        assert {"download", "split"} <= stages
        split = next(r for r in runs if r.data.tags.get("stage") == "split")
        assert split.data.metrics["train_images"] > 0
        assert split.data.params["model.backbone"] == "mobilenetv2"
        artifacts = [a.path for a in client.list_artifacts(
            next(r for r in runs if r.data.tags.get("stage") == "download").info.run_id)]
        assert "report.json" in artifacts
        assert not (small_project / "mlflow.db").exists()


def test_parent_run_is_running_while_a_stage_runs_and_spans_all_stages(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from imgclf.params import params_from_dict
    from imgclf.track.tracking import stage_run

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-span")
    params = params_from_dict(tiny_params())
    client = MlflowClient(uri)
    with stage_run("download", params, tmp_path) as first:
        assert client.get_run(first.parent_id).info.status == "RUNNING"
        time.sleep(0.2)
    assert client.get_run(first.parent_id).info.status == "FINISHED"
    time.sleep(0.2)
    with stage_run("split", params, tmp_path) as second:
        assert second.parent_id == first.parent_id
        assert client.get_run(first.parent_id).info.status == "RUNNING"
        time.sleep(0.2)
    parent = client.get_run(first.parent_id).info
    children = [client.get_run(r.run_id).info for r in (first, second)]
    assert parent.status == "FINISHED"
    assert parent.start_time <= min(c.start_time for c in children)
    assert parent.end_time >= max(c.end_time for c in children)
    assert parent.end_time - parent.start_time >= 600  # ms: not the 7 ms of a run closed at birth

    with pytest.raises(RuntimeError):
        with stage_run("baseline", params, tmp_path):
            raise RuntimeError("training blew up")
    assert client.get_run(first.parent_id).info.status == "FAILED"

@pytest.mark.slow
def test_parallel_workers_creating_the_default_store_lose_no_run(tmp_path):
    """Six `dvc exp` workers starting at once on a project without mlflow.db: all runs land."""
    from mlflow.tracking import MlflowClient

    env = clean_env(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    workers = [subprocess.Popen([sys.executable, str(PROGRAMS / "tracking_worker.py")], cwd=tmp_path,
                                env={**env, "DVC_EXP_NAME": f"exp-{i}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0 and "LOGGED" in out, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id],
                              max_results=100)
    parents = [r for r in runs if r.data.tags.get("imgclf.run_kind") == "pipeline"]
    assert sorted(r.data.tags["dvc_exp_name"] for r in parents) == [f"exp-{i}" for i in range(6)]
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.tags["stage"] for c in children) == ["download", "split"]
        assert all(c.data.metrics["images"] == 3.0 for c in children)


def test_team_accounts_need_a_reachable_team_server(tmp_path):
    """`python -m imgclf.team add`: no server URL, or a server that does not answer: one line each."""
    closed = f"http://127.0.0.1:{free_port()}"
    for env, code, expected in (({}, 2, "set MLFLOW_TRACKING_URI to the team server's URL"),
                                ({"MLFLOW_TRACKING_URI": closed}, 1, f"{closed} is unreachable")):
        result = subprocess.run([sys.executable, "-m", "imgclf.team", "add", "bob", "viewer"],
                                input="pw-1234567\n", capture_output=True, text=True, cwd=tmp_path,
                                env={**clean_env(**env), "PYTHONPATH": str(ROOT)})
        assert result.returncode == code and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and expected in result.stderr
