"""Where raw images come from: a TFDS dataset, a folder of class subfolders, or an archive."""
from __future__ import annotations

import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..network import NetworkError, cached_download, check_reachable, sha256_file, short_reason, transient
from ..params import DataParams, ParamsError


@dataclass(frozen=True)
class SourceImage:
    """One labelled image as found in the source, before validation."""

    label: str
    origin: str  # file path or dataset record id, for reports
    data: bytes


def check_source(data: DataParams, root: Path) -> None:
    """Fail fast, naming the params key, if the configured source cannot exist."""
    if data.source == "folder":
        path = resolve(data.path, root)
        if not path.is_dir():
            raise ParamsError("data.path", f"folder not found: {path}")
        classes = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not classes:
            raise ParamsError("data.path", f"{path} has no class subfolders (expected <path>/<class>/<image>)")
        empty = sorted(str(c) for c in classes if not any(f.is_file() for f in c.rglob("*")))
        if empty:
            raise DataError(f"empty class folder(s) in data.path: {', '.join(empty)}")
    elif data.source == "url" and not _is_url(data.path):
        path = resolve(data.path, root)
        if not path.is_file():
            raise ParamsError("data.path", f"archive not found: {path}")
        if not _archive_kind(path.name):
            raise ParamsError("data.path", f"{path.name} is not a .tgz, .tar.gz, .tar or .zip archive")


def resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root / p)


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://", "ftp://"))


def _archive_kind(name: str) -> str | None:
    name = name.lower()
    if name.endswith((".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tar.xz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    return None


def iter_folder(path: Path) -> Iterator[SourceImage | tuple[str, str]]:
    """Yield images under ``path/<class>/**``; files outside a class folder are yielded as
    ``(origin, reason)`` so they can be reported."""
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            yield str(entry), "not inside a class folder"
            continue
        for file in sorted(p for p in entry.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in file.relative_to(entry).parts):
                continue  # .DS_Store, editor swap files, .ipynb_checkpoints
            yield SourceImage(entry.name, str(file), file.read_bytes())


TFDS_OFFLINE = ("Offline: set TFDS_DATA_DIR to a folder that holds the prepared dataset "
                "(<TFDS_DATA_DIR>/{name}/<version>/), or use your own photos with data.source: folder")


def iter_tfds(name: str, data_dir: str | None = None) -> Iterator[SourceImage]:
    """Yield every record of every split of a TFDS image classification dataset, with its
    original encoded bytes (no decode and re-encode). When the dataset is not prepared yet,
    its download hosts are checked first, so an offline machine fails in seconds with one
    line instead of after TFDS's own minutes of retries. A dataset prepared as TFRecord files
    (TFDS's default) is read without TensorFlow (:mod:`imgclf.data.tfrecord`); another file
    format through ``tfds.load``."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ParamsError("data.name", f"{name!r} is not a TFDS dataset") from None
    offline = TFDS_OFFLINE.format(name=name)
    if not builder.is_prepared():
        for url in (type(builder).url_infos or {}):
            check_reachable(url, f"TFDS dataset {name!r}", offline)
        try:
            builder.download_and_prepare()
        except Exception as err:  # noqa: BLE001 - network errors only, the rest is re-raised
            if not transient(err):
                raise
            raise NetworkError(f"cannot download TFDS dataset {name!r} ({short_reason(err)}). {offline}") from None
    records = tfrecord_examples if on_local_tfrecords(builder) else tfds_load_examples
    label_feature = builder.info.features["label"]
    for split_name, index, image, label in records(builder):
        yield SourceImage(label_feature.int2str(label), f"tfds:{name}/{split_name}[{index}]", image)


def on_local_tfrecords(builder) -> bool:
    """The dataset is prepared as TFRecord files on a local disk (not array_record, not gs://)."""
    paths = [str(path) for split in builder.info.splits.values() for path in split.filepaths]
    return builder.info.file_format.value == "tfrecord" and all(os.path.isfile(path) for path in paths)


TFDS_BLOCK = 16  # tfds.ReadConfig's interleave_block_length, and its cycle length unless shuffling is disabled


def tfrecord_examples(builder) -> Iterator[tuple[str, int, bytes, int]]:
    """(split, index, encoded image, label) of every record of a TFDS dataset prepared as
    TFRecord files, in the order ``tfds.load`` gives them without shuffling: blocks of 16
    records from up to 16 shards in turn (so each image keeps the index it has always had)."""
    from .tfrecord import read_examples

    cycle = 1 if builder.info.disable_shuffling else TFDS_BLOCK
    for split_name in sorted(builder.info.splits):
        shards = [read_examples(Path(str(path)), ("image", "label"))
                  for path in builder.info.splits[split_name].filepaths]
        for index, features in enumerate(interleave(shards, cycle, TFDS_BLOCK)):
            yield split_name, index, features["image"][0], int(features["label"][0])


def interleave(sources: list[Iterator], cycle_length: int, block_length: int) -> Iterator:
    """The items of ``sources`` in the order of ``tf.data.Dataset.interleave``: up to
    ``cycle_length`` sources open at once, ``block_length`` items from each in turn; a slot whose
    source ends is refilled with the next source the next time the cycle reaches it."""
    pending, slots = iter(sources), [None] * cycle_length
    inputs_left = True
    while inputs_left or any(slot is not None for slot in slots):
        for c in range(cycle_length):
            if slots[c] is None and inputs_left:
                slots[c] = next(pending, None)
                inputs_left = slots[c] is not None
            if slots[c] is None:
                continue
            for _ in range(block_length):
                item = next(slots[c], None)
                if item is None:
                    slots[c] = None
                    break
                yield item


def tfds_load_examples(builder) -> Iterator[tuple[str, int, bytes, int]]:
    """(split, index, encoded image, label) of every record, through ``tfds.load`` (TensorFlow)."""
    import tensorflow_datasets as tfds

    datasets = builder.as_dataset(split=None, decoders={"image": tfds.decode.SkipDecoding()})
    for split_name in sorted(datasets):
        for index, record in enumerate(tfds.as_numpy(datasets[split_name])):
            yield split_name, index, bytes(record["image"]), int(record["label"])


ARCHIVE_OFFLINE = "Offline: download it elsewhere and set data.path to the local file"


def fetch_archive(data: DataParams, root: Path, workdir: Path) -> Path:
    """Download (once: kept by URL and sha256) or locate the archive, check its sha256,
    extract it and return the folder whose subfolders are the classes."""
    if _is_url(data.path):
        archive = cached_download(data.path, data.sha256, ARCHIVE_OFFLINE)
    else:
        archive = resolve(data.path, root)
    kind = _archive_kind(archive.name)
    if kind is None:
        raise ParamsError("data.path", f"{archive.name} is not a .tgz, .tar.gz, .tar or .zip archive")
    if data.sha256:
        digest = sha256_file(archive)
        if digest.lower() != data.sha256.lower():
            raise ParamsError("data.sha256", f"{archive} has sha256 {digest}, expected {data.sha256}")
    extract_to = workdir / "extracted"
    extract_to.mkdir()
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                _check_member(member, extract_to)
            zf.extractall(extract_to)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(extract_to, filter="data")
    return class_root(extract_to)


def _check_member(name: str, dest: Path) -> None:
    target = (dest / name).resolve()
    if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
        raise DataError(f"archive member escapes the extraction folder: {name}")


def class_root(folder: Path) -> Path:
    """Descend through single-folder wrappers (``flower_photos/``) to the class folders."""
    while True:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        if len(subdirs) != 1:
            return folder
        inner = [p for p in subdirs[0].iterdir() if p.is_dir()]
        if not inner:  # the single folder is itself the only class
            return folder
        folder = subdirs[0]


def iter_source(data: DataParams, root: Path, workdir: Path) -> Iterator[SourceImage | tuple[str, str]]:
    """Images of the configured source (see :func:`iter_folder` for the tuple items)."""
    if data.source == "tfds":
        yield from iter_tfds(data.name, os.environ.get("TFDS_DATA_DIR"))
    elif data.source == "folder":
        yield from iter_folder(resolve(data.path, root))
    else:
        yield from iter_folder(fetch_archive(data, root, workdir))


def temporary_workdir(parent: Path) -> tempfile.TemporaryDirectory:
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=".download-")
