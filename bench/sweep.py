"""Try several head/finetune (or baseline) recipes on one split in one process (data decoded once).

    python bench/sweep.py --split data/split \
        "finetune.learning_rate=1e-4" "finetune.learning_rate=1e-4,finetune.cached_views=1"
    python bench/sweep.py --stage baseline "augment.crop=0,augment.rotation=0.1" ""

Each argument is a comma-separated list of params overrides (like `dvc exp run -S`), applied
to params.yaml with model.backbone=mobilenetv2 ("" = params.yaml as it is). Prints validation
and test accuracy, macro F1 and seconds per phase for each; a quick way to choose what to
confirm with `dvc exp run`.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgclf.train import training  # noqa: E402
from imgclf.data.datasets import class_names, load_subset  # noqa: E402
from imgclf.params import params_from_dict, with_overrides  # noqa: E402
from imgclf.serve.evaluation import Predictions, summary_metrics  # noqa: E402
from imgclf.serve.inference import predict_probs  # noqa: E402
from imgclf.train.activations import backbone_cut, compute_activations  # noqa: E402


def apply(raw: dict, overrides: str) -> dict:
    return with_overrides(raw, [item for item in overrides.split(",") if item])


def metrics_of(probs: np.ndarray, subset) -> dict:
    m = summary_metrics(Predictions(probs, subset.labels, subset.class_names))
    return {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}


def score(model, subset, params) -> dict:
    return metrics_of(predict_probs(model, subset, params.train.tta), subset)


def probabilities(model, val, test, params) -> dict:
    """The model's val and test probabilities: scored in the row, and what --save writes."""
    return {"val": predict_probs(model, val, params.train.tta), "test": predict_probs(model, test, params.train.tta)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default=str(ROOT / "data" / "split"))
    parser.add_argument("--stage", choices=("finetune", "head", "baseline"), default="finetune",
                        help="finetune: head then fine-tune (default); head: the head only; "
                             "baseline: the CNN from scratch")
    parser.add_argument("--average", type=lambda text: [int(k) for k in text.split(",")], default=[],
                        help="K1,K2,...: also score the fine-tuned weights averaged over the last K epochs")
    parser.add_argument("--snapshots", type=lambda text: [int(k) for k in text.split(",")], default=[],
                        help="K1,K2,...: also score the probabilities averaged over the last K epochs' weights "
                             "(a snapshot ensemble: several members from one training run)")
    parser.add_argument("--cycles", type=int, default=0,
                        help="N: fine-tune on N cosine cycles with warm restarts instead of the params' schedule, "
                             "and also score the probabilities averaged over each cycle's last epoch "
                             "(a snapshot ensemble: N members from one training run)")
    parser.add_argument("--save", type=Path, default=None,
                        help="folder: also write each fine-tuned model's val and test probabilities "
                             "(<row>.npz), to score ensembles of rows afterwards")
    parser.add_argument("--soup", action="store_true",
                        help="also score the fine-tuned weights of every two or more rows that share a head, "
                             "averaged (one model), beside their probabilities averaged (an ensemble)")
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    if args.cycles:
        training.finetune_learning_rate = cyclic_learning_rate(args.cycles)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["model"].update(backbone="mobilenetv2", weights="imagenet")
    split = Path(args.split)
    names = class_names(split)
    data, heads, tops = {}, {}, []
    for index, overrides in enumerate(args.configs):
        params = params_from_dict(apply(base, overrides))
        size = params.baseline.image_size if args.stage == "baseline" else params.model.image_size
        if size not in data:
            started = time.perf_counter()
            data[size] = [load_subset(split, s, size, names) for s in ("train", "val", "test")]
            print(f"decoded {size}px in {time.perf_counter() - started:.1f}s", flush=True)
        train, val, test = data[size]
        if args.stage == "baseline":
            training.configure(params.seed, params.train)
            result = training.train_baseline(train, val, params.baseline, params.train, params.augment, params.seed)
            row = {"overrides": overrides, "baseline_seconds": round(result.seconds, 1),
                   "epochs": result.epochs_run, "val": score(result.model, val, params),
                   "test": score(result.model, test, params)}
            print("RESULT " + json.dumps(row), flush=True)
            continue
        head_key = json.dumps([params.model.__dict__, params.head.__dict__, params.train.__dict__,
                               params.finetune.unfreeze_layers], default=str)
        training.configure(params.seed, params.train)
        if head_key not in heads:
            backbone, cut = backbone_cut(params.model, params.finetune)
            work = Path(tempfile.mkdtemp(prefix="sweep-"))  # activations and features on disk
            acts = compute_activations(backbone, cut, params.model.backbone, train, val, work / "acts")
            result = training.train_head_on_activations(acts, params.model, params.head, params.train,
                                                        params.seed)
            heads[head_key] = (result.model.get_weights(), result.seconds,
                               probabilities(result.model, val, test, params), acts, work)
        weights, head_seconds, head_probs, acts, work = heads[head_key]
        head_val, head_test = metrics_of(head_probs["val"], val), metrics_of(head_probs["test"], test)
        if args.stage == "head":
            row = {"overrides": overrides, "head_seconds": round(head_seconds, 1), "head_val": head_val,
                   "head_test": head_test}
            print("RESULT " + json.dumps(row), flush=True)
            continue
        model = training.models.build_transfer_model(params.model, len(names))
        model.set_weights(weights)
        snapshots = []
        with snapshots_of_each_epoch(snapshots):
            result = training.train_finetune(model, train, val, params.finetune, params.train, params.augment,
                                             params.seed, acts if params.finetune.cache_activations else None, work)
        probs = probabilities(result.model, val, test, params)
        row = {"overrides": overrides, "head_seconds": round(head_seconds, 1), "head_val": head_val,
               "head_test": head_test, "finetune_seconds": round(result.seconds, 1),
               "finetune_epochs": result.epochs_run, "val": metrics_of(probs["val"], val),
               "test": metrics_of(probs["test"], test)}
        if not params.train.tta:  # what test-time augmentation would give, at the cost of one more pass
            mirrored = params_from_dict(apply(base, overrides + ",train.tta=true"))
            row.update(val_tta=score(result.model, val, mirrored), test_tta=score(result.model, test, mirrored))
        kept = result.model.get_weights()
        for k in args.average:
            if len(snapshots) >= k:
                result.fitted_model.set_weights([np.mean(ws, axis=0) for ws in zip(*snapshots[-k:])])
                row[f"average_last_{k}"] = {"val": score(result.model, val, params),
                                            "test": score(result.model, test, params)}
        cycle_ends = [(i + 1) * params.finetune.epochs // args.cycles - 1 for i in range(args.cycles)]
        groups = {f"snapshots_last_{k}": snapshots[-k:] for k in args.snapshots if len(snapshots) >= k}
        if args.cycles and len(snapshots) == params.finetune.epochs:
            groups["snapshots_cycle_ends"] = [snapshots[i] for i in cycle_ends]
        for name, group in groups.items():
            members = []
            for weights in group:
                result.fitted_model.set_weights(weights)
                members.append(probabilities(result.model, val, test, params))
            mean = {s: np.mean([m[s] for m in members], axis=0) for s in ("val", "test")}
            row[name] = {"val": metrics_of(mean["val"], val), "test": metrics_of(mean["test"], test),
                         "each_val": [metrics_of(m["val"], val)["accuracy"] for m in members]}
        result.model.set_weights(kept)
        if args.soup:
            tops.append((index, head_key, kept, probs))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.savez(args.save / f"{index}.npz", overrides=overrides, val_labels=val.labels,
                     test_labels=test.labels, **probs, head_val=head_probs["val"], head_test=head_probs["test"])
        print("RESULT " + json.dumps(row), flush=True)
    if tops:
        score_soups(tops, result.model, val, test, params)


def score_soups(tops: list, model, val, test, params) -> None:
    """Every combination of two or more fine-tuned rows with the same head: their weights averaged
    into one model (a soup) and their probabilities averaged (an ensemble), on val and test."""
    for size in range(2, len(tops) + 1):
        for group in itertools.combinations(tops, size):
            if len({head_key for _, head_key, _, _ in group}) > 1:
                continue
            model.set_weights([np.mean(ws, axis=0) for ws in zip(*(weights for _, _, weights, _ in group))])
            mean_probs = {s: np.mean([probs[s] for *_, probs in group], axis=0) for s in ("val", "test")}
            row = {"rows": [index for index, *_ in group], "soup_val": score(model, val, params),
                   "soup_test": score(model, test, params), "ensemble_val": metrics_of(mean_probs["val"], val),
                   "ensemble_test": metrics_of(mean_probs["test"], test)}
            print("SOUP " + json.dumps(row), flush=True)


def cyclic_learning_rate(cycles: int):
    """A stand-in for :func:`training.finetune_learning_rate`: ``cycles`` cosine decays from
    ``finetune.learning_rate`` to 0, each over ``epochs / cycles`` epochs (warm restarts)."""
    import keras

    def schedule(finetune, steps_per_epoch: int):
        return keras.optimizers.schedules.CosineDecayRestarts(
            finetune.learning_rate, first_decay_steps=finetune.epochs // cycles * steps_per_epoch)

    return schedule


@contextlib.contextmanager
def snapshots_of_each_epoch(into: list):
    """Record the trained model's weights at the end of every epoch (before the rules act)."""
    original = training.RulesCallback.on_epoch_end

    def recording(self, epoch, logs=None):
        into.append(self.model.get_weights())
        original(self, epoch, logs)

    training.RulesCallback.on_epoch_end = recording
    try:
        yield
    finally:
        training.RulesCallback.on_epoch_end = original


if __name__ == "__main__":
    main()
