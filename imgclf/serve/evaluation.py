"""Test-set metrics, per-class diagnostics and the baseline-vs-transfer comparison (pure functions)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from ..params import EvaluateParams


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before a folded temperature: ``softmax(T * log p)`` (exact for one model;
    for an ensemble, which averages after the softmax, the nearest this can say from ``probs``)."""
    return softmax(temperature * np.log(np.clip(probs.astype(np.float64), 1e-30, 1.0)))


@dataclass
class Predictions:
    probs: np.ndarray  # (N, C) softmax outputs
    labels: np.ndarray  # (N,) true class indices
    class_names: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy, and image count."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bins are (low, high]
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    return (np.bincount(index, confidence, bins) / safe, np.bincount(index, correct, bins) / safe, counts)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence, accuracy, counts = reliability_bins(probs, labels, bins)
    return float((counts / max(len(labels), 1) * np.abs(accuracy - confidence)).sum())


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def macro_roc_auc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    present = np.unique(labels)
    if len(present) < 2:
        return None
    scores = []
    for c in present:
        scores.append(skm.roc_auc_score(labels == c, probs[:, c]))
    return float(np.mean(scores))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(picked).mean())


def summary_metrics(pred: Predictions, bins: int = 10) -> dict[str, float | None]:
    y, p = pred.labels, pred.predicted
    return {
        "accuracy": float(skm.accuracy_score(y, p)),
        "macro_f1": float(skm.f1_score(y, p, average="macro", labels=range(len(pred.class_names)),
                                       zero_division=0)),
        "weighted_f1": float(skm.f1_score(y, p, average="weighted", zero_division=0)),
        "top2_accuracy": top_k_accuracy(pred.probs, y, 2),
        "roc_auc_macro_ovr": macro_roc_auc(pred.probs, y),
        "ece": expected_calibration_error(pred.probs, y, bins),
        "test_loss": log_loss(pred.probs, y),
        "test_images": int(len(y)),
    }


# Short names of the models in the headline metrics: `dvc exp show` writes each as a column header
# (`fine.acc`), and all six columns must fit a 120-column terminal beside the experiment names.
HEADLINE_NAMES = {"baseline": "base", "head": "head", "finetune": "fine"}


def headline_metrics(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The numbers `dvc exp show` puts first: test accuracy and macro F1 of each model."""
    return {HEADLINE_NAMES[name]: {"acc": r["accuracy"], "f1": r["macro_f1"]} for name, r in results.items()}


def per_class(pred: Predictions) -> list[dict]:
    labels = list(range(len(pred.class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        pred.labels, pred.predicted, labels=labels, zero_division=0)
    return [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])} for i, name in enumerate(pred.class_names)]


def classification_report(pred: Predictions) -> str:
    return skm.classification_report(pred.labels, pred.predicted, labels=range(len(pred.class_names)),
                                     target_names=pred.class_names, digits=4, zero_division=0)


def confusion(pred: Predictions) -> np.ndarray:
    return skm.confusion_matrix(pred.labels, pred.predicted, labels=range(len(pred.class_names)))


def most_confused_pairs(matrix: np.ndarray, names: list[str], top: int = 5) -> list[dict]:
    """Off-diagonal cells, largest first: (actual, predicted, count, share of the actual class)."""
    pairs = []
    totals = matrix.sum(axis=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j and matrix[i, j] > 0:
                pairs.append({"actual": names[i], "predicted": names[j], "count": int(matrix[i, j]),
                              "share_of_actual": round(float(matrix[i, j] / totals[i]), 4)})
    return sorted(pairs, key=lambda d: (-d["count"], d["actual"], d["predicted"]))[:top]


def weak_classes(rows: list[dict], threshold: float) -> list[dict]:
    """Classes under the F1 threshold, each marked by what goes wrong."""
    out = []
    for row in rows:
        if row["f1"] < threshold:
            if row["precision"] < row["recall"]:
                issue = "low precision (over-predicted: other classes are labelled as it)"
            else:
                issue = "low recall (missed: its images are labelled as other classes)"
            out.append({**row, "issue": issue})
    return out


def confidently_wrong(pred: Predictions, count: int) -> np.ndarray:
    """Indices of wrong predictions, most confident first."""
    wrong = np.flatnonzero(pred.predicted != pred.labels)
    return wrong[np.argsort(-pred.confidence[wrong], kind="stable")][:count]


def timed_predictions(predict, images) -> tuple[np.ndarray, float]:
    """``predict(images)`` (an array or a split of the store) and its throughput in images
    per second, timed after a warm-up call on a few images (graph tracing), so the test set is
    predicted only once."""
    predict(images.read(np.arange(min(len(images), 8))) if hasattr(images, "read") else images[:8])
    started = time.perf_counter()
    outputs = predict(images)
    return outputs, float(len(images) / (time.perf_counter() - started))


def overfitting_verdict(train_accuracy: float | None, val_accuracy: float | None) -> tuple[float | None, str]:
    if train_accuracy is None or val_accuracy is None:
        return None, "no training history"
    gap = train_accuracy - val_accuracy
    if gap > 0.10:
        verdict = "overfits: train accuracy well above validation"
    elif gap > 0.03:
        verdict = "mild overfitting"
    elif gap < -0.03:
        verdict = "validation above train (dropout/augmentation make training harder)"
    else:
        verdict = "fits well: train and validation agree"
    return round(gap, 4), verdict


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_rows(evaluated: dict[str, dict], trained: dict[str, dict]) -> list[dict]:
    """One row per model: test quality, training cost and the overfitting gap of the epoch
    whose weights were kept (train and validation accuracy of that same epoch)."""
    rows = []
    for name, test in evaluated.items():
        train = trained.get(name, {})
        gap, verdict = overfitting_verdict(train.get("train_accuracy"), train.get("val_accuracy"))
        rows.append({
            "model": name,
            "test_accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"],
            "kept_epoch": train.get("best_epoch"),
            "val_accuracy": train.get("val_accuracy"),
            "train_seconds": train.get("train_seconds"),
            "params_total": test.get("params_total"),
            "params_trainable": train.get("params_trainable"),
            "overfitting_gap": gap,
            "verdict": verdict,
        })
    return rows


def comparison_summary(rows: list[dict]) -> str:
    """Plain words: which model wins and by how much over the from-scratch baseline."""
    if not rows:
        return ""
    best = max(rows, key=lambda r: (r["macro_f1"], r["test_accuracy"]))
    lines = [f"Best model on the test split: **{best['model']}** "
             f"(accuracy {best['test_accuracy']:.4f}, macro F1 {best['macro_f1']:.4f})."]
    base = next((r for r in rows if r["model"] == "baseline"), None)
    if base and best["model"] != "baseline":
        lines.append(f"Transfer learning beats the CNN trained from scratch by "
                     f"{100 * (best['test_accuracy'] - base['test_accuracy']):+.1f} accuracy points.")
    return "\n\n".join(lines) + "\n"


def roc_curves(pred: Predictions) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curve (false and true positive rates) and its area, per class that has
    both positive and negative test images."""
    curves = {}
    for c, label in enumerate(pred.class_names):
        positive = pred.labels == c
        if positive.any() and (~positive).any():
            fpr, tpr, _ = skm.roc_curve(positive, pred.probs[:, c])
            curves[label] = (fpr, tpr, float(skm.auc(fpr, tpr)))
    return curves


@dataclass
class Assessment:
    """Everything evaluate reports for one model on the test split."""

    pred: Predictions
    paths: list[str]  # test image files, relative to the project
    metrics: dict[str, float | None]
    per_class: list[dict]
    confusion: np.ndarray
    roc: dict[str, tuple[np.ndarray, np.ndarray, float]]
    reliability: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # caption -> bins
    wrong: np.ndarray  # indices of the most confidently wrong images

    def diagnostics(self, f1_threshold: float) -> dict:
        names = self.pred.class_names
        return {
            "per_class": self.per_class,
            "most_confused_pairs": most_confused_pairs(self.confusion, names),
            "weak_classes": weak_classes(self.per_class, f1_threshold),
            "most_confident_errors": [{"path": self.paths[i], "actual": names[self.pred.labels[i]],
                                       "predicted": names[self.pred.predicted[i]],
                                       "confidence": round(float(self.pred.confidence[i]), 4)} for i in self.wrong],
        }


def assess(pred: Predictions, uncalibrated_probs: np.ndarray, temperature: float, paths: list[str],
           evaluate: EvaluateParams) -> Assessment:
    """Metrics and diagnostics of served predictions ``pred`` (temperature-scaled) beside those
    before scaling, on the test split."""
    bins = evaluate.calibration_bins
    metrics = summary_metrics(pred, bins)
    metrics["ece_uncalibrated"] = expected_calibration_error(uncalibrated_probs, pred.labels, bins)
    metrics["temperature"] = temperature
    reliability = {
        f"uncalibrated, ECE {metrics['ece_uncalibrated']:.3f}": reliability_bins(uncalibrated_probs, pred.labels, bins),
        f"served (T = {temperature:.3g}), ECE {metrics['ece']:.3f}": reliability_bins(pred.probs, pred.labels, bins),
    }
    return Assessment(pred, paths, metrics, per_class(pred), confusion(pred), roc_curves(pred), reliability,
                      confidently_wrong(pred, evaluate.gallery_size))
