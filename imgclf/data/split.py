"""Seeded, stratified and stable train/val/test split of ``data/raw/<class>/``.

Each image goes to a split by a hash of its content and the seed, compared with the
cumulative fractions, class by class. Adding images never moves an existing image, and
identical content always lands in the same split, so nothing leaks between splits.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..params import SplitParams
from .images import NEAR_DUPLICATES_FILE, is_image_path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Assignment:
    label: str
    source: Path
    sha256: str
    position: float  # in [0, 1): where the hash falls
    split: str


def hash_position(sha256: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()
    return int(digest[:15], 16) / float(16**15)


def split_for(position: float, fractions: SplitParams) -> str:
    if position < fractions.train:
        return "train"
    if position < fractions.train + fractions.val:
        return "val"
    return "test"


def list_class_images(raw_dir: Path) -> dict[str, list[Path]]:
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw image folder not found: {raw_dir} (run the download stage first)")
    classes = {d.name: sorted(p for p in d.iterdir() if p.is_file() and is_image_path(p))
               for d in sorted(raw_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not classes:
        raise DataError(f"{raw_dir} has no class folders")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"class folder(s) with no images in {raw_dir}: {', '.join(empty)}")
    return classes


def read_groups(raw_dir: Path) -> list[list[Path]]:
    """Near-identical images the download stage found (``near_duplicates.json``), as paths."""
    listing = raw_dir / NEAR_DUPLICATES_FILE
    if not listing.is_file():
        return []
    try:
        groups = json.loads(listing.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{listing} is not valid JSON ({err}); rerun the download stage") from None
    return [[raw_dir / name for name in group] for group in groups]


def assign(classes: dict[str, list[Path]], fractions: SplitParams, seed: int,
           groups: list[list[Path]] = ()) -> list[Assignment]:
    """Assign every image to a split (pure apart from reading the files to hash them).

    The members of a near-duplicate group all take the position of the group's smallest
    content hash, so a group never straddles two splits."""
    sha = {path: hashlib.sha256(path.read_bytes()).hexdigest() for files in classes.values() for path in files}
    key = dict(sha)
    grouped = set()
    for group in groups:
        members = [path for path in group if path in sha]
        if not members:
            continue
        grouped.update(members)
        group_key = min(sha[path] for path in members)
        key.update(dict.fromkeys(members, group_key))
    out: list[Assignment] = []
    for label, files in classes.items():
        items = []
        for path in files:
            position = hash_position(key[path], seed)
            items.append(Assignment(label, path, sha[path], position, split_for(position, fractions)))
        out.extend(_ensure_each_split(items, fractions, grouped))
    return out


def _ensure_each_split(items: list[Assignment], fractions: SplitParams, grouped: set[Path]) -> list[Assignment]:
    """A class with at least 3 images gets at least one in every split: the image whose hash
    lies nearest the empty split's interval is moved there (never a member of a near-duplicate
    group, which stays with its group). Only tiny classes are affected."""
    if len(items) < 3:
        return items
    bounds = {"train": (0.0, fractions.train),
              "val": (fractions.train, fractions.train + fractions.val),
              "test": (fractions.train + fractions.val, 1.0)}
    for split in SPLITS:
        counts = defaultdict(int)
        for item in items:
            counts[item.split] += 1
        if counts[split]:
            continue
        low, high = bounds[split]
        donors = [i for i, item in enumerate(items) if counts[item.split] > 1 and item.source not in grouped]
        if not donors:
            continue
        best = min(donors, key=lambda i: min(abs(items[i].position - low), abs(items[i].position - high)))
        moved = items[best]
        items[best] = Assignment(moved.label, moved.source, moved.sha256, moved.position, split)
    return items


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (no second copy of the bytes), else a copy.
    Safe beside DVC: it replaces files rather than writing into them, and protects cached ones."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def split_name(a: Assignment) -> str:
    """The image's file name in the split: its own, or, when a correction moved it to another
    class, prefixed with the class it came from (which keeps names unique within a class)."""
    return a.source.name if a.source.parent.name == a.label else f"{a.source.parent.name}--{a.source.name}"


def write_split(assignments: list[Assignment], out_dir: Path) -> dict:
    """Link (or copy) images to ``out_dir/<split>/<class>/`` with a manifest; return per-split
    counts. Built in a staging folder and moved into place, so failure leaves no partial output."""
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    labels = sorted({a.label for a in assignments})
    counts = {s: {label: 0 for label in labels} for s in SPLITS}
    try:
        for split in SPLITS:
            for label in labels:
                (staging / split / label).mkdir(parents=True)
        rows = []
        for a in sorted(assignments, key=lambda a: (a.split, a.label, a.source.name)):
            name = split_name(a)
            link_or_copy(a.source, staging / a.split / a.label / name)
            counts[a.split][a.label] += 1
            rows.append({"path": f"{a.split}/{a.label}/{name}", "split": a.split,
                         "label": a.label, "sha256": a.sha256, "source": f"{a.source.parent.name}/{a.source.name}"})
        with (staging / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "split", "label", "sha256", "source"])
            writer.writeheader()
            writer.writerows(rows)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {split: {**per_class, "total": sum(per_class.values())} for split, per_class in counts.items()}


def raw_sources(split_dir: Path, root: Path) -> dict[str, str]:
    """An image's path in the split, relative to ``root`` (as the store lists it) -> its path
    under data/raw (``<class>/<file>``: the class it was downloaded under), from the manifest."""
    prefix = split_dir.resolve().relative_to(root.resolve()).as_posix()
    with (split_dir / "manifest.csv").open(newline="") as fh:
        return {f"{prefix}/{row['path']}": row["source"] for row in csv.DictReader(fh)}
