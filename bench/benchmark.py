"""Benchmark: the usual notebook transfer-learning recipe vs this pipeline's training.

Both run in one process on the same tf_flowers images (TFDS `train`, sliced 70/15/15 in
order, as `train[:70%]`, `train[70%:85%]`, `train[85%:]`), on the same machine, with
MobileNetV2 ImageNet weights. Prints wall time per phase, test accuracy and macro F1 for
both, as a table and as JSON (also written to bench/results/benchmark.json).

    export TFDS_DATA_DIR=/path/to/tensorflow_datasets      # with tf_flowers prepared
    python bench/benchmark.py                              # both recipes
    python bench/benchmark.py --only pipeline              # just ours
    python bench/benchmark.py --repro                      # and a whole `dvc repro` from empty
    python bench/benchmark.py --recipe fast=model.image_size=224,finetune.members=1,finetune.epochs=4
                                                           # and other recipes

The pipeline side uses params.yaml (its input size too) with model.backbone=mobilenetv2 and
model.weights=imagenet; the reference recipe runs at 224 px, the size of its ImageNet weights. It also
times the frozen pass on Keras over the first 256 training images, for the runtime ratio. `--repro`
adds a whole pipeline run as a user makes it: this project copied into an empty folder, `git init`,
`dvc init`, `dvc repro` (every stage, each its own process, MLflow tracking into the folder), then
the iteration loop: that run committed and `dvc exp run -S finetune.learning_rate=...` timed. Each
`--recipe NAME=OVERRIDES` also times that recipe's frozen pass, head and fine-tuning (params.yaml with
the overrides, as `dvc exp run -S` sets them) against the same notebook run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgclf.train import training  # noqa: E402
from imgclf.data.datasets import ImageSet  # noqa: E402
from imgclf.data.images import decode_rgb  # noqa: E402
from imgclf.params import params_from_dict, with_overrides  # noqa: E402
from imgclf.serve.evaluation import Predictions, summary_metrics  # noqa: E402
from imgclf.serve.inference import predict_probs  # noqa: E402
from imgclf.train.activations import backbone_cut, compute_activations  # noqa: E402

SIZE = 224


def tfds_slices(name: str = "tf_flowers"):
    """Encoded images and labels of the 70/15/15 slices, in TFDS order."""
    import tensorflow_datasets as tfds

    ds, info = tfds.load(name, split="train", with_info=True, decoders={"image": tfds.decode.SkipDecoding()})
    records = [(bytes(r["image"]), int(r["label"])) for r in tfds.as_numpy(ds)]
    n = len(records)
    cuts = [0, int(round(n * 0.70)), int(round(n * 0.85)), n]
    parts = [records[cuts[i]:cuts[i + 1]] for i in range(3)]
    return parts, info.features["label"].names


def reference_recipe(parts, num_classes: int, seed: int) -> dict:
    """The notebook recipe: tf.data decode per epoch, augmentation inside the model,
    frozen MobileNetV2 5 epochs at 1e-3, then the last 30 layers at 1e-5 for 4 epochs."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)

    def to_ds(records, shuffle):
        data = [r[0] for r in records]
        labels = [r[1] for r in records]
        ds = tf.data.Dataset.from_tensor_slices((data, labels))
        if shuffle:
            ds = ds.shuffle(len(records), seed=seed)

        def decode(x, y):
            image = tf.image.decode_jpeg(x, channels=3)
            return tf.image.resize(image, (SIZE, SIZE)), y

        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(32).prefetch(tf.data.AUTOTUNE)

    train, val, test = to_ds(parts[0], True), to_ds(parts[1], False), to_ds(parts[2], False)
    base = keras.applications.MobileNetV2(include_top=False, weights="imagenet", input_shape=(SIZE, SIZE, 3))
    base.trainable = False
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.15),
                                keras.layers.RandomZoom(0.15)])
    inputs = keras.Input((SIZE, SIZE, 3))
    x = augment(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(train, validation_data=val, epochs=5, callbacks=[stop], verbose=2)
    head_seconds = time.perf_counter() - started

    base.trainable = True
    for layer in base.layers[:-30]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(train, validation_data=val, epochs=4, callbacks=[stop], verbose=2)
    finetune_seconds = time.perf_counter() - started

    labels = np.array([r[1] for r in parts[2]])
    probs = model.predict(test, verbose=0)
    metrics = summary_metrics(Predictions(probs, labels, [str(i) for i in range(num_classes)]))
    return {"head_seconds": head_seconds, "finetune_seconds": finetune_seconds,
            "total_seconds": head_seconds + finetune_seconds,
            "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}


def pipeline_params(params_path: Path, overrides: list[str] = ()) -> dict:
    """params.yaml with model.backbone=mobilenetv2 and ImageNet weights, then ``overrides``."""
    import yaml

    raw = with_overrides(yaml.safe_load(params_path.read_text()),
                         ["model.backbone=mobilenetv2", "model.weights=imagenet"])
    return with_overrides(raw, overrides)


def pipeline_recipe(parts, names: list[str], raw: dict) -> dict:
    """This pipeline's stages from decoding to fine-tuning with the given params: the images
    decoded once (into memory here: TFDS gives bytes, not files), the frozen bottom once over
    train and val (activations on disk, as the activations stage writes them), the head on
    features pooled from them, fine-tuning on the same activations."""
    import tempfile

    params = params_from_dict(raw)
    size = params.model.image_size  # the default recipe's; the reference stays at its own SIZE
    training.configure(params.seed, params.train)

    started = time.perf_counter()
    sets = []
    for records in parts:
        images = np.stack([decode_rgb(data, size) for data, _ in records])
        labels = np.array([label for _, label in records], dtype=np.int32)
        sets.append(ImageSet(images, labels, [""] * len(labels), names))
    decode_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        backbone, cut = backbone_cut(params.model, params.finetune)
        activations = compute_activations(backbone, cut, params.model.backbone, sets[0], sets[1],
                                                   work / "activations")
        activation_seconds = time.perf_counter() - started
        frozen = activations.runtime
        keras_rate = keras_frozen_pass_rate(backbone, cut, params.model.backbone, sets[0], size)
        head = training.train_head_on_activations(activations, params.model, params.head, params.train,
                                                  params.seed)
        finetune = training.train_finetune(head.model, sets[0], sets[1], params.finetune, params.train,
                                           params.augment, params.seed, activations, work)
    probs = predict_probs(finetune.model, sets[2], params.train.tta)
    metrics = summary_metrics(Predictions(probs, sets[2].labels, names))
    training_seconds = activation_seconds + head.seconds + finetune.seconds  # what the reference times
    return {"image_size": size, "members": params.finetune.members, "decode_seconds": decode_seconds,
            "activation_seconds": activation_seconds,
            "head_seconds": head.seconds, "finetune_seconds": finetune.seconds,
            "head_plus_finetune_seconds": training_seconds, "total_seconds": decode_seconds + training_seconds,
            "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
            "head_epochs": head.epochs_run, "finetune_epochs": finetune.epochs_run,
            "frozen_pass": {"runtime": frozen["runtime"], "images_per_s": frozen["images_per_s"],
                            "convert_seconds": frozen.get("convert_seconds", 0), "parity": frozen.get("parity"),
                            "keras_images_per_s_first_256": round(keras_rate, 1)}}


def keras_frozen_pass_rate(backbone, cut: int, backbone_name: str, images: ImageSet, size: int,
                           count: int = 256) -> float:
    """Images per second of the same frozen bottom on Keras (4-image batches, as the Keras path
    runs on a CPU) over the first ``count`` images: the runtime ratio, measured in the same run."""
    from imgclf.model import models

    bottom, _ = models.split_at(backbone, cut)
    extractor = models.image_extractor(backbone_name, bottom, size)
    x = images.images[:count].astype(np.float32)
    extractor.predict_on_batch(x[:4])  # trace
    started = time.perf_counter()
    for i in range(0, len(x), 4):
        extractor.predict_on_batch(x[i:i + 4])
    return len(x) / (time.perf_counter() - started)


PROJECT_FILES = ("imgclf", "stages", "dvc.yaml", "corrections.csv", "inputs", ".gitignore", ".dvcignore")


TRAINING_STAGES = ("baseline", "head", "finetune")


def timed_dvc(root: Path, args: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Run ``dvc <args>`` in ``root``, its output passed on: total seconds and seconds per stage
    (from DVC's "Running stage" lines)."""
    stages, current = {}, None
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        print(line, end="", flush=True)
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            now = time.perf_counter() - started
            if current:
                stages[current[0]] = round(now - current[1], 1)
            current = (match.group(1), now)
    total = time.perf_counter() - started
    if current:
        stages[current[0]] = round(total - current[1], 1)
    if process.wait() != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed ({process.returncode})")
    return round(total, 1), stages


def repro_pipeline(params: dict) -> dict:
    """A whole `dvc repro` from an empty workspace (this project copied with its DVC config, params
    with mobilenetv2 and ImageNet weights): total wall time, seconds per stage, those of the stages
    that do not train together, the headline metrics; then the iteration loop: the run committed, one
    `dvc exp run -S finetune.learning_rate=...` timed, with the stages it reran."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        for name in PROJECT_FILES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.exists():
                shutil.copy(source, root / name)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
        shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the cache links a clone gets
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
        total, stages = timed_dvc(root, ["repro"], env)
        headline = json.loads((root / "metrics" / "evaluate.json").read_text())
        activations = json.loads((root / "reports" / "activations" / "summary.json").read_text())
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "the committed run"]):
            subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
        rate = params["finetune"]["learning_rate"] / 2
        iteration, rerun = timed_dvc(root, ["exp", "run", "-S", f"finetune.learning_rate={rate:g}"], env)
    return {"total_seconds": total, "stage_seconds": stages, "headline": headline,
            "non_training_seconds": round(sum(v for k, v in stages.items() if k not in TRAINING_STAGES), 1),
            "frozen_pass_images_per_s": activations["images_per_s"], "frozen_pass_runtime": activations["runtime"],
            "iteration": {"command": f"dvc exp run -S finetune.learning_rate={rate:g}", "total_seconds": iteration,
                          "stages_rerun": sorted(rerun), "stage_seconds": rerun}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["reference", "pipeline"], help="run one side only")
    parser.add_argument("--repro", action="store_true", help="also time a whole `dvc repro` from empty")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="also time this pipeline recipe's training phases (params.yaml with these "
                             "overrides, as `dvc exp run -S`), e.g. "
                             "fast=model.image_size=224,finetune.members=1,finetune.epochs=4")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "benchmark.json"))
    args = parser.parse_args()

    import platform

    parts, names = tfds_slices()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
               "date": time.strftime("%Y-%m-%d"),
               "images": {"train": len(parts[0]), "val": len(parts[1]), "test": len(parts[2])}}
    if args.only != "pipeline":
        results["reference"] = reference_recipe(parts, len(names), seed=42)
        print("RESULT reference " + json.dumps(results["reference"]), flush=True)
    if args.only != "reference":
        results["pipeline"] = pipeline_recipe(parts, names, pipeline_params(Path(args.params)))
        print("RESULT pipeline " + json.dumps(results["pipeline"]), flush=True)
        for recipe in args.recipe:
            name, _, overrides = recipe.partition("=")
            items = [item for item in overrides.split(",") if item]
            results.setdefault("recipes", {})[name] = {
                "overrides": items, **pipeline_recipe(parts, names, pipeline_params(Path(args.params), items))}
            print(f"RESULT {name} " + json.dumps(results["recipes"][name]), flush=True)
    if args.repro:
        results["repro"] = repro_pipeline(pipeline_params(Path(args.params)))
        if "reference" in results:
            results["time_ratio_repro"] = round(results["repro"]["total_seconds"]
                                                / results["reference"]["total_seconds"], 3)
            results["time_ratio_iteration"] = round(results["repro"]["iteration"]["total_seconds"]
                                                    / results["reference"]["total_seconds"], 3)
    if "reference" in results and "pipeline" in results:
        reference = results["reference"]["total_seconds"]
        # head + finetune (the frozen pass both share included) against the reference's two phases,
        # and with our one-off decoding included as well
        results["time_ratio_head_plus_finetune"] = round(
            results["pipeline"]["head_plus_finetune_seconds"] / reference, 3)
        results["time_ratio_with_decoding"] = round(results["pipeline"]["total_seconds"] / reference, 3)
        for recipe in results.get("recipes", {}).values():
            recipe["time_ratio_head_plus_finetune"] = round(recipe["head_plus_finetune_seconds"] / reference, 3)

    print("\n| recipe | decode s | frozen pass s | head s | finetune s | total s | test accuracy | macro F1 |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(side, results[side]) for side in ("reference", "pipeline") if side in results]
    rows += list(results.get("recipes", {}).items())
    for side, r in rows:
        print(f"| {side} | {r.get('decode_seconds', 0):.1f} | {r.get('activation_seconds', 0):.1f} | "
              f"{r['head_seconds']:.1f} | {r['finetune_seconds']:.1f} | {r['total_seconds']:.1f} | "
              f"{r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} |")
    if "pipeline" in results:
        frozen = results["pipeline"]["frozen_pass"]
        print(f"\nfrozen pass: {frozen['images_per_s']:.0f} images/s on {frozen['runtime']} "
              f"(Keras: {frozen['keras_images_per_s_first_256']:.0f}), parity {frozen['parity']}")
    if "repro" in results:
        repro = results["repro"]
        print(f"dvc repro from empty: {repro['total_seconds']:.0f} s "
              f"({', '.join(f'{k} {v:.0f}' for k, v in repro['stage_seconds'].items())}), {repro['headline']}; "
              f"the stages that do not train: {repro['non_training_seconds']:.0f} s")
        iteration = repro["iteration"]
        print(f"{iteration['command']} after the committed run: {iteration['total_seconds']:.0f} s, "
              f"rerunning {', '.join(iteration['stages_rerun'])}")
    for key in ("time_ratio_head_plus_finetune", "time_ratio_repro", "time_ratio_iteration"):
        if key in results:
            print(f"{key.replace('time_ratio_', '')}: {results[key]:.2f}x the notebook recipe")
    for name, recipe in results.get("recipes", {}).items():
        if "time_ratio_head_plus_finetune" in recipe:
            print(f"{name} ({','.join(recipe['overrides'])}) head_plus_finetune: "
                  f"{recipe['time_ratio_head_plus_finetune']:.2f}x the notebook recipe")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
