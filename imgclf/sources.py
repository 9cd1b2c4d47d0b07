"""Where raw images come from: a TFDS dataset, a folder of class subfolders, or an archive."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .params import DataParams, ParamsError
from .project import DataError


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


def iter_tfds(name: str, data_dir: str | None = None) -> Iterator[SourceImage]:
    """Yield every record of every split of a TFDS image classification dataset, with its
    original encoded bytes (no decode and re-encode)."""
    import tensorflow_datasets as tfds

    datasets, info = tfds.load(
        name,
        split=None,
        data_dir=data_dir,
        with_info=True,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    label_feature = info.features["label"]
    for split_name in sorted(datasets):
        for index, record in enumerate(tfds.as_numpy(datasets[split_name])):
            label = label_feature.int2str(int(record["label"]))
            yield SourceImage(label, f"tfds:{name}/{split_name}[{index}]", bytes(record["image"]))


def fetch_archive(data: DataParams, root: Path, workdir: Path) -> Path:
    """Download (or locate) the archive, check its sha256, extract it and return the folder
    whose subfolders are the classes."""
    if _is_url(data.path):
        archive = workdir / Path(data.path.split("?")[0]).name
        with urllib.request.urlopen(data.path, timeout=60) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
