"""Arrays on disk, read in batches: the decoded-image store and cached backbone outputs.

A store folder holds, per split, ``<split>.npy`` (one fixed-size record per image: uint8
pixels, or float32 activations) and ``<split>.csv`` (path and label of each record), plus
``info.json`` (class names, image size and what made it). Records are written sequentially
and read with ``os.pread`` by index: no stage holds a split in memory, and nothing is
memory-mapped, so the pages read stay in the OS page cache rather than in the stage's
resident memory. ``.npy`` files open in NumPy and any other tool (``np.load(mmap_mode="r")``).
"""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError

INFO_FILE = "info.json"
DECODE_CHUNK = 256  # images decoded (in parallel threads) per write


class RecordWriter:
    """Write ``count`` records of ``shape``/``dtype`` into a ``.npy`` file, batch by batch."""

    def __init__(self, path: Path, count: int, shape: Sequence[int], dtype):
        self.path, self.count = Path(path), count
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.written = 0
        self._file = self.path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (count, *self.shape)}
        np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if batch.shape[1:] != self.shape or self.written + len(batch) > self.count:
            raise ValueError(f"{self.path}: batch of shape {batch.shape} does not fit "
                             f"{self.count} records of {self.shape} ({self.written} written)")
        self._file.write(batch.data)
        self.written += len(batch)

    def close(self) -> None:
        self._file.close()
        if self.written != self.count:
            raise ValueError(f"{self.path}: {self.written} of {self.count} records written")

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()


class RecordFile:
    """Records of a ``.npy`` file, read by index with ``os.pread`` (thread-safe, no memory map)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or not shape:
            raise DataError(f"{self.path}: not a C-ordered array of records")
        self.count, self.shape, self.dtype = int(shape[0]), tuple(shape[1:]), np.dtype(dtype)
        self.record_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        expected = self.offset + self.count * self.record_bytes
        if self.path.stat().st_size != expected:
            raise DataError(f"{self.path}: {self.path.stat().st_size} bytes, expected {expected} "
                            "(an interrupted write?): run `dvc repro` to rebuild it")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.count

    def read(self, indices) -> np.ndarray:
        """Records at ``indices``, in that order, as one ``(len(indices), *shape)`` array."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        out = np.empty((len(indices), *self.shape), self.dtype)
        view = memoryview(out.reshape(len(indices), -1).view(np.uint8).reshape(-1))
        size, k = self.record_bytes, 0
        while k < len(indices):  # one read per run of consecutive indices
            end = k + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            first = int(indices[k])
            if first < 0 or indices[end - 1] >= self.count:
                raise IndexError(f"{self.path}: record index out of range 0..{self.count - 1}")
            want, done = (end - k) * size, 0
            while done < want:
                got = os.preadv(self._fd, [view[k * size + done:end * size]], self.offset + first * size + done)
                if got == 0:
                    raise DataError(f"{self.path}: file ended early")
                done += got
            k = end
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclass
class StoredSet:
    """One split of a store: records on disk, labels and paths in memory (a few bytes each)."""

    records: RecordFile
    labels: np.ndarray  # (N,) int32
    paths: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def record_shape(self) -> tuple[int, ...]:
        return self.records.shape

    @property
    def dtype(self) -> np.dtype:
        return self.records.dtype

    def read(self, indices) -> np.ndarray:
        return self.records.read(indices)


def read_info(folder: Path) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a store (no {INFO_FILE}): run `dvc repro` to build it")
    return json.loads(path.read_text())


def open_split(folder: Path, split: str, image_size: int | None = None) -> StoredSet:
    """A split of the store in ``folder``; with ``image_size``, a DataError unless the store
    holds images of that size (a store built for another size is never read by mistake)."""
    folder = Path(folder)
    info = read_info(folder)
    if image_size is not None and info.get("image_size") != image_size:
        raise DataError(f"{folder} holds images of {info.get('image_size')} px, not {image_size} px: "
                        "run `dvc repro` to rebuild it")
    if split not in info["splits"]:
        raise DataError(f"{folder} has no {split!r} split (it has {', '.join(info['splits'])})")
    paths, labels = [], []
    with (folder / f"{split}.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            paths.append(row["path"])
            labels.append(int(row["label"]))
    records = RecordFile(folder / f"{split}.npy")
    if len(records) != len(labels):
        raise DataError(f"{folder}: {split}.npy has {len(records)} records, {split}.csv {len(labels)} rows")
    return StoredSet(records, np.asarray(labels, dtype=np.int32), paths, list(info["class_names"]))


def check_free_space(folder: Path, needed: int) -> None:
    """DataError naming ``folder`` when its filesystem has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"not enough disk space in {folder}: needs {needed / 2**20:,.0f} MiB, "
                        f"{free / 2**20:,.0f} MiB free")


@contextmanager
def building(target: Path, needed: int) -> Iterator[Path]:
    """A temporary folder beside ``target`` that replaces it only when the block succeeds, so an
    interrupted or failed stage leaves no half-written store. A full disk is a DataError."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(target.parent, needed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the store is an ordinary folder
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(f"disk full while writing {target} (needs about {needed / 2**20:,.0f} MiB "
                            f"in {target.parent})") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_index(path: Path, paths: Sequence[str], labels: Sequence[int]) -> None:
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(zip(paths, (int(label) for label in labels)))


def write_info(folder: Path, class_names: list[str], splits: dict[str, int], **extra) -> None:
    payload = {"class_names": class_names, "splits": splits, **extra}
    (Path(folder) / INFO_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def build_image_store(subsets: dict[str, tuple[list[str], np.ndarray]], class_names: list[str],
                      size: int, target: Path, root: Path, workers: int = 4) -> dict[str, int]:
    """Decode every image once at ``size`` into ``target``: ``subsets`` maps a split to its
    (file paths, labels). Paths are stored relative to ``root``. Returns images per split."""
    from .images import decode_rgb

    record = size * size * 3
    needed = sum(len(paths) for paths, _ in subsets.values()) * record + 2**20
    with building(target, needed) as tmp, ThreadPoolExecutor(max_workers=workers) as pool:
        for split, (paths, labels) in subsets.items():
            with RecordWriter(tmp / f"{split}.npy", len(paths), (size, size, 3), np.uint8) as writer:
                for start in range(0, len(paths), DECODE_CHUNK):
                    chunk = paths[start:start + DECODE_CHUNK]
                    writer.write(np.stack(list(pool.map(lambda p: decode_rgb(p, size), chunk))))
            write_index(tmp / f"{split}.csv", [_relative(p, root) for p in paths], labels)
        counts = {split: len(paths) for split, (paths, _) in subsets.items()}
        write_info(tmp, class_names, counts, image_size=size)
    return counts


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)
