"""The on-disk store: records read back exactly, by any index order; built atomically; a full
disk or a store of another size stops with a clear error; streaming from it trains the same
model as the arrays in memory; and memory does not grow with the size of the split."""
import errno
import json
import os

import numpy as np
import pytest
from conftest import make_folder, run_program, tiny_params

from imgclf import project
from imgclf.data import store
from imgclf.data.datasets import ImageSet, batches, list_subset
from imgclf.data.images import decode_rgb
from imgclf.errors import DataError
from imgclf.params import params_from_dict
from imgclf.train import training


def test_records_round_trip_in_any_order(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (37, 5, 4, 3), dtype=np.uint8)
    with store.RecordWriter(tmp_path / "r.npy", 37, (5, 4, 3), np.uint8) as writer:
        for start in range(0, 37, 10):
            writer.write(data[start:start + 10])
    records = store.RecordFile(tmp_path / "r.npy")
    assert (len(records), records.shape, records.dtype) == (37, (5, 4, 3), np.uint8)
    for order in (np.arange(37), np.random.default_rng(1).permutation(37), [3, 4, 5, 0, 36, 36, 7]):
        np.testing.assert_array_equal(records.read(order), data[np.asarray(order)])
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), data)  # a plain .npy file
    with pytest.raises(IndexError):
        records.read([37])


def test_a_truncated_record_file_is_refused_naming_it(tmp_path):
    with store.RecordWriter(tmp_path / "r.npy", 4, (8,), np.float32) as writer:
        writer.write(np.zeros((4, 8), np.float32))
    with open(tmp_path / "r.npy", "r+b") as fh:
        fh.truncate(os.path.getsize(tmp_path / "r.npy") - 10)
    with pytest.raises(DataError, match="r.npy"):
        store.RecordFile(tmp_path / "r.npy")
    with pytest.raises(ValueError, match="3 of 4 records"):
        with store.RecordWriter(tmp_path / "s.npy", 4, (8,), np.float32) as writer:
            writer.write(np.zeros((3, 8), np.float32))


def split_folder(tmp_path, per_class=6):
    split = tmp_path / "data" / "split"
    for name in ("train", "val", "test"):
        make_folder(split / name, classes=3, per_class=per_class, seed={"train": 0, "val": 1, "test": 2}[name])
    names = ["class_0", "class_1", "class_2"]
    return split, names, {s: list_subset(split, s, names) for s in ("train", "val", "test")}


def test_image_store_holds_every_split_decoded_once_with_relative_paths(tmp_path):
    split, names, subsets = split_folder(tmp_path)
    target = tmp_path / "data" / "store" / "transfer"
    counts = store.build_image_store(subsets, names, 40, target, tmp_path)
    assert counts == {"train": 18, "val": 18, "test": 18}
    info = json.loads((target / "info.json").read_text())
    assert info["image_size"] == 40 and info["class_names"] == names
    test = store.open_split(target, "test", 40)
    assert test.paths[0].startswith("data/split/test/class_0/")  # relative: valid in exp temp copies
    np.testing.assert_array_equal(test.labels, subsets["test"][1])
    expected = np.stack([decode_rgb(tmp_path / p, 40) for p in test.paths])
    np.testing.assert_array_equal(test.read(np.arange(len(test))), expected)
    with pytest.raises(DataError, match="holds images of 40 px, not 96 px"):
        store.open_split(target, "test", 96)
    assert sorted(p.name for p in target.parent.iterdir()) == ["transfer"]  # no temporary folder left


def test_an_interrupted_build_leaves_no_store_and_no_half_written_files(tmp_path, monkeypatch):
    split, names, subsets = split_folder(tmp_path)
    target = tmp_path / "data" / "store" / "transfer"
    store.build_image_store(subsets, names, 24, target, tmp_path)
    before = (target / "train.npy").read_bytes()
    calls = []

    def failing(path, size):
        calls.append(path)
        if len(calls) > 20:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second split
        return decode_rgb(path, size)

    monkeypatch.setattr("imgclf.data.images.decode_rgb", failing)
    with pytest.raises(KeyboardInterrupt):
        store.build_image_store(subsets, names, 32, target, tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["transfer"]
    assert (target / "train.npy").read_bytes() == before  # the old store is untouched


def test_a_full_disk_stops_before_writing_and_names_the_folder(tmp_path, monkeypatch):
    split, names, subsets = split_folder(tmp_path)
    target = tmp_path / "data" / "store" / "transfer"
    real = store.shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(DataError, match=f"not enough disk space in {target.parent}: needs"):
        store.build_image_store(subsets, names, 64, target, tmp_path)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_running_out_of_space_while_writing_is_a_clear_error(tmp_path, monkeypatch):
    split, names, subsets = split_folder(tmp_path)
    target = tmp_path / "data" / "store" / "transfer"

    def full(self, batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.RecordWriter, "write", full)
    with pytest.raises(DataError, match=f"disk full while writing {target}"):
        store.build_image_store(subsets, names, 32, target, tmp_path)
    assert list(target.parent.iterdir()) == []


def test_shuffled_batches_come_in_the_order_of_shuffling_the_arrays_themselves():
    """Indices are shuffled instead of the images: with the same seed, the same batches as
    the in-memory pipeline of earlier versions (tf.data.Dataset.from_tensor_slices(...).shuffle)."""
    import tensorflow as tf

    images = np.broadcast_to(np.arange(50, dtype=np.uint8)[:, None, None, None], (50, 2, 2, 3)).copy()
    labels = np.arange(50, dtype=np.int32) % 5
    examples = ImageSet(images, labels, [], [str(i) for i in range(5)])
    old = tf.data.Dataset.from_tensor_slices(images).shuffle(50, seed=7, reshuffle_each_iteration=True).batch(8)
    new = batches(examples, 8, shuffle=True, seed=7)
    for _ in range(2):  # two epochs: reshuffled alike
        for (x_new, y_new), x_old in zip(new, old):
            np.testing.assert_array_equal(x_new.numpy(), x_old.numpy().astype(np.float32))
            firsts = x_new.numpy()[:, 0, 0, 0].astype(int)  # the example each row came from
            np.testing.assert_array_equal(y_new.numpy().argmax(1), labels[firsts])


def test_training_from_the_store_equals_training_from_memory(tmp_path):
    """Same seed, same batches: the same losses and weights up to float rounding (2e-3). Without
    augmentation: its random ops run in a parallel tf.data map, which draws random numbers in
    scheduling order, so augmented runs differ run to run in either path."""
    split, names, subsets = split_folder(tmp_path, per_class=8)
    target = tmp_path / "store"
    store.build_image_store(subsets, names, 32, target, tmp_path)
    on_disk = [store.open_split(target, s, 32) for s in ("train", "val")]
    in_memory = [ImageSet(s.read(np.arange(len(s))), s.labels, s.paths, s.class_names) for s in on_disk]
    params = params_from_dict(tiny_params(baseline={"epochs": 3, "patience": 0},
                                          augment={"flip": False, "crop": 0.0}))
    results = []
    for train, val in (on_disk, in_memory):
        training.configure(params.seed, params.train)
        results.append(training.train_baseline(train, val, params.baseline, params.train, params.augment,
                                               params.seed))
    np.testing.assert_allclose(results[0].history["loss"], results[1].history["loss"], rtol=2e-3)
    np.testing.assert_allclose(results[0].history["val_loss"], results[1].history["val_loss"], rtol=2e-3)
    for a, b in zip(results[0].model.get_weights(), results[1].model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)


def synthetic_store(folder, count: int, size: int = 128):
    """A store of ``count`` random images (train) and 16 (val), written as the store stage does."""
    rng = np.random.default_rng(count)
    folder.mkdir(parents=True)
    for split, n in (("train", count), ("val", 16)):
        with store.RecordWriter(folder / f"{split}.npy", n, (size, size, 3), np.uint8) as writer:
            for start in range(0, n, 256):
                writer.write(rng.integers(0, 255, (min(256, n - start), size, size, 3), dtype=np.uint8))
        store.write_index(folder / f"{split}.csv", [f"{i}.jpg" for i in range(n)], np.arange(n) % 3)
    store.write_info(folder, ["a", "b", "c"], {"train": count, "val": 16}, image_size=size)
    return folder


def peak_mib(folder, mode: str) -> float:
    done = run_program("peak_rss.py", str(folder), mode)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split("PEAK_MIB")[-1])


@pytest.mark.slow
def test_memory_does_not_grow_with_the_split(tmp_path):
    """A 40x larger training split (10,000 images, 469 MiB of pixels, against 250) adds almost
    nothing to the stage's peak memory; holding the split in memory adds at least half its size.

    One process's peak varies by about 20 MiB from run to run (allocator and thread layout: 17.7
    MiB once in CI with 3,000 images), so the split is large enough for a 10% margin to clear that
    noise: measured here, streaming adds 16 MiB and holding the split 473-477 MiB (with tf.data's
    autotuned prefetch buffer, since capped at two batches, streaming added 21-60 MiB)."""
    count = 10_000
    small = peak_mib(synthetic_store(tmp_path / "small", 250), "stream")
    large = synthetic_store(tmp_path / "large", count)
    streamed = peak_mib(large, "stream")
    held = peak_mib(large, "memory")
    pixels = count * 128 * 128 * 3 / 2**20
    assert streamed - small < 0.1 * pixels, (small, streamed, held)
    assert held - small > 0.5 * pixels, (small, streamed, held)  # the test can tell the difference


def arenas(mode: str) -> int:
    done = run_program("malloc_arenas.py", mode)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("ARENAS")[-1])


def test_stages_cap_malloc_arenas():
    """Every stage starts with limit_malloc_arenas (run_stage): eight threads allocating at once
    then share two arenas, where glibc would give each its own (and freed batches stay resident
    across them: a second 2,250-image pass at 288 px grew a process by 0.6 GiB)."""
    assert arenas("limit") == project.MALLOC_ARENAS
    assert arenas("default") > project.MALLOC_ARENAS  # the test can tell the difference
