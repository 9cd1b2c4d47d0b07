"""Matplotlib figures written as PNG files (headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.images import decode_rgb  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def class_distribution(counts: dict[str, int], path: Path) -> None:
    labels = list(counts)
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3.5))
    bars = ax.bar(labels, [counts[k] for k in labels], color="tab:blue")
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.set_title(f"Class distribution ({sum(counts.values())} images)")
    ax.tick_params(axis="x", rotation=30)
    _save(fig, path)


def image_grid(items: Sequence[tuple[Path, str]], path: Path, columns: int = 6, size: int = 160,
               title: str = "") -> None:
    """A grid of images with a caption each; ``items`` are (file, caption)."""
    rows = max(1, int(np.ceil(len(items) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (file, caption) in zip(axes.flat, items):
        ax.imshow(decode_rgb(file, size))
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def overlay_grid(images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray], captions: Sequence[str],
                 colors: Sequence[str], path: Path, columns: int = 4, title: str = "") -> None:
    """Images with a heat map blended on top, captioned; caption colour marks right/wrong."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.8, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, caption, color in zip(axes.flat, images, heatmaps, captions, colors):
        ax.imshow(image.astype(np.uint8))
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
        ax.set_title(caption, fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def confusion_heatmap(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (recall per true class on the diagonal)."""
    totals = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    size = max(4, 0.7 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{normalized[i, j]:.2f}\n({matrix[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if normalized[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def learning_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Loss and accuracy per epoch for several models side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, history in histories.items():
        for ax, metric in zip(axes, ("loss", "accuracy")):
            if metric in history:
                ax.plot(history[metric], label=f"{name} train")
            if f"val_{metric}" in history:
                ax.plot(history[f"val_{metric}"], "--", label=f"{name} val")
            ax.set_xlabel("epoch")
            ax.set_title(metric)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                        title: str = "") -> None:
    """Accuracy against mean confidence per confidence bin, one line per
    ``label -> (mean confidence, accuracy, count)`` per bin (empty bins are skipped); on the
    diagonal, confidence matches accuracy."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, (confidence, accuracy, counts) in curves.items():
        shown = counts > 0
        ax.plot(confidence[shown], accuracy[shown], marker="o", label=label)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)
