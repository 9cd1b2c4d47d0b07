"""Training on several machines: two worker processes on loopback under TF_CONFIG
(MultiWorkerMirroredStrategy, CPU) run the real stage scripts on tiny data."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, free_ports, make_folder, tiny_params

from imgclf import cluster
from imgclf.data import store
from imgclf.data.datasets import list_subset
from imgclf.train import distributed

pytestmark = pytest.mark.slow


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Stage scripts, tiny params (MLflow off) and the decoded stores, without DVC."""
    root = tmp_path_factory.mktemp("cluster")
    for name in ("imgclf", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = tiny_params(baseline={"epochs": 2, "patience": 0}, head={"epochs": 2}, finetune={"epochs": 2},
                         mlflow={"enabled": False})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    split = root / "data" / "split"
    for seed, name in enumerate(("train", "val", "test")):
        make_folder(split / name, classes=3, per_class=8, size=40, seed=seed)
    names = ["class_0", "class_1", "class_2"]
    subsets = {s: list_subset(split, s, names) for s in ("train", "val", "test")}
    for store_name in ("baseline", "transfer"):
        store.build_image_store(subsets, names, 32, root / "data" / "store" / store_name, root)
    return root


def start(project, stage: str, env_extra: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "TF_CONFIG"))}
    env.update(env_extra, PYTHONUNBUFFERED="1", IMGCLF_VERBOSE="1")  # the epoch lines some tests wait for
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_cluster(project, stage: str, timeout: int = 600) -> list[str]:
    ports = free_ports(2)
    workers = [start(project, stage, {"TF_CONFIG": tf_config(ports, i)}) for i in range(2)]
    outputs = [w.communicate(timeout=timeout)[0] for w in workers]
    for index, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"worker {index} of {stage}:\n{output[-4000:]}"
    return outputs


def digests(outputs: list[str]) -> list[str]:
    return [re.search(r"trained weights sha256 (\w+)", out).group(1) for out in outputs]


def test_two_workers_train_every_stage_as_one_and_only_the_chief_writes(project):
    chief, worker = run_cluster(project, "baseline")
    assert digests([chief, worker])[0] == digests([chief, worker])[1]  # the same weights on both
    assert "worker:1" in worker and "writes nothing" in worker and "writes nothing" not in chief
    assert (project / "models" / "baseline.keras").exists()
    summary = json.loads((project / "reports/baseline/summary.json").read_text())
    assert summary["epochs_run"] == 2 and 1 <= summary["best_epoch"] <= 2
    history = (project / "plots/baseline/history.csv").read_text().splitlines()
    assert history[0].split(",")[:2] == ["epoch", "accuracy"] and len(history) == 3

    single = start(project, "activations", {})  # one machine: what head and finetune train on
    assert single.wait(timeout=300) == 0, single.stdout.read()[-3000:]
    for stage in ("head", "finetune"):
        chief, worker = run_cluster(project, stage)
        assert digests([chief, worker])[0] == digests([chief, worker])[1], stage
        assert (project / "models" / f"{stage}.keras").exists()
    written = sorted(p.name for p in (project / "models").iterdir())
    assert written == ["baseline.keras", "finetune.keras", "head.keras"]  # one set of outputs


def test_a_stage_that_does_not_train_refuses_tf_config(project):
    done = start(project, "activations", {"TF_CONFIG": tf_config(free_ports(2), 0)})
    output = done.communicate(timeout=120)[0]
    assert done.returncode == 1 and "runs on one machine" in output and "Traceback" not in output


def test_a_worker_that_dies_stops_the_other_with_a_clear_error(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["baseline"].update(epochs=500, patience=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        ports = free_ports(2)
        chief, worker = (start(project, "baseline", {"TF_CONFIG": tf_config(ports, i)}) for i in range(2))
        for line in worker.stdout:  # wait until both train
            if line.startswith("Epoch 2/"):
                break
        worker.send_signal(signal.SIGKILL)
        started = time.monotonic()
        output = chief.communicate(timeout=distributed.COLLECTIVE_TIMEOUT_S + 120)[0]
        waited = time.monotonic() - started
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
        params["baseline"].update(epochs=2, patience=0)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert chief.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with the cluster" in errors[0], output[-3000:]
    assert "Traceback" not in output and waited < distributed.COLLECTIVE_TIMEOUT_S + 60


def test_tf_config_is_checked(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(cluster.DistributedError, match="TF_CONFIG: expected"):
        cluster.cluster()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(cluster.DistributedError, match="worker:3 is not in the cluster"):
        cluster.cluster()
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    assert not cluster.is_chief()
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 0))
    assert cluster.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert cluster.is_chief() and cluster.cluster() is None
