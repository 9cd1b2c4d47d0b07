"""The team set-up, started for real on loopback: PostgreSQL, an S3-compatible object store
(moto in server mode), an MLflow tracking server on both, and a DVC remote in the same bucket.
Every server is started on a free port by a fixture and stopped at the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

from conftest import (
    clean_env,
    dvc,
    free_port,
    make_folder,
    make_project,
    mlflow_server,
    run,
    stop,
    tiny_params,
    wait_until,
)

BUCKET = "team-bucket"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class Postgres:
    """A real PostgreSQL server (pgserver's binaries) on a free loopback port, run as an
    unprivileged user when the tests run as root (postgres refuses root). ``stop()`` and
    ``start()`` restart it on the same port and data."""

    def __init__(self, data):
        import pwd

        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        self.bin, self.data, self.user, self.server = POSTGRES_BIN_PATH, data, None, None
        data.mkdir()
        if os.geteuid() == 0:
            self.user = "pgserver"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(data)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            os.chown(data, pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=utf8"], check=True, capture_output=True, user=self.user)
        self.port = free_port()
        self.start()

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        import psycopg

        self.server = subprocess.Popen([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                        "-h", "127.0.0.1", "-k", str(self.data)], user=self.user,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: psycopg.connect(self.uri()).close() is None, "PostgreSQL", self.server)

    def stop(self) -> None:
        stop(self.server)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.uri(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.uri(name)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    server = Postgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3():
    """moto's S3-compatible server on a free port with one bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        old = {k: os.environ.get(k) for k in CREDENTIALS}
        os.environ.update(CREDENTIALS)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-secret-from-the-vault"}
TRAINER = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "alice-password-1"}
VIEWER = {"MLFLOW_TRACKING_USERNAME": "victor", "MLFLOW_TRACKING_PASSWORD": "victor-password-1"}


@pytest.fixture(scope="module")
def tracking_server(postgres, s3, tmp_path_factory):
    """The README's team server: `mlflow server --app-name basic-auth` with its runs and its users
    in PostgreSQL, artifacts proxied to the bucket, the admin password from a secret; then a
    trainer and a viewer added with `python -m imgclf.team add`."""
    folder = tmp_path_factory.mktemp("mlflow")
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = {postgres.create_database('mlflow_auth')}\nadmin_username = admin\n"
                      "auth_cache_ttl_seconds = 60\n")
    env = clean_env(**CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3, MLFLOW_AUTH_CONFIG_PATH=str(config),
                    MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN["MLFLOW_TRACKING_PASSWORD"],
                    MLFLOW_FLASK_SERVER_SECRET_KEY="a-long-random-key")
    with mlflow_server(postgres.create_database("mlflow"), f"s3://{BUCKET}/mlflow", folder / "server.log", env=env,
                       extra_args=("--app-name", "basic-auth")) as uri:
        for user, role in ((TRAINER, "trainer"), (VIEWER, "viewer")):
            added = subprocess.run([sys.executable, "-m", "imgclf.team", "add", user["MLFLOW_TRACKING_USERNAME"], role],
                                   input=user["MLFLOW_TRACKING_PASSWORD"] + "\n", capture_output=True, text=True,
                                   env=clean_env(**ADMIN, MLFLOW_TRACKING_URI=uri))
            assert added.returncode == 0, added.stderr
        yield uri


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def admin_client(uri: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    for key, value in ADMIN.items():  # MLflow reads credentials from the environment on each request
        monkeypatch.setenv(key, value)
    return MlflowClient(uri)


def test_experiment_logs_to_the_server_and_outputs_round_trip_through_s3(tracking_server, s3, tmp_path,
                                                                          monkeypatch):

    photos = make_folder(tmp_path / "photos", classes=3, per_class=10)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    env = {**CREDENTIALS, **TRAINER, "MLFLOW_TRACKING_URI": tracking_server}
    dvc(project, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(project, "remote", "modify", "storage", "endpointurl", s3)
    dvc(project, "exp", "run", "-n", "team-exp", env=env)

    client = admin_client(tracking_server, monkeypatch)
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("stage")}
    assert set(stages) == {"weights", "download", "split", "store@baseline", "store@transfer", "baseline",
                           "activations", "head", "finetune", "evaluate", "audit", "gradcam", "export"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert stages["finetune"].data.metrics["val_accuracy"] >= 0 and "temperature" in stages["head"].data.metrics
    parent = next(r for r in runs if r.data.tags.get("imgclf.run_kind") == "pipeline")
    assert parent.data.tags["dvc_exp_name"] == "team-exp" and "finetune_accuracy" in parent.data.metrics
    keys = bucket_keys(s3, "mlflow/")
    for stage in ("baseline", "head", "finetune"):  # the models are in the bucket
        assert any(stages[stage].info.run_id in k or "models/" in k for k in keys), stage
    assert any(k.endswith("comparison.md") for k in keys) and any(k.endswith(".keras") for k in keys)

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "team run"], project)
    dvc(project, "push", env=CREDENTIALS)
    assert any(k.startswith("dvc/") for k in bucket_keys(s3, "dvc/"))
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull", env=CREDENTIALS)
    assert "up to date" in dvc(clone, "status").stdout
    assert "Running stage" not in dvc(clone, "repro", env=env).stdout
    assert (clone / "models" / "finetune.keras").is_file()


def test_a_missing_bucket_stops_the_stage_at_its_start_naming_it(s3, tmp_path):
    """An experiment whose artifacts go straight to a bucket that does not exist."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'store.db'}"
    MlflowClient(store).create_experiment("image-classification", artifact_location="s3://no-such-bucket/mlflow")
    photos = make_folder(tmp_path / "photos", classes=2, per_class=4)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    result = run([sys.executable, "-m", "stages.download"], project, check=False,
                 env={**CREDENTIALS, "MLFLOW_TRACKING_URI": store, "MLFLOW_S3_ENDPOINT_URL": s3})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "s3://no-such-bucket/mlflow" in errors[0] and "NoSuchBucket" in errors[0]
    assert not (project / "data" / "raw").exists()
    assert MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("image-classification").experiment_id]) == []


def test_wrong_credentials_stop_the_stage_at_its_start(s3, tmp_path):
    """moto accepts any key by default; a server that checks keys rejects these the same way,
    and the stage must report it before working. Here: a bucket URL on a closed port."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'store.db'}"
    MlflowClient(store).create_experiment("image-classification", artifact_location=f"s3://{BUCKET}/x")
    photos = make_folder(tmp_path / "photos", classes=2, per_class=4)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    closed = f"http://127.0.0.1:{free_port()}"
    result = run([sys.executable, "-m", "stages.download"], project, check=False,
                 env={**CREDENTIALS, "MLFLOW_TRACKING_URI": store, "MLFLOW_S3_ENDPOINT_URL": closed,
                      "AWS_MAX_ATTEMPTS": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and f"s3://{BUCKET}/x" in errors[0]
    assert not (project / "data" / "raw").exists()


def stage_errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_only_the_team_gets_in(tracking_server, tmp_path, monkeypatch):
    """No credentials, a wrong password, a viewer: the stage stops in seconds with one line naming
    the server and what to set, before any work and before any run is created. The viewer reads."""
    from mlflow.tracking import MlflowClient

    photos = make_folder(tmp_path / "photos", classes=2, per_class=4)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    client = admin_client(tracking_server, monkeypatch)
    experiment = client.get_experiment_by_name("image-classification") or client.get_experiment(
        client.create_experiment("image-classification"))
    before = len(client.search_runs([experiment.experiment_id], max_results=1000))
    wrong = {**TRAINER, "MLFLOW_TRACKING_PASSWORD": "not-her-password"}
    for credentials, expected in (({}, "refused a request with no user (HTTP 401)"),
                                  (wrong, "refused the user 'alice' (HTTP 401)"),
                                  (VIEWER, "'victor' may only read experiment 'image-classification'")):
        started = time.perf_counter()
        result = run([sys.executable, "-m", "stages.download"], project, check=False,
                     env={**credentials, "MLFLOW_TRACKING_URI": tracking_server})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(stage_errors(result)) == 1 and expected in stage_errors(result)[0]
        assert tracking_server in stage_errors(result)[0] and time.perf_counter() - started < 60
        assert not (project / "data" / "raw").exists()
    assert "MLFLOW_TRACKING_PASSWORD" in stage_errors(result)[0] or "trainer role" in stage_errors(result)[0]
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == before
    for key, value in VIEWER.items():
        monkeypatch.setenv(key, value)
    assert MlflowClient(tracking_server).get_experiment_by_name("image-classification") is not None
    # only the admin adds people
    refused = subprocess.run([sys.executable, "-m", "imgclf.team", "add", "mallory", "trainer"],
                             input="pw-123456789\n", capture_output=True, text=True,
                             env=clean_env(**VIEWER, MLFLOW_TRACKING_URI=tracking_server))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        line for line in refused.stderr.splitlines() if line.strip()][-1:] and "PERMISSION_DENIED" in refused.stderr


def test_server_and_database_restarts_lose_nothing_and_a_killed_stage_is_closed_by_the_next(tmp_path):
    """On a tracking server on PostgreSQL: (1) the server restarted, then its database restarted,
    while the baseline trains: the stage finishes, its model is there, and its run is FINISHED with
    every epoch's metrics. (2) SIGKILL while the baseline trains leaves its run and its pipeline
    run RUNNING; the next stage closes both as KILLED, tagged, but leaves alone a RUNNING run owned
    on another machine that beats recently."""
    from mlflow.tracking import MlflowClient

    from imgclf.track.liveness import BOOT_TAG, FOUND_DEAD_TAG, HEARTBEAT_TAG, HOST_TAG, PID_TAG, START_TAG

    database = Postgres(tmp_path / "pg")
    try:
        backend, port = database.create_database("mlflow"), free_port()

        def serve():
            return mlflow_server(backend, str(tmp_path / "artifacts"), tmp_path / "server.log", port=port)

        photos = make_folder(tmp_path / "photos", classes=2, per_class=6)
        params = tiny_params(data={"source": "folder", "path": str(photos)}, baseline={"epochs": 80, "patience": 80})
        project = make_project(tmp_path / "project", params)
        uri = f"http://127.0.0.1:{port}"
        env = clean_env(MLFLOW_TRACKING_URI=uri)
        client = MlflowClient(uri)

        def baseline_runs(status: str = "") -> list:
            query = "tags.stage = 'baseline'" + (f" and attributes.status = '{status}'" if status else "")
            return client.search_runs(["1"], filter_string=query, max_results=50)

        def epochs_logged(at_least: int) -> bool:
            runs = baseline_runs("RUNNING")
            return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= at_least

        with serve():
            dvc(project, "repro", "store@baseline", env={"MLFLOW_TRACKING_URI": uri})
        server = serve()
        server.__enter__()
        stage = subprocess.Popen([sys.executable, "-m", "stages.baseline"], cwd=project, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: epochs_logged(3), "the baseline's third epoch", stage, timeout=300)
            server.__exit__(None, None, None)  # the tracking server goes down for a while ...
            time.sleep(3)
            server = serve()
            server.__enter__()  # ... and comes back on the same port
            wait_until(lambda: epochs_logged(20), "epochs after the server restart", stage, timeout=300)
            database.stop()  # then its database restarts
            time.sleep(3)
            database.start()
            output, _ = stage.communicate(timeout=600)
            assert stage.returncode == 0, output
            assert "warning: MLflow" not in output and "Traceback" not in output
            assert (project / "models" / "baseline.keras").is_file()
            logged = baseline_runs()[0]
            trained = json.loads((project / "reports" / "baseline" / "summary.json").read_text())
            steps = {m.step for m in client.get_metric_history(logged.info.run_id, "val_loss")}  # epochs from 0
            assert logged.info.status == "FINISHED" and sorted(steps) == list(range(trained["epochs_run"]))

            elsewhere = client.create_run("1", run_name="training on another machine", tags={
                HOST_TAG: "gpu-box-7", BOOT_TAG: "b007", PID_TAG: "4242", START_TAG: "99",
                HEARTBEAT_TAG: str(int(time.time()))})
            stage = subprocess.Popen([sys.executable, "-m", "stages.baseline"], cwd=project, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: epochs_logged(2), "the second baseline's second epoch", stage, timeout=300)
            stage.kill()
            stage.wait()
            dead = baseline_runs("RUNNING")[0]
            parent_id = dead.data.tags["mlflow.parentRunId"]
            assert client.get_run(parent_id).info.status == "RUNNING"
            result = run([sys.executable, "-m", "stages.weights"], project, env={"MLFLOW_TRACKING_URI": uri})
            assert "closed 2 run(s) left RUNNING" in result.stderr
            for run_id in (dead.info.run_id, parent_id):
                closed = client.get_run(run_id)
                assert closed.info.status == "KILLED" and closed.info.end_time
                assert f"process {dead.data.tags[PID_TAG]} on" in closed.data.tags[FOUND_DEAD_TAG]
            assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"

            # the server goes down for good while the baseline trains (MLflow's retries cut short)
            (project / "models" / "baseline.keras").unlink()
            stage = subprocess.Popen([sys.executable, "-m", "stages.baseline"], cwd=project, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                                          "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
            wait_until(lambda: epochs_logged(2), "the third baseline's second epoch", stage, timeout=300)
            server.__exit__(None, None, None)
            output, _ = stage.communicate(timeout=600)
            warnings = [line for line in output.splitlines() if "warning: MLflow" in line]
            assert stage.returncode == 0 and "Traceback" not in output, output
            assert len(warnings) == 1 and "did not take metrics of steps" in warnings[0], output
            assert (project / "models" / "baseline.keras").is_file()
        finally:
            if stage.poll() is None:
                stage.kill()
            server.__exit__(None, None, None)
    finally:
        database.stop()


def test_dvc_push_with_the_object_store_down_says_so_in_one_line_and_the_next_push_completes(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    photos = make_folder(tmp_path / "photos", classes=2, per_class=6)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)},
                                                             mlflow={"enabled": False}))
    dvc(project, "repro", "split")
    port, bucket = free_port(), "push-bucket"
    endpoint = f"http://127.0.0.1:{port}"
    dvc(project, "remote", "add", "-d", "storage", f"s3://{bucket}/dvc")
    dvc(project, "remote", "modify", "storage", "endpointurl", endpoint)

    down = dvc(project, "push", check=False, env=CREDENTIALS)
    errors = [line for line in (down.stdout + down.stderr).splitlines() if line.startswith("ERROR")]
    assert down.returncode != 0 and "Traceback" not in down.stdout + down.stderr
    assert len(errors) == 1 and endpoint in errors[0]

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                             aws_secret_access_key="testing")
        store.create_bucket(Bucket=bucket)
        dvc(project, "push", env=CREDENTIALS)
        keys = sorted(item["Key"] for item in store.list_objects_v2(Bucket=bucket)["Contents"])
        # a push cut short: half of the files never arrived, nor the directory listings (DVC sends a
        # directory's .dir object after its files, and takes a .dir on the remote to mean all are there)
        lost = [key for key in keys if key.endswith(".dir")] + [key for key in keys if not key.endswith(".dir")][::2]
        store.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in lost]})
        assert "new" in dvc(project, "status", "--cloud", env=CREDENTIALS).stdout
        dvc(project, "push", env=CREDENTIALS)
        assert sorted(item["Key"] for item in store.list_objects_v2(Bucket=bucket)["Contents"]) == keys
        assert "are in sync" in dvc(project, "status", "--cloud", env=CREDENTIALS).stdout
    finally:
        server.stop()
