"""The team set-up, started for real on loopback: PostgreSQL, an S3-compatible object store
(moto in server mode), an MLflow tracking server on both, and a DVC remote in the same bucket.
Every server is started on a free port by a fixture and stopped at the end."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

from conftest import clean_env, dvc, free_port, make_folder, make_project, mlflow_server, run, stop, tiny_params, wait_until

BUCKET = "team-bucket"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (pgserver's binaries) on a free port; yields its database URI."""
    import pwd

    import psycopg
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    data = tmp_path_factory.mktemp("pg") / "data"
    data.mkdir()
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as an unprivileged user
        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        os.chown(data, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    subprocess.run([str(POSTGRES_BIN_PATH / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--encoding=utf8"], check=True, capture_output=True, user=user)
    port = free_port()
    server = subprocess.Popen([str(POSTGRES_BIN_PATH / "postgres"), "-D", str(data), "-p", str(port),
                               "-h", "127.0.0.1", "-k", str(data)], user=user,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        wait_until(lambda: psycopg.connect(admin).close() is None, "PostgreSQL", server)
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        stop(server)


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


@pytest.fixture(scope="module")
def tracking_server(postgres, s3, tmp_path_factory):
    """`mlflow server` with the PostgreSQL backend store and artifacts proxied to the bucket."""
    env = clean_env(**CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3)
    with mlflow_server(postgres, f"s3://{BUCKET}/mlflow", tmp_path_factory.mktemp("mlflow") / "server.log",
                       env=env) as uri:
        yield uri


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_experiment_logs_to_the_server_and_outputs_round_trip_through_s3(tracking_server, s3, tmp_path):
    from mlflow.tracking import MlflowClient

    photos = make_folder(tmp_path / "photos", classes=3, per_class=10)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    env = {**CREDENTIALS, "MLFLOW_TRACKING_URI": tracking_server}
    dvc(project, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(project, "remote", "modify", "storage", "endpointurl", s3)
    dvc(project, "exp", "run", "-n", "team-exp", env=env)

    client = MlflowClient(tracking_server)
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
