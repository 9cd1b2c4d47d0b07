"""The served MLflow model against `python -m imgclf.predict` on a CPU: throughput and agreement.

Logs a trained model (default `models/finetune.keras` of a real run) as the pipeline logs it, serves it
with `mlflow models serve` on loopback, and has N concurrent clients (default 8) send requests of a few
base64-encoded photos each for a while; then runs `predict` over the same photos in one process. Prints
images per second for both, the served requests' median latency, and how far the served probabilities
are from `predict`'s (the same labels, within the parity tolerance).

    python bench/serving.py [--model models/finetune.keras] [--images data/split/test] [--clients 8]
                            [--batch 4] [--seconds 60]              # JSON in bench/results/serving.json
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_model(model_path: Path, store: str, example: np.ndarray) -> None:
    """``model_path`` logged and registered as `bench` version 1 in ``store``, as the finetune stage does."""
    from mlflow.tracking import MlflowClient

    from imgclf.track.model_packaging import log_served_model
    from imgclf.track.tracking import StageRun

    client = MlflowClient(store)
    experiment = client.create_experiment("serving-bench")
    run = client.create_run(experiment)
    os.environ["MLFLOW_TRACKING_URI"] = store
    version = log_served_model(StageRun(client, run.info.run_id), model_path, "finetune", example, register_as="bench")
    client.set_terminated(run.info.run_id)
    assert version == "1", version


def served_rows(port: int, photos: list[bytes]) -> list[dict]:
    body = {"dataframe_records": [{"image": base64.b64encode(p).decode()} for p in photos]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["predictions"]


def load(port: int, photos: list[bytes], clients: int, batch: int, seconds: float) -> dict:
    """``clients`` threads sending ``batch`` photos per request for ``seconds``."""
    done, latencies, stop_at = [0], [], time.perf_counter() + seconds
    lock = threading.Lock()

    def client(index: int) -> None:
        position = index * batch
        while time.perf_counter() < stop_at:
            chosen = [photos[(position + i) % len(photos)] for i in range(batch)]
            started = time.perf_counter()
            rows = served_rows(port, chosen)
            with lock:
                latencies.append(time.perf_counter() - started)
                done[0] += len(rows)
            position += batch * clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"images_per_s": round(done[0] / wall, 2), "requests": len(latencies),
            "latency_p50_s": round(statistics.median(latencies), 3), "latency_max_s": round(max(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/finetune.keras"))
    parser.add_argument("--images", type=Path, default=Path("data/split/test"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    from imgclf.data.images import decode_rgb
    from imgclf.model.modelio import read_metadata
    from imgclf.predict import predict_files

    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [p.read_bytes() for p in files]
    info = read_metadata(args.model)
    result = {"model": str(args.model), "photos": len(files), "clients": args.clients, "batch": args.batch}

    predict_files(args.model, [str(files[0])], out=io.StringIO(), err=io.StringIO())  # converted, cached
    out = io.StringIO()
    started = time.perf_counter()
    predict_files(args.model, [str(args.images)], k=len(info.class_names), as_json=True, out=out, err=io.StringIO())
    predict_s = time.perf_counter() - started
    predicted = {json.loads(line)["path"]: json.loads(line)["top_k"] for line in out.getvalue().splitlines()}
    result["predict"] = {"images_per_s": round(len(files) / predict_s, 2), "seconds": round(predict_s, 1)}

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        log_model(args.model, store, decode_rgb(files[0], info.image_size)[None])
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": store}
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/bench/1",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("error: mlflow models serve did not start")
                    time.sleep(1)
            served_rows(port, photos[:args.batch])  # warm up
            rows = [row for start in range(0, len(photos), 16) for row in served_rows(port, photos[start:start + 16])]
            result["served"] = load(port, photos, args.clients, args.batch, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=60)
    names = info.class_names
    diffs, same = [], 0
    for path, row in zip(files, rows):
        top = {r["label"]: r["confidence"] for r in predicted[str(path)]}
        diffs.append(max(abs(row[n] - top[n]) for n in names))
        same += row["label"] == predicted[str(path)][0]["label"]
    result["agreement"] = {"same_label": f"{same}/{len(files)}", "max_abs_diff": float(f"{max(diffs):.3g}")}
    result["served_vs_predict"] = round(result["served"]["images_per_s"] / result["predict"]["images_per_s"], 2)
    print(json.dumps(result, indent=2))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
