"""The activations cache: the backbone's frozen bottom run once per train and val image (the
activations stage), read back by the head and finetune stages, and the pooled features of every
split computed from it once (the head's inputs, the audit's space). Every pass streams batches
from disk, so memory does not grow with the data."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from ..data.datasets import Examples
from ..data.store import RecordFile, RecordWriter, StoredSet, building, open_split, read_info, write_index, write_info
from ..errors import DataError
from ..model import models
from ..params import FinetuneParams, ModelParams
from ..serve.inference import Runner, run_outputs, runner_for
from . import distributed


def compute_outputs(model: keras.Model | Runner, examples: Examples, path: Path, augment=None) -> StoredSet:
    """Run a frozen ``model`` (or its :class:`~imgclf.serve.inference.Runner`) once over every example,
    streaming its float32 outputs into the record file ``path`` (``.npy``); returns them as
    examples with the same labels and paths."""
    keras_model = model.model if isinstance(model, Runner) else model
    shape = tuple(keras_model.output.shape[1:])
    with RecordWriter(path, len(examples), shape, np.float32) as writer:
        for outputs in run_outputs(model, examples, augment=augment):
            writer.write(outputs)
    return StoredSet(RecordFile(path), examples.labels, list(getattr(examples, "paths", [])),
                     examples.class_names)


@dataclass
class Activations:
    """The frozen bottom's outputs for the train and val images, and the backbone they came
    from, cut at the input of its layer ``cut`` (what the activations stage writes)."""

    train: Examples
    val: Examples
    backbone: keras.Model
    cut: int
    runtime: dict | None = None  # how the frozen bottom ran: runtime, why, parity with Keras
    features: dict[str, Examples] = field(default_factory=dict)  # pooled features per split (the head's inputs)
    features_runtime: dict = field(default_factory=dict)  # how the frozen top ran ("pooled_top"; "bottom": test)


FEATURES = "features"  # the subfolder of the pooled features: a store of its own, one record file per split


def backbone_cut(model_config: ModelParams, finetune: FinetuneParams) -> tuple[keras.Model, int]:
    """The backbone (ImageNet weights from Keras' cache, or random with ``weights: none``) and
    the index of the first layer fine-tuning trains: the cut of the cached activations."""
    with distributed.strategy().scope():  # its variables are those of the models built around it
        backbone = models.build_backbone(model_config.backbone, model_config.weights, model_config.image_size)
    _, _, cut = models.split_backbone(backbone, finetune.unfreeze_layers)
    return backbone, cut


def compute_activations(backbone: keras.Model, cut: int, backbone_name: str, train_set: Examples,
                        val_set: Examples, folder: Path, test_set: Examples | None = None) -> Activations:
    """Run the backbone's bottom (below layer ``cut``) once over the train and val images,
    into ``folder/{train,val}.npy``, and their pooled features (with ``test_set``, also the test
    images') into ``folder/features`` (:func:`write_features`)."""
    bottom, _ = models.split_at(backbone, cut)
    extractor = models.image_extractor(backbone_name, bottom, train_set.record_shape[0])
    folder.mkdir(parents=True, exist_ok=True)
    run = runner_for(extractor, train_set, len(train_set) + len(val_set) + len(test_set or []))
    started = time.perf_counter()
    train, val = (compute_outputs(run, examples, folder / f"{split}.npy")
                  for split, examples in (("train", train_set), ("val", val_set)))
    seconds = time.perf_counter() - started
    report = {**run.report, "pass_seconds": round(seconds, 2),
              "images_per_s": round((len(train_set) + len(val_set)) / max(seconds, 1e-9), 1)}
    activations = Activations(train, val, backbone, cut, report)
    activations.features, activations.features_runtime = write_features(
        activations, run, test_set, folder / FEATURES, backbone_name, train_set.record_shape[0])
    return activations


def write_features(activations: Activations, bottom: Runner, test_set: Examples | None, folder: Path,
                   backbone_name: str, image_size: int) -> tuple[dict[str, StoredSet], dict]:
    """The backbone's globally pooled features, once per image: train and val from their cached
    activations through the frozen top, the test images (if given) through ``bottom`` first. A
    store in ``folder`` (``{split}.npy``, ``.csv``, ``info.json``) that the head trains on and the
    audit reads without TensorFlow. Returns them, and how each network ran."""
    _, top = models.split_at(activations.backbone, activations.cut)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sources = {"train": activations.train, "val": activations.val}
    pooled = runner_for(models.pooled_top(top), activations.train,
                        len(activations.train) + len(activations.val) + len(test_set or []))
    features = {split: compute_outputs(pooled, examples, folder / f"{split}.npy") for split, examples in sources.items()}
    runtime = {"pooled_top": pooled.report}
    if test_set is not None:
        scratch = folder / "test_activations.npy"
        test_activations = compute_outputs(bottom, test_set, scratch)
        features["test"] = compute_outputs(pooled, test_activations, folder / "test.npy")
        test_activations.records.close()
        scratch.unlink()
        runtime["bottom"] = bottom.report
    for split, examples in features.items():
        write_index(folder / f"{split}.csv", examples.paths, examples.labels)
    write_info(folder, activations.train.class_names, {split: len(f) for split, f in features.items()},
               image_size=image_size, backbone=backbone_name, runtime=runtime,
               seconds=round(time.perf_counter() - started, 2))
    return features, runtime


BACKBONE_FILE = "backbone.keras"


def write_activations(model_config: ModelParams, finetune: FinetuneParams, train_set, val_set, test_set,
                      target: Path) -> dict:
    """The activations stage: the backbone's frozen bottom once over the train and val images
    of the store into ``target`` (``{train,val}.npy`` and ``.csv``, ``info.json``), with the
    backbone itself (``backbone.keras``), so the head trains on exactly the weights that made
    them, and the pooled features of every split (``features/``). Written to a temporary folder
    that replaces ``target`` at the end. Returns the info."""
    backbone, cut = backbone_cut(model_config, finetune)
    bottom, _ = models.split_at(backbone, cut)
    per_image = int(np.prod(bottom.output.shape[1:])) * 4
    needed = (len(train_set) + len(val_set) + len(test_set)) * per_image + 2**27  # + the backbone file
    with building(target, needed) as tmp:
        activations = compute_activations(backbone, cut, model_config.backbone, train_set, val_set, tmp, test_set)
        for split, examples in (("train", train_set), ("val", val_set)):
            write_index(tmp / f"{split}.csv", examples.paths, examples.labels)
        backbone.save(tmp / BACKBONE_FILE)
        info = {"image_size": model_config.image_size, "backbone": model_config.backbone,
                "weights": model_config.weights, "cut": cut, "cut_layer": backbone.layers[cut].name,
                "unfreeze_layers": finetune.unfreeze_layers, "shape": list(bottom.output.shape[1:]),
                "runtime": activations.runtime, "images_per_s": activations.runtime["images_per_s"],
                "feature_seconds": read_info(tmp / FEATURES)["seconds"]}
        write_info(tmp, train_set.class_names, {"train": len(train_set), "val": len(val_set)}, **info)
    return info


def open_activations(folder: Path, backbone: str, image_size: int, load_backbone: bool = True) -> Activations:
    """The activations stage's output; a DataError if it was made for another backbone or size."""
    info = read_info(folder)
    if (info["backbone"], info["image_size"]) != (backbone, image_size):
        raise DataError(f"{folder} holds {info['backbone']} activations at {info['image_size']} px, "
                        f"not {backbone} at {image_size} px: run `dvc repro` to rebuild it")
    model = None
    if load_backbone:
        with distributed.strategy().scope():
            model = keras.models.load_model(folder / BACKBONE_FILE, compile=False, safe_mode=True)
    features = read_info(folder / FEATURES)
    return Activations(open_split(folder, "train"), open_split(folder, "val"), model, int(info["cut"]),
                       info["runtime"], {split: open_split(folder / FEATURES, split) for split in features["splits"]},
                       features["runtime"])
