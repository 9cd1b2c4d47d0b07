"""Images of ``data/split`` as in-memory arrays and tf.data pipelines.

Every image is decoded and resized once per stage; epochs then read the cached uint8
arrays, shuffled, augmented on the fly when asked, and prefetched.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import is_image_path, load_images
from .project import DataError


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int32
    paths: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def class_names(split_dir: Path) -> list[str]:
    train = split_dir / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"training images not found: {train} (run the split stage first)")
    names = sorted(d.name for d in train.iterdir() if d.is_dir())
    if len(names) < 2:
        raise DataError(f"{train} needs at least two class folders, found {names}")
    return names


def load_subset(split_dir: Path, subset: str, size: int, names: list[str]) -> ImageSet:
    paths, labels = [], []
    for index, name in enumerate(names):
        folder = split_dir / subset / name
        files = sorted(p for p in folder.iterdir() if is_image_path(p)) if folder.is_dir() else []
        if not files and subset == "train":
            raise DataError(f"class {name!r} has no training images in {folder}")
        paths.extend(str(p) for p in files)
        labels.extend([index] * len(files))
    if not paths:
        raise DataError(f"no images in {split_dir / subset}")
    return ImageSet(load_images(paths, size), np.asarray(labels, dtype=np.int32), paths, names)


def load_train_val(split_dir: Path, size: int, names: list[str] | None = None
                   ) -> tuple[ImageSet, ImageSet]:
    """Training and validation images at ``size`` (class names from the train folders by default)."""
    names = names or class_names(split_dir)
    return load_subset(split_dir, "train", size, names), load_subset(split_dir, "val", size, names)


def to_dataset(inputs: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
               shuffle: bool = False, seed: int = 0, augment=None):
    """A batched, prefetched tf.data pipeline with one-hot labels."""
    import tensorflow as tf

    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    ds = tf.data.Dataset.from_tensor_slices((inputs, one_hot))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    to_float = _batch_to_float(augment)
    ds = ds.batch(batch_size).map(lambda x, y: (to_float(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def image_batches(images: np.ndarray, batch_size: int, augment=None):
    """Images only, batched and cast to float32 per batch (no full float copy in memory)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return ds.map(_batch_to_float(augment), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _batch_to_float(augment=None):
    """Batch -> float32 (per batch, so no full float copy of the images), augmented if asked."""
    import tensorflow as tf

    if augment is None:
        return lambda x: tf.cast(x, tf.float32)
    return lambda x: augment(tf.cast(x, tf.float32), training=True)
