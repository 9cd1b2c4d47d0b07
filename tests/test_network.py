"""Network failures: retried when transient, then one clear line naming what could not be
fetched and the offline way; archives downloaded once and kept. A local HTTP server on a
free loopback port stands in for the internet."""
import http.server
import io
import json
import socket
import sys
import tarfile
import threading

import pytest
from conftest import COLORS, free_port, make_image, make_project, run, tiny_params
from PIL import Image

from imgclf import network
from imgclf.network import NetworkError, cached_download, with_retries

NO_WAIT = (0.0, 0.0)


def photos_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for c in range(2):
            for i in range(4):
                image = io.BytesIO()
                Image.fromarray(make_image(c * 10 + i, COLORS[c], 32)).save(image, "PNG")
                info = tarfile.TarInfo(f"photos/class_{c}/{i}.png")
                info.size = len(image.getvalue())
                tar.addfile(info, io.BytesIO(image.getvalue()))
    return buffer.getvalue()


@pytest.fixture
def server():
    """Serves ``state["body"]``; fails the first ``state["fail"]`` requests with HTTP 503."""
    state = {"body": photos_archive(), "fail": 0, "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state["requests"] += 1
            if state["fail"]:
                state["fail"] -= 1
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/photos.tgz"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_transient_errors_are_retried_then_reported_in_one_line():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert with_retries(flaky, "a thing", "Offline: do X", delays=NO_WAIT) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(NetworkError) as info:
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError("timed out")),
                     "the file f.bin", "Offline: do X", delays=NO_WAIT)
    assert len(calls) == 3
    message = str(info.value)
    assert "\n" not in message and "cannot fetch the file f.bin" in message and "Offline: do X" in message
    with pytest.raises(ValueError):  # a bug is not a network error: no retry, no rewording
        with_retries(lambda: calls.append(1) or int("x"), "a thing", "", delays=NO_WAIT)


def test_archive_is_downloaded_once_and_kept_by_url_and_checksum(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    server["fail"] = 2  # two transient HTTP 503 answers, then the file
    first = cached_download(server["url"], "", "Offline: ...", delays=NO_WAIT)
    assert first.read_bytes() == server["body"] and server["requests"] == 3
    assert "MB" in capsys.readouterr().err  # the progress bar
    again = cached_download(server["url"], "", "Offline: ...", delays=NO_WAIT)
    assert again == first and server["requests"] == 3  # not downloaded again
    digest = network.sha256_file(first)
    with_sum = cached_download(server["url"], digest, "Offline: ...", delays=NO_WAIT)
    assert with_sum.read_bytes() == server["body"] and server["requests"] == 4  # keyed by the checksum too
    with_sum.write_bytes(b"corrupted")
    assert cached_download(server["url"], digest, "", delays=NO_WAIT).read_bytes() == server["body"]
    assert not list((tmp_path / "cache").rglob("*.part"))

@pytest.mark.slow
def test_changing_another_data_param_does_not_download_again(server, tmp_path):
    project = make_project(tmp_path / "project", tiny_params(data={"source": "url", "path": server["url"]}))
    env = {"IMGCLF_CACHE": str(tmp_path / "cache")}
    run([sys.executable, "-m", "stages.download"], project, env=env)
    assert server["requests"] == 1
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("max_per_class: 0", "max_per_class: 3"))
    run([sys.executable, "-m", "stages.download"], project, env=env)
    assert server["requests"] == 1
    assert json.loads((project / "reports/download/report.json").read_text())["summary"]["per_class"] == {"class_0": 3, "class_1": 3}

@pytest.mark.slow
def test_unreachable_archive_url_stops_the_stage_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/photos.tgz"  # nothing listens there
    project = make_project(tmp_path / "project", tiny_params(data={"source": "url", "path": url}))
    result = run([sys.executable, "-m", "stages.download"], project, check=False,
                 env={"IMGCLF_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and url in lines[0] and "tried 3 times" in lines[0]
    assert "Offline: download it elsewhere and set data.path" in lines[0]
    assert not (project / "data" / "raw").exists()


def test_tfds_offline_fails_in_seconds_naming_the_url_and_tfds_data_dir(tmp_path, monkeypatch):
    from imgclf.data.sources import iter_tfds

    def no_network(address, timeout=None):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(network.socket, "create_connection", no_network)
    monkeypatch.setattr(network.time, "sleep", lambda seconds: None)
    with pytest.raises(NetworkError) as info:
        next(iter_tfds("tf_flowers", str(tmp_path / "empty")))
    message = str(info.value)
    assert "TFDS dataset 'tf_flowers'" in message and "flower_photos.tgz" in message
    assert "TFDS_DATA_DIR" in message and "data.source: folder" in message


def test_missing_imagenet_weights_name_the_file_and_the_offline_ways(monkeypatch):
    import keras

    from imgclf.model.models import build_backbone

    attempts = []
    url = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
           "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")

    def offline(**kwargs):  # what keras.utils.get_file raises without a network
        attempts.append(kwargs["weights"])
        raise Exception(f"URL fetch failure on {url}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    monkeypatch.setattr(network.time, "sleep", lambda seconds: None)
    with pytest.raises(NetworkError) as info:
        build_backbone("mobilenetv2", "imagenet", 224)
    message = str(info.value)
    assert attempts == ["imagenet"] * 3 and "tried 3 times" in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert ".keras/models/" in message and "model.weights: none" in message


def test_cached_imagenet_weights_are_counted_without_tensorflow(tmp_path):
    """The weights stage's check of a weights file already in Keras' cache: its values counted from
    the HDF5 file as the built backbone counts them, in a process that never imports TensorFlow."""
    import os
    import subprocess

    import h5py
    import numpy as np

    from conftest import ROOT

    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    with h5py.File(models / name, "w") as weights:  # Keras' layout: one group per layer
        weights.create_dataset("Conv1/Conv1/kernel:0", data=np.zeros((3, 3, 3, 32), np.float32))
        weights.create_dataset("bn_Conv1/bn_Conv1/gamma:0", data=np.ones(32, np.float32))
    code = ("import sys; from imgclf.model.weights import fetch_weights; from imgclf.params import ModelParams; "
            "info = fetch_weights(ModelParams('mobilenetv2', 'imagenet', 352, 0.2, 0)); "
            "print(info['parameters'], 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(3 * 3 * 3 * 32 + 32), "False", "False"]


def test_a_damaged_or_absent_weights_file_is_fetched_by_building_the_backbone(tmp_path, monkeypatch):
    from imgclf.model import models
    from imgclf.model.weights import fetch_weights, weights_file_name
    from imgclf.params import ModelParams

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    config = ModelParams("mobilenetv2", "imagenet", 96, 0.2, 0)
    built = []

    class Built:
        def count_params(self):
            return 7

    monkeypatch.setattr(models, "build_backbone", lambda *args: built.append(args) or Built())
    assert fetch_weights(config)["parameters"] == 7  # absent
    (tmp_path / "models" / weights_file_name("mobilenetv2", 96)).write_bytes(b"<html>truncated")
    assert fetch_weights(config)["parameters"] == 7  # not an HDF5 file
    assert built == [("mobilenetv2", "imagenet", 96)] * 2
    assert weights_file_name("mobilenetv2", 352) == weights_file_name("mobilenetv2", 224)  # Keras' 224 px file
