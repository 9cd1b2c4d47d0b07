"""Runs left RUNNING by a dead process: who is judged dead, and what is closed."""
import subprocess
import sys
import time

import pytest

from imgclf.track.liveness import (
    FOUND_DEAD_TAG,
    HEARTBEAT_TAG,
    STALE_AFTER_S,
    Heartbeat,
    Owner,
    close_dead_runs,
    death_reason,
    process_start,
    this_process,
)
from imgclf.track.tracking import StageRun

ME = Owner("host-a", "boot-1", 100, "5000")


def tags(owner: Owner, heartbeat: float | None = None) -> dict:
    return {**owner.tags(), **({HEARTBEAT_TAG: str(heartbeat)} if heartbeat is not None else {})}


def test_on_this_machine_the_process_decides():
    now = 1_000_000.0
    alive = {200: "7000"}.get
    assert death_reason(tags(Owner("host-a", "boot-1", 200, "7000")), now, ME, started=alive) is None
    assert "process 201 on host-a is gone" in death_reason(tags(Owner("host-a", "boot-1", 201, "7000")), now, ME,
                                                            started=alive)
    # a reused pid: same number, another process
    assert death_reason(tags(Owner("host-a", "boot-1", 200, "6999")), now, ME, started=alive) is not None
    # the machine rebooted since the run began
    assert "restarted" in death_reason(tags(Owner("host-a", "boot-0", 200, "7000"), now), now, ME, started=alive)


def test_on_another_machine_only_a_long_silence_decides():
    now = 1_000_000.0
    other = Owner("gpu-box", "boot-9", 300, "1")
    never = {}.get
    assert death_reason(tags(other, now - 60), now, ME, started=never) is None
    assert death_reason(tags(other, now - STALE_AFTER_S + 1), now, ME, started=never) is None
    assert "no heartbeat from process 300 on gpu-box" in death_reason(tags(other, now - STALE_AFTER_S - 1), now, ME,
                                                                       started=never)
    assert death_reason(tags(other), now, ME, started=never) is None  # no heartbeat at all: not ours to judge
    assert death_reason({"mlflow.user": "someone"}, now, ME, started=never) is None  # not opened by a stage


def test_close_dead_runs_closes_only_the_dead(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    experiment = client.create_experiment("x")
    me = this_process()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_start = process_start(finished.pid)
    finished.wait()
    now = time.time()
    dead = client.create_run(experiment, tags=tags(Owner(me.host, me.boot_id, finished.pid, dead_start or "1"), now))
    alive = client.create_run(experiment, tags=tags(me, now))
    elsewhere = client.create_run(experiment, tags=tags(Owner("gpu-box", "b", 1, "1"), now - 30))
    silent = client.create_run(experiment, tags=tags(Owner("gpu-box", "b", 2, "1"), now - STALE_AFTER_S - 60))
    by_hand = client.create_run(experiment)

    closed = close_dead_runs(client, experiment, me)

    assert sorted(closed) == sorted([dead.info.run_id, silent.info.run_id])
    for run in (dead, silent):
        found = client.get_run(run.info.run_id)
        assert found.info.status == "KILLED" and found.info.end_time <= now * 1000 + 1000
        assert f"by process {me.pid} on {me.host}" in found.data.tags[FOUND_DEAD_TAG]
    for run in (alive, elsewhere, by_hand):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_heartbeat_refreshes_its_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}")
    run = client.create_run(client.create_experiment("x"), tags={HEARTBEAT_TAG: "0"})
    with Heartbeat(client, [run.info.run_id], interval=0.1):
        deadline = time.time() + 20
        while client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG] == "0" and time.time() < deadline:
            time.sleep(0.1)
    assert abs(float(client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG]) - time.time()) < 30


class RefusingClient:
    """A tracking client whose server is gone: every write fails as MLflow's does after its retries."""

    def __init__(self):
        self.calls = 0

    def log_batch(self, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed: "
                              "Max retries exceeded")


def test_a_store_that_stops_answering_costs_one_try_and_one_line():
    client = RefusingClient()
    run = StageRun(client, "run-1", "parent-1")
    run.log_epoch(1, {"loss": 0.5})
    run.log_epoch(2, {"loss": 0.4})
    run.log_metrics({"test_accuracy": 0.9}, parent=True)
    assert client.calls == 1  # later writes are not tried: each would wait for the retries again
    report = run.unlogged_report("http://127.0.0.1:1")
    assert "\n" not in report and report.startswith("warning: MLflow (http://127.0.0.1:1) did not take")
    assert "did not take metrics of steps 1-2, metrics test_accuracy (" in report
    assert "Max retries exceeded" in report and "outputs are kept" in report


def test_only_store_errors_are_absorbed():
    class Broken:
        def log_batch(self, *args, **kwargs):
            raise TypeError("a bug, not a store outage")

    with pytest.raises(TypeError):
        StageRun(Broken(), "run-1").log_metrics({"loss": 1.0})
