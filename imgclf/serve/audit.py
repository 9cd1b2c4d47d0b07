"""Data audit: which labels are likely wrong, which images are outliers, and which images in
different splits are copies of each other, all from the frozen backbone's pooled features.

Every image is scored with class probabilities from a model that never saw it: train and val
by k-fold cross-validation of a logistic regression on their (L2-normalised) features, test by
one fitted on all of train and val. cleanlab ranks the labels (label quality: the probability
given to the label, low = suspicious) and flags label issues."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.images import close_pairs
from ..params import AuditParams

LABEL_ISSUE_COLUMNS = ["path", "split", "given", "suggested", "score"]
TOP_CLASSES = 3  # the out-of-sample probabilities shown beside a suspect
NEIGHBOURS = 4  # photos of its given and of its suggested class, nearest in feature space, shown beside it


@dataclass(frozen=True)
class AuditSet:
    """One split's pooled features, labels and raw paths (``<class>/<file>`` under data/raw)."""

    split: str
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int
    paths: list[str]


class AuditSkipped(Exception):
    """The data cannot be audited (too few images for the folds, a single class): the stage
    writes an empty report with this reason instead of failing the run."""


def check_auditable(sets: list[AuditSet], class_names: list[str], folds: int) -> None:
    if len(class_names) < 2:
        raise AuditSkipped(f"one class only ({', '.join(class_names)}): nothing to tell apart")
    fitted = np.concatenate([s.labels for s in sets if s.split != "test"])
    counts = np.bincount(fitted, minlength=len(class_names))
    small = [f"{class_names[c]} ({counts[c]})" for c in range(len(class_names)) if counts[c] < folds]
    if small:
        raise AuditSkipped(f"class(es) with fewer train+val images than audit.folds={folds}: {', '.join(small)}")


def _classifier(seed: int):
    """Logistic regression on L2-normalised features. Chosen on tf_flowers with 5% of labels
    flipped (docs/audit.md): of the flipped photos, 92-93% rank in the first 2N rows over three
    seeds, against 85-86% with standardised features at C=0.1 (a classifier that fits less of
    the noise leaves the flipped labels less probable)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    return make_pipeline(Normalizer(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed))


def out_of_sample_probs(sets: list[AuditSet], num_classes: int, folds: int, seed: int) -> list[np.ndarray]:
    """Class probabilities for every image of every set, each from a model not fitted on it:
    k-fold cross-validation over train and val together, and a model fitted on both for test."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    fitted = [s for s in sets if s.split != "test"]
    x = np.concatenate([s.features for s in fitted])
    y = np.concatenate([s.labels for s in fitted])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    cross = _full_width(cross_val_predict(_classifier(seed), x, y, cv=cv, method="predict_proba", n_jobs=1),
                        y, num_classes)
    final = _classifier(seed).fit(x, y)
    out, start = [], 0
    for s in sets:
        if s.split == "test":
            out.append(_full_width(final.predict_proba(s.features), y, num_classes))
        else:
            out.append(cross[start:start + len(s.labels)])
            start += len(s.labels)
    return out


def _full_width(probs: np.ndarray, fitted_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over all classes (a class absent from the fitted labels gets 0)."""
    present = np.unique(fitted_labels)
    if len(present) == num_classes:
        return probs
    full = np.zeros((len(probs), num_classes), probs.dtype)
    full[:, present] = probs
    return full


def label_issues(sets: list[AuditSet], probs: list[np.ndarray], class_names: list[str]) -> list[dict]:
    """One row per image, most suspicious first: ``score`` is cleanlab's label quality (the
    out-of-sample probability of the given label; 0 = surely wrong, 1 = surely right) and
    ``issue`` whether cleanlab's noise-rate estimate flags the label. Train+val and test are
    judged separately (their probabilities come from different models)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    rows = []
    groups = [[i for i, s in enumerate(sets) if s.split != "test"], [i for i, s in enumerate(sets) if s.split == "test"]]
    for members in groups:
        if not members:
            continue
        labels = np.concatenate([sets[i].labels for i in members])
        p = np.concatenate([probs[i] for i in members])
        scores = get_label_quality_scores(labels, p, method="self_confidence")
        # n_jobs=1: cleanlab's default is a process pool started by fork from this threaded process,
        # which can hang forever (imgclf/concurrency.py)
        flagged = (find_label_issues(labels, p, filter_by="prune_by_noise_rate", n_jobs=1)
                   if len(np.unique(labels)) > 1 else np.zeros(len(labels), bool))
        suggested = p.argmax(axis=1)
        k = 0
        for i in members:
            for path, label in zip(sets[i].paths, sets[i].labels):
                rows.append({"path": path, "split": sets[i].split, "given": class_names[label],
                             "suggested": class_names[suggested[k]], "score": round(float(scores[k]), 6),
                             "issue": bool(flagged[k])})
                k += 1
    return sorted(rows, key=lambda r: (r["score"], r["path"]))


def suspect_details(sets: list[AuditSet], probs: list[np.ndarray], rows: list[dict],
                    class_names: list[str]) -> list[dict]:
    """The flagged rows of :func:`label_issues` (score order), each with its top classes and the
    photos nearest to it (cosine similarity of the features) among those labelled with its given
    and with its suggested class: what a person reviewing it compares it with."""
    flagged = [row for row in rows if row["issue"]]
    if not flagged:
        return []
    features = np.concatenate([s.features for s in sets]).astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = np.concatenate([s.labels for s in sets])
    paths = [p for s in sets for p in s.paths]
    p_all = np.concatenate(probs)
    where = {path: i for i, path in enumerate(paths)}
    members = [np.flatnonzero(labels == c) for c in range(len(class_names))]
    index = {name: c for c, name in enumerate(class_names)}
    out = []
    block = max(16, _BLOCK_ELEMENTS // max(len(paths), 1))
    for start in range(0, len(flagged), block):
        chunk = flagged[start:start + block]
        rows_i = np.array([where[row["path"]] for row in chunk])
        similarity = features[rows_i] @ features.T  # one block of suspects against every image
        similarity[np.arange(len(chunk)), rows_i] = -np.inf  # never its own neighbour
        for k, (row, i) in enumerate(zip(chunk, rows_i)):
            top = np.argsort(-p_all[i])[:TOP_CLASSES]
            near = {}
            for side in ("given", "suggested"):
                candidates = members[index[row[side]]]
                best = candidates[np.argsort(-similarity[k, candidates])[:NEIGHBOURS]]
                near[side] = [paths[j] for j in best if j != i]
            out.append({**{key: row[key] for key in LABEL_ISSUE_COLUMNS},
                        "top": [[class_names[c], round(float(p_all[i, c]), 4)] for c in top],
                        "like_given": near["given"], "like_suggested": near["suggested"]})
    return out


_BLOCK_ELEMENTS = 4 * 2**20  # 16 MiB of float32 similarities per block of suspects


def outliers(sets: list[AuditSet], class_names: list[str]) -> list[dict]:
    """Images least like the rest (cleanlab's out-of-distribution score on the features: the
    mean distance to their nearest neighbours; low = unusual), most unusual first."""
    import sklearn
    from cleanlab.outlier import OutOfDistribution

    features = np.concatenate([s.features for s in sets])
    k = min(10, len(features) - 1)
    # scikit-learn's nearest-neighbour search takes distance blocks of up to 1 GiB by default:
    # 64 MiB blocks gave the same scores in the same time at 15,000 images, 1.3 GiB less peak memory
    with sklearn.config_context(working_memory=64):
        scores = OutOfDistribution(params={"k": k}).fit_score(features=features, verbose=False)
    rows = [{"path": p, "split": s.split, "label": class_names[label]} for s in sets
            for p, label in zip(s.paths, s.labels)]
    for row, score in zip(rows, scores):
        row["score"] = round(float(score), 6)
    return sorted(rows, key=lambda r: (r["score"], r["path"]))


def cross_split_copies(sets: list[AuditSet], min_similarity: float) -> list[dict]:
    """Pairs of images in different splits whose features have a cosine similarity of at least
    ``min_similarity``: copies a hash missed (recoloured, reframed, edited), which leak between
    the splits. Most similar first."""
    features = np.concatenate([s.features for s in sets]).astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    split = np.concatenate([[i] * len(s.labels) for i, s in enumerate(sets)])
    paths = [p for s in sets for p in s.paths]
    found = [{"path_a": paths[i], "split_a": sets[split[i]].split, "path_b": paths[j],
              "split_b": sets[split[j]].split, "similarity": round(similarity, 4)}
             for i, j, similarity in close_pairs(features, min_similarity) if split[i] != split[j]]
    return sorted(found, key=lambda r: -r["similarity"])


def summarize(rows: list[dict], class_names: list[str], audit: AuditParams) -> dict:
    """Counts of images and flagged labels per split and class, and how the scores were made."""
    per_split: dict[str, dict] = {}
    for row in rows:
        entry = per_split.setdefault(row["split"], {"images": 0, "suspects": 0,
                                                    "suspects_per_class": dict.fromkeys(class_names, 0)})
        entry["images"] += 1
        if row["issue"]:
            entry["suspects"] += 1
            entry["suspects_per_class"][row["given"]] += 1
    return {
        "suspects": sum(e["suspects"] for e in per_split.values()),
        "images": len(rows),
        "per_split": per_split,
        "method": {
            "features": "the frozen backbone's globally pooled features (the head's inputs)",
            "probabilities": f"out of sample: {audit.folds}-fold cross-validation of a logistic regression on "
                             "L2-normalised features over train+val; test scored by one fitted on all of train+val",
            "score": "cleanlab label quality (self_confidence): the probability of the given label; "
                     "0 = surely mislabelled, 1 = surely right; label_issues.csv is sorted by it, lowest first",
            "suspect": "flagged by cleanlab.filter.find_label_issues (prune_by_noise_rate), "
                       "train+val and test judged separately",
        },
    }


@dataclass
class AuditReport:
    label_issues: list[dict]
    outliers: list[dict]
    copies: list[dict]
    summary: dict
    suspects: list[dict]  # the flagged label issues with what reviewing them needs (suspect_details)


def audit(sets: list[AuditSet], class_names: list[str], params: AuditParams, seed: int) -> AuditReport:
    """Label issues, outliers and cross-split copies of ``sets``; an empty report (with the
    reason in its summary) when the data cannot be audited."""
    try:
        check_auditable(sets, class_names, params.folds)
    except AuditSkipped as reason:
        return AuditReport([], [], [], {"suspects": 0, "images": sum(len(s.labels) for s in sets),
                                        "skipped": str(reason)}, [])
    probs = out_of_sample_probs(sets, len(class_names), params.folds, seed)
    rows = label_issues(sets, probs, class_names)
    copies = cross_split_copies(sets, params.copy_similarity)
    summary = summarize(rows, class_names, params)
    summary["cross_split_copies"] = len(copies)
    return AuditReport(rows, outliers(sets, class_names), copies, summary,
                       suspect_details(sets, probs, rows, class_names))
