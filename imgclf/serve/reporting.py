"""Writing evaluate's reports: per-model text and tables, prediction CSVs for DVC's confusion
plots, figures, and the baseline-vs-transfer comparison. File I/O only; the numbers come from
:func:`imgclf.serve.evaluation.assess`."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import DataError

from . import evaluation as ev
from . import figures


def write_predictions(path: Path, assessment: ev.Assessment) -> None:
    """One row per test image: path, actual and predicted class, confidence (DVC's confusion plot)."""
    pred = assessment.pred
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "actual", "predicted", "confidence"])
        for file, actual, predicted, conf in zip(assessment.paths, pred.labels, pred.predicted, pred.confidence):
            writer.writerow([file, pred.class_names[actual], pred.class_names[predicted], f"{conf:.4f}"])


def read_predictions(path: Path, paths: list[str], class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class indices and confidences that :func:`write_predictions` wrote, in the
    order of ``paths``; a DataError naming the file if it does not cover exactly those images."""
    if not path.is_file():
        raise DataError(f"{path}: not found (run `dvc repro evaluate` first)")
    with path.open(newline="") as fh:
        rows = {row["path"]: row for row in csv.DictReader(fh)}
    index = {name: i for i, name in enumerate(class_names)}
    if set(rows) != set(paths) or any(rows[p]["predicted"] not in index for p in paths):
        raise DataError(f"{path} was written for other test images or classes: run `dvc repro evaluate`")
    predicted = np.array([index[rows[p]["predicted"]] for p in paths], np.int64)
    return predicted, np.array([float(rows[p]["confidence"]) for p in paths])


def write_model_report(name: str, assessment: ev.Assessment, reports: Path, plots: Path, root: Path) -> None:
    """``reports/<name>_*`` and ``plots/<name>_*`` of one model; image paths are relative to ``root``."""
    pred, names = assessment.pred, assessment.pred.class_names
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{name}_classification_report.txt").write_text(ev.classification_report(pred))
    (reports / f"{name}_per_class.md").write_text(ev.markdown_table(assessment.per_class))
    write_predictions(plots / f"{name}_predictions.csv", assessment)
    figures.confusion_heatmap(assessment.confusion, names, plots / f"{name}_confusion.png",
                              f"{name}: normalized confusion")
    figures.roc_curves(assessment.roc, plots / f"{name}_roc.png", f"{name}: one-vs-rest ROC")
    figures.reliability_diagram(assessment.reliability, plots / f"{name}_reliability.png",
                                f"{name}: reliability on the test split")
    figures.image_grid(
        [(root / assessment.paths[i], f"true {names[pred.labels[i]]}\npred {names[pred.predicted[i]]} "
                                      f"{pred.confidence[i]:.2f}") for i in assessment.wrong],
        plots / f"{name}_most_confident_errors.png", columns=4,
        title=f"{name}: most confidently wrong test images" + ("" if len(assessment.wrong) else " (none)"))


def write_comparison(rows: list[dict], reports: Path) -> str:
    """``comparison.md`` (returned) and ``comparison.csv``: one row per model."""
    text = "# Baseline vs transfer learning\n\n" + ev.markdown_table(rows) + "\n" + ev.comparison_summary(rows)
    (reports / "comparison.md").write_text(text)
    with (reports / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return text
