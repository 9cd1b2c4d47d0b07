"""What each backbone costs to train here: the frozen pass and fine-tuning, per input size.

Weights do not change the arithmetic, so every backbone runs with random weights
(`model.weights=none`) on random images, through the pipeline's own functions: the frozen bottom
once over train and val (as the activations stage), the head on its pooled features, then one
fine-tuned top (`finetune.members=1`) for a few epochs on the cached activations. Seconds are
scaled to tf_flowers' default split (2,546 train / 558 val images) and to the params' fine-tuning
epochs and members. Each epoch's fixed costs (validation set-up, the kept epoch's checkpoint) are
scaled with it, so the seconds are upper bounds: compare backbones by their ratio at one size.

    python bench/backbones.py                                   # efficientnetb0, mobilenetv2 at 224 and 352 px
    python bench/backbones.py --backbones resnet50 --sizes 224  # others

JSON in bench/results/backbones.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgclf.data.datasets import ImageSet  # noqa: E402
from imgclf.params import params_from_dict, with_overrides  # noqa: E402
from imgclf.train import training  # noqa: E402
from imgclf.train.activations import backbone_cut, compute_activations  # noqa: E402

FULL_TRAIN, FULL_VAL = 2546, 558


def random_set(count: int, size: int, classes: int, rng: np.random.Generator) -> ImageSet:
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, count).astype(np.int32)
    return ImageSet(images, labels, [""] * count, [f"c{i}" for i in range(classes)])


def measure(raw: dict, backbone: str, size: int, train_count: int, epochs: int) -> dict:
    """Frozen-pass and fine-tuning seconds of one backbone at one size, scaled to the full split.
    A top is fine-tuned for 1 and for ``epochs`` epochs: the difference is the cost of the epochs
    alone, without building and tracing the model."""
    overrides = [f"model.backbone={backbone}", "model.weights=none", f"model.image_size={size}",
                 "head.epochs=1", "finetune.patience=0", "finetune.members=1"]
    params = params_from_dict(with_overrides(raw, overrides))
    longer = params_from_dict(with_overrides(raw, overrides + [f"finetune.epochs={epochs}"])).finetune
    shorter = params_from_dict(with_overrides(raw, overrides + ["finetune.epochs=1"])).finetune
    full = params_from_dict(with_overrides(raw, [f"model.backbone={backbone}"])).finetune
    training.configure(params.seed, params.train)
    rng = np.random.default_rng(params.seed)
    val_count = round(train_count * FULL_VAL / FULL_TRAIN)
    train, val = random_set(train_count, size, 5, rng), random_set(val_count, size, 5, rng)
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as tmp:
        work = Path(tmp)
        network, cut = backbone_cut(params.model, params.finetune)
        activations = compute_activations(network, cut, backbone, train, val, work / "activations")
        head = training.train_head_on_activations(activations, params.model, params.head, params.train,
                                                  params.seed)
        one, several = (training.train_finetune(head.model, train, val, finetune, params.train, params.augment,
                                                params.seed, activations, work) for finetune in (shorter, longer))
    frozen_rate = activations.runtime["images_per_s"]
    epoch_seconds = (several.seconds - one.seconds) / (several.epochs_run - one.epochs_run)
    top_epoch = epoch_seconds * FULL_TRAIN / train_count
    return {"backbone": backbone, "image_size": size, "layers_above_cut": len(network.layers) - cut,
            "activation_shape": list(activations.train.record_shape),
            "frozen_pass_images_per_s": frozen_rate, "frozen_pass_runtime": activations.runtime["runtime"],
            "frozen_pass_seconds_full": round((FULL_TRAIN + FULL_VAL) / frozen_rate, 1),
            "finetune_seconds_per_top_epoch_full": round(top_epoch, 1),
            "finetune_seconds_full": round(top_epoch * full.epochs * full.members, 1),
            "measured": {"train_images": train_count, "val_images": val_count,
                         "finetune_seconds_by_epochs": {one.epochs_run: round(one.seconds, 1),
                                                        several.epochs_run: round(several.seconds, 1)}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv2", "efficientnetb0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 352])
    parser.add_argument("--images", type=int, default=512, help="training images measured (val in proportion)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs measured")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backbones.json"))
    args = parser.parse_args()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    for size in args.sizes:
        for backbone in args.backbones:
            started = time.perf_counter()
            rows.append(measure(raw, backbone, size, args.images, args.epochs))
            rows[-1]["wall_seconds"] = round(time.perf_counter() - started, 1)
            print("RESULT " + json.dumps(rows[-1]), flush=True)
    print("\n| backbone | px | layers above the cut | activations | frozen pass img/s | frozen pass s | "
          "fine-tune s per top-epoch | fine-tune s (params' epochs x members) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['image_size']} | {r['layers_above_cut']} | "
              f"{'x'.join(map(str, r['activation_shape']))} | {r['frozen_pass_images_per_s']:.0f} | "
              f"{r['frozen_pass_seconds_full']:.0f} | {r['finetune_seconds_per_top_epoch_full']:.0f} | "
              f"{r['finetune_seconds_full']:.0f} |")
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
