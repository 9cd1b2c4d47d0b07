"""Examples (images or cached backbone outputs) as tf.data pipelines.

Anything with ``labels``, ``class_names``, ``record_shape``, ``dtype`` and ``read(indices)``
is a set of examples: a split of an on-disk store (:class:`imgclf.data.store.StoredSet`, what
the stages use) or an in-memory :class:`ImageSet` (tests, benchmarks). Pipelines shuffle
indices only and read each batch's records when it is needed, so memory does not grow
with the number of examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError
from .images import is_image_path


class Examples(Protocol):
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int: ...

    @property
    def record_shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, indices) -> np.ndarray: ...


@dataclass
class ImageSet:
    """Examples held in memory: ``images`` is any ``(N, ...)`` array."""

    images: np.ndarray
    labels: np.ndarray  # (N,) int32
    paths: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def record_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def read(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]


def class_names(split_dir: Path) -> list[str]:
    train = split_dir / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"training images not found: {train} (run the split stage first)")
    names = sorted(d.name for d in train.iterdir() if d.is_dir())
    if len(names) < 2:
        raise DataError(f"{train} needs at least two class folders, found {names}")
    return names


def list_subset(split_dir: Path, subset: str, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Image files of ``split_dir/subset/<class>/`` in class order, and their labels."""
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
    return paths, np.asarray(labels, dtype=np.int32)


def load_subset(split_dir: Path, subset: str, size: int, names: list[str]) -> ImageSet:
    """A split decoded into memory (small data: tests, sweeps). Stages read the store instead."""
    from .images import load_images

    paths, labels = list_subset(split_dir, subset, names)
    return ImageSet(load_images(paths, size), labels, paths, names)


def record_batches(examples: Examples, batch_size: int):
    """Successive batches of ``examples``' records as float32 arrays, in order, read in the calling
    thread: the input of an inference pass. Not through tf.data: its threads busy-wait between
    batches, and beside LiteRT on 2 cores they took most of the processor (evaluate's test pass
    at 352 px: 41 s through a tf.data pipeline, 10 s read so, same predictions)."""
    for start in range(0, len(examples), batch_size):
        yield np.asarray(examples.read(np.arange(start, min(start + batch_size, len(examples)))), np.float32)


def batches(examples: Examples, batch_size: int, shuffle: bool = False, seed: int = 0, augment=None,
            labels: bool = True, repeat: bool = False, shard: tuple[int, int] | None = None, mix=None):
    """A batched, prefetched tf.data pipeline of float32 inputs (and one-hot labels).

    Only indices are shuffled (reshuffled every epoch); each batch's records are read in a
    parallel map. With the same seed the order equals that of shuffling the examples themselves.
    ``shard=(count, index)``: every ``count``-th index of that order from ``index`` on (one
    worker's share, under multi-worker training). ``mix``: a function of a batch's number, inputs and
    labels applied after ``augment`` (:func:`imgclf.train.augment.mixup`).
    """
    import tensorflow as tf

    count = len(examples)
    ds = tf.data.Dataset.range(count)
    if shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if shard:
        ds = ds.shard(*shard)
    dtype, shape = tf.as_dtype(examples.dtype), examples.record_shape
    classes, label_of = len(examples.class_names), tf.constant(np.asarray(examples.labels, np.int32))

    def load(indices):  # float32 per batch, so no full float copy of the inputs
        x = tf.numpy_function(examples.read, [indices], dtype, name="read_records")
        x = tf.cast(tf.ensure_shape(x, (None, *shape)), tf.float32)
        return (x, tf.one_hot(tf.gather(label_of, indices), classes)) if labels else x

    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        # Augmented one batch at a time, in order: in a parallel map the random draws reach the
        # batches in a racy order, and a rerun (after a crash, say) must train on the same views.
        ds = ds.map(lambda *batch: (augment(batch[0], training=True), *batch[1:]) if labels
                    else augment(batch[0], training=True))
    if mix is not None and labels:
        ds = ds.enumerate().map(lambda number, batch: mix(number, *batch))  # each batch its own draws
    # two batches ready are enough for a training step to never wait; an autotuned buffer grows
    # while the consumer waits (a busy machine) and held 20-60 MiB more after a 10,000-image epoch
    return ds.prefetch(2)
