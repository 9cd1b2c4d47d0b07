"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

Stages are separate processes, so the parent is found or created by a stable key:
the DVC experiment name when DVC runs an experiment, else the `dvc repro` process that
launched the stage, else the stage process itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import StageError
from ..params import Params
from .liveness import FOUND_DEAD_TAG, HEARTBEAT_TAG, Heartbeat, close_dead_runs, proc_stat, this_process

PIPELINE_KEY_TAG = "imgclf.pipeline_key"
RUN_KIND_TAG = "imgclf.run_kind"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5.0
T = TypeVar("T")


class TrackingError(StageError, RuntimeError):
    pass


def main_project_root(root: Path) -> Path:
    """Queued DVC experiments run in ``<root>/.dvc/tmp/exps/...`` copies: map back to <root>."""
    parts = root.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's ``mlflow.db`` as an absolute path."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{main_project_root(root) / 'mlflow.db'}"


def artifact_location(root: Path) -> str | None:
    """Artifacts beside the default store, under the main project root (None: server decides)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (main_project_root(root) / "mlruns").as_uri()


STAGE_REMEDY = "Start it, fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false in params.yaml"


def check_server(uri: str, timeout: float = 5.0, remedy: str = STAGE_REMEDY) -> None:
    """Fail at the start of a stage, not after training, if a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status >= 400:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err}). {remedy}") from err


def check_artifact_store(location: str) -> None:
    """List the experiment's artifact root (an S3 bucket, a server's proxied store, a folder),
    so a missing bucket or rejected credentials stop the stage before it trains, not when it
    uploads its model."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(location).list_artifacts()
    except Exception as err:  # noqa: BLE001 - boto, HTTP and filesystem errors alike
        reason = " ".join(str(err).split())[:800]
        kind = type(err.__cause__ or err.__context__ or err).__name__  # NoSuchBucket, not MlflowException
        raise TrackingError(f"MLflow artifact store {location} is not usable ({kind}: {reason}). "
                            "Check the bucket, its endpoint (MLFLOW_S3_ENDPOINT_URL) and credentials, or "
                            "set mlflow.enabled: false in params.yaml") from None


def dvc_hash(root: Path, path: str) -> str:
    """The hash DVC recorded in ``dvc.lock`` for the output ``path`` ("unknown" before DVC
    recorded it, e.g. when a stage runs outside DVC)."""
    import yaml

    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "unknown"
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return str(out.get("md5") or out.get("hash") or "unknown")
    return "unknown"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _dvc_ancestor() -> str | None:
    """The `dvc` process that launched this stage, as ``pid-starttime``, if any."""
    pid = os.getppid()
    for _ in range(12):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        stat = proc_stat(pid)
        if stat is None:
            return None
        if any(Path(arg.decode(errors="ignore")).name == "dvc" for arg in cmdline[:2]) or \
                (len(cmdline) > 2 and cmdline[1] == b"-m" and cmdline[2] == b"dvc"):
            return f"{pid}-{stat[1]}"
        pid = stat[0]
    return None


def pipeline_key(root: Path) -> tuple[str, str]:
    """(key, display name) identifying the pipeline execution this stage belongs to."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
        return f"exp:{exp_name}:{baseline}", exp_name
    ancestor = _dvc_ancestor()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if ancestor:
        return f"repro:{os.uname().nodename}:{ancestor}", f"repro {stamp}"
    return f"process:{os.uname().nodename}:{os.getpid()}:{time.time()}", f"manual {stamp}"


def _logging_errors() -> tuple[type[BaseException], ...]:
    """What a tracking store raises when it cannot take a write (after MLflow's own retries)."""
    import requests
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, requests.exceptions.RequestException, OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    return tuple(errors)


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:limit]


class StageRun:
    """A child run for one stage. Every method is a no-op when tracking is off.

    Logging never stops the stage: a write the store refuses even after MLflow's retries (a
    server down for minutes) is noted, later writes are skipped, and the stage ends with one
    line saying what was not logged, its DVC outputs kept."""

    def __init__(self, client: Any = None, run_id: str | None = None, parent_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.failure: str | None = None
        self.unlogged: list[str] = []

    @property
    def active(self) -> bool:
        return self.client is not None

    def attempt(self, what: str, action: Callable[[], T], after_failure: bool = False) -> T | None:
        """``action()``, one write to the store; None and ``what`` noted as not logged if it
        fails or if an earlier write failed (unless ``after_failure``)."""
        if not self.active:
            return None
        if self.failure is None or after_failure:
            try:
                return action()
            except _logging_errors() as err:
                self.failure = self.failure or _one_line(err)
        self.unlogged.append(what)
        return None

    def unlogged_report(self, uri: str) -> str:
        steps = [int(item.rsplit(" ", 1)[1]) for item in self.unlogged if item.startswith("metrics of step ")]
        shown = list(dict.fromkeys(
            f"metrics of steps {min(steps)}-{max(steps)}" if item.startswith("metrics of step ") and len(steps) > 1
            else item for item in self.unlogged))
        more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
        return (f"warning: MLflow ({uri}) did not take {', '.join(shown[:6])}{more} ({self.failure}); "
                "the stage's outputs are kept, and its run is closed by the next stage if it stayed RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, parent: bool = False) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        what = f"metrics of step {step}" if step is not None else "metrics " + ", ".join(list(metrics)[:3])
        for run_id in [self.run_id] + ([self.parent_id] if parent and self.parent_id else []):
            for start in range(0, len(items), 500):
                batch = items[start:start + 500]
                self.attempt(what, lambda: self.client.log_batch(run_id, metrics=batch))

    def log_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        """One epoch's metrics at step ``epoch``, logged as the epoch ends (live curves)."""
        self.log_metrics(logs, step=epoch)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self.attempt(f"artifact {Path(path).name}", lambda: log(self.run_id, str(path), artifact_path))

    def log_split(self, root: Path, split_dir: Path, counts: dict[str, int], context: str) -> None:
        """The split this stage read, as an MLflow dataset input: named after the folder, its
        digest the DVC hash of ``data/split`` recorded in ``dvc.lock`` (so it leads back to the
        exact data), its profile the image counts; ``context``: training or evaluation."""
        if not self.active:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        relative = split_dir.relative_to(root).as_posix() if split_dir.is_relative_to(root) else str(split_dir)
        dataset = Dataset(name=relative, digest=dvc_hash(root, relative)[:36], source_type="local",
                          source=json.dumps({"uri": str(split_dir)}), profile=json.dumps(counts))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        self.attempt("dataset input", lambda: self.client.log_inputs(self.run_id, inputs))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for key, value in tags.items():
                self.attempt(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, str(value)))

    def end(self, status: str) -> None:
        """Close the stage's run, then the pipeline's (it ends with the stage that ended last: it
        spans the pipeline's first stage to its last, FAILED if a stage failed)."""
        for run_id, what in ((self.run_id, "the run's end"), (self.parent_id, "the pipeline run's end")):
            self.attempt(what, lambda: self.client.set_terminated(run_id, status), after_failure=run_id == self.run_id)


def _find_or_create_parent(client: Any, experiment_id: str, key: str, name: str, tags: dict) -> str:
    """The pipeline's parent run, RUNNING from now until this stage ends: created by the first
    stage (so it starts when the pipeline starts), reopened by the next ones, which first make
    it theirs (owner, heartbeat) so no other stage takes it for a dead one."""
    from mlflow.entities import RunTag

    query = f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{RUN_KIND_TAG}` = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    owner = {**this_process().tags(), HEARTBEAT_TAG: str(int(time.time()))}
    if found:
        run_id = found[0].info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner.items()])
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={**tags, **owner, PIPELINE_KEY_TAG: key, RUN_KIND_TAG: "pipeline"})
    return run.info.run_id


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a local sqlite store: hold an exclusive lock on ``<db>.lock`` while the store is
    created and migrated and the experiment looked up or created, so parallel `dvc exp`
    workers never race to create the same tables or experiment. Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def access_error(uri: str, experiment: str, err: Exception) -> TrackingError:
    """One line for a store that refused this user: who, where, and what to set."""
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username
    code = getattr(err, "error_code", "")
    if code == "UNAUTHENTICATED":
        who = f"the user {user!r}" if user else "a request with no user"
        return TrackingError(
            f"MLflow tracking server {uri} refused {who} (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to your account on it, or set "
            "mlflow.enabled: false in params.yaml")
    if code == "PERMISSION_DENIED":
        return TrackingError(
            f"MLflow user {user!r} may only read experiment {experiment!r} on {uri} (HTTP 403): ask the "
            "server's admin for the trainer role (python -m imgclf.team add), or set mlflow.enabled: false "
            "in params.yaml")
    return TrackingError(f"MLflow tracking store {uri} failed: {_one_line(err)}")


def open_experiment(client: Any, name: str, root: Path) -> Any:
    """The project's experiment, created if new. Its kind tag is written every time: that is
    also the check that this user may write to it (a read-only user is refused here, before
    any run is created)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment = client.get_experiment(client.create_experiment(name, artifact_location=artifact_location(root)))
    # the UI opens on training runs
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment


@contextlib.contextmanager
def stage_run(stage: str, params: Params, root: Path) -> Iterator[StageRun]:
    """Open the child run of ``stage`` under its pipeline's parent run, logging all params,
    after closing the project's runs left RUNNING by processes that died.

    With ``mlflow.enabled: false``, and on every worker of a multi-worker cluster but the chief
    (``TF_CONFIG``), this yields an inactive run and touches nothing.
    """
    from ..cluster import is_chief

    if not params.mlflow.enabled or not is_chief():
        yield StageRun()
        return
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    check_server(uri)
    me = this_process()
    try:
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)  # creates and migrates a new store
            experiment = open_experiment(client, params.mlflow.experiment, root)
        closed = close_dead_runs(client, experiment.experiment_id, me)
    except MlflowException as err:
        raise access_error(uri, params.mlflow.experiment, err) from None
    if closed:
        print(f"mlflow: closed {len(closed)} run(s) left RUNNING by a process that died, as KILLED "
              f"(tag {FOUND_DEAD_TAG})", file=sys.stderr)
    check_artifact_store(experiment.artifact_location)
    experiment_id = experiment.experiment_id
    key, display = pipeline_key(root)
    commit = git_commit(root)
    tags = {
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "backbone": params.model.backbone,
    }
    parent_id = _find_or_create_parent(client, experiment_id, key, display, tags)
    run = client.create_run(experiment_id, run_name=stage, tags={
        **tags, **me.tags(), HEARTBEAT_TAG: str(int(time.time())), "stage": stage, RUN_KIND_TAG: "stage",
        PIPELINE_KEY_TAG: key, "mlflow.parentRunId": parent_id})
    run_id = run.info.run_id
    stage_tracker = StageRun(client, run_id, parent_id)
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.flat().items()]
    stage_tracker.attempt("params", lambda: client.log_batch(run_id, params=items))
    with contextlib.suppress(Exception):  # the parent may already hold the same values
        client.log_batch(parent_id, params=items)
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri)
    monitor.start()  # CPU, memory, disk and network as system/* metrics while the stage runs
    status = "FAILED"
    try:
        with Heartbeat(client, [run_id, parent_id]):
            yield stage_tracker
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see project.run_stage)
        status = "KILLED"
        raise
    finally:
        monitor.finish()
        stage_tracker.end(status)
        if stage_tracker.unlogged:
            print(stage_tracker.unlogged_report(uri), file=sys.stderr)
