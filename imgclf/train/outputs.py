"""Writing a training stage's outputs: model, history plot data, summary numbers, MLflow."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from .. import cluster, console
from ..data.datasets import Examples
from ..model.modelio import ModelInfo, save_model
from ..project import Layout, write_json
from ..serve.inference import PARITY_IMAGES
from ..track.model_packaging import log_served_model
from ..track.tracking import StageRun
from .training import TrainResult


def write_history(history: dict[str, list[float]], path: Path) -> None:
    """One row per epoch (1-based), as DVC plots expect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(history)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *keys])
        for epoch in range(len(history.get("loss", []))):
            writer.writerow([epoch + 1, *(f"{history[k][epoch]:.6g}" for k in keys)])


def weights_digest(model) -> str:
    """A short hash of every weight's bytes: equal on every worker of a cluster after training."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def save_training_outputs(layout: Layout, result: TrainResult, info: ModelInfo, run: StageRun,
                          val: Examples, register_as: str = "") -> str:
    """The model (with its ModelInfo), per-epoch history, summary numbers, and the same in MLflow (the
    per-epoch metrics were logged live); ``val``: the validation images, whose first becomes the
    logged model's input example and whose first few check its LiteRT conversion against Keras;
    ``register_as``: a Model Registry name for it.
    Returns the stage's line (:func:`training_line`)."""
    stage = info.stage
    if cluster.cluster() is not None:  # the workers of a cluster end with equal weights: this shows it
        print(f"{stage}: trained weights sha256 {weights_digest(result.model)} ({cluster.task_name()})")
        if not cluster.is_chief():
            return f"{stage}: not the chief of the cluster in TF_CONFIG: writes nothing"
    model_path = layout.model(stage)
    save_model(result.model, model_path, info)
    history_path = layout.plots(stage) / "history.csv"
    write_history(result.history, history_path)
    summary = result.summary()
    summary["model_file_mb"] = round(model_path.stat().st_size / 2**20, 3)
    write_json(layout.summary(stage), summary)
    # the kept epoch's val_loss/val_accuracy under other names: logged at step 0 under the per-epoch
    # names, they would add a stray point to those curves
    run.log_metrics({(f"kept_{k}" if k in result.history else k): v for k, v in summary.items()})
    run.log_artifacts(history_path)
    example = val.read(np.arange(min(PARITY_IMAGES, len(val))))
    version = log_served_model(run, model_path, stage, example, register_as)
    return training_line(stage, summary, f"{register_as} version {version}" if version else "")


def training_line(stage: str, summary: dict, registered: str = "") -> str:
    """``finetune: val accuracy 0.9559 (2 tops; kept epoch 6 of 8), 4 min 31 s training; registered ...``"""
    if "best_epoch" not in summary:
        return f"{stage}: no epoch ran ({console.seconds(summary['train_seconds'])})"
    accuracy = summary.get("ensemble_val_accuracy", summary["val_accuracy"])
    members = f"{summary['members']} tops; " if "members" in summary else ""
    line = (f"{stage}: val accuracy {accuracy:.4f} ({members}kept epoch {summary['best_epoch']} of "
            f"{summary['epochs_run']}), {console.seconds(summary['train_seconds'])} training")
    return line + (f"; registered as {registered}" if registered else "")
