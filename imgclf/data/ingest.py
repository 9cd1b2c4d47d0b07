"""Validate, de-duplicate and write raw images to ``data/raw/<class>/``, with a report."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from .images import NEAR_DUPLICATES_FILE, BadImageError, inspect_bytes, near_duplicate_groups, normalized_bytes
from .sources import SourceImage


@dataclass
class IngestReport:
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {origin, label, reason}
    duplicates: list[dict] = field(default_factory=list)  # {label, kept, dropped, sha256}
    conflicts: list[dict] = field(default_factory=list)  # {kind, labels, origins}
    near_duplicates: list[dict] = field(default_factory=list)  # {label, files}: kept, in one split
    converted: int = 0
    capped: int = 0

    def summary(self) -> dict:
        return {
            "images": sum(self.counts.values()),
            "classes": len(self.counts),
            "per_class": dict(sorted(self.counts.items())),
            "skipped": len(self.skipped),
            "duplicates_removed": len(self.duplicates),
            "label_conflicts": len(self.conflicts),
            "near_duplicate_groups": len(self.near_duplicates),
            "converted_to_png": self.converted,
            "dropped_by_max_per_class": self.capped,
        }

    def as_dict(self) -> dict:
        return {"summary": self.summary(), "skipped": self.skipped, "duplicates": self.duplicates,
                "conflicts": self.conflicts, "near_duplicates": self.near_duplicates}


@dataclass(frozen=True)
class _Valid:
    label: str
    origin: str
    sha256: str
    phash: bytes
    data: bytes | None  # None once written to the staging folder: no image is held in memory
    extension: str
    converted: bool

    @property
    def staged_name(self) -> str:
        return f"{self.sha256}{self.extension}"

    @property
    def filename(self) -> str:
        return f"{_safe_stem(self.origin)}-{self.sha256[:12]}{self.extension}"


def _safe_stem(origin: str) -> str:
    stem = Path(origin.split(":")[-1]).stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return stem[:40] or "image"


def _validate(item: SourceImage) -> _Valid | dict:
    try:
        info = inspect_bytes(item.data)
        data, extension = normalized_bytes(item.data, info)
    except BadImageError as err:
        return {"origin": item.origin, "label": item.label, "reason": str(err)}
    return _Valid(item.label, item.origin, hashlib.sha256(item.data).hexdigest(), info.phash, data, extension,
                  converted=data is not item.data)


def ingest(items: Iterable[SourceImage | tuple[str, str]], out_dir: Path, *, max_per_class: int, seed: int,
           near_duplicate_bits: int, workers: int = 4) -> IngestReport:
    """Write every valid, unique, unambiguous image to ``out_dir/<label>/``.

    Byte-identical files in one class are kept once. Images within ``near_duplicate_bits``
    of each other (perceptual hash) form a group: under one class the group is kept and
    listed in ``out_dir/near_duplicates.json`` so the split keeps it together; across
    classes it is a label conflict and excluded, like byte-identical files under two classes.
    The folder is built beside ``out_dir`` and moved into place at the end, so a failure
    leaves no half-written output. Raises DataError if no class keeps any image.
    """
    report = IngestReport()
    by_hash: dict[str, dict[str, _Valid]] = defaultdict(dict)  # sha -> label -> first seen
    labels_seen: set[str] = set()
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    incoming = staging / ".incoming"  # every valid image, written as soon as it is checked

    def consume(result: _Valid | dict) -> None:
        if isinstance(result, dict):
            report.skipped.append(result)
            return
        kept = by_hash[result.sha256].get(result.label)
        if kept is not None:
            report.duplicates.append({"label": result.label, "kept": kept.origin,
                                      "dropped": result.origin, "sha256": result.sha256})
            return
        if not by_hash[result.sha256]:
            (incoming / result.staged_name).write_bytes(result.data)
        by_hash[result.sha256][result.label] = dataclasses.replace(result, data=None)

    shutil.rmtree(staging, ignore_errors=True)
    incoming.mkdir(parents=True)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = []
            for item in items:
                if isinstance(item, tuple):
                    report.skipped.append({"origin": item[0], "label": None, "reason": item[1]})
                    continue
                labels_seen.add(item.label)
                pending.append(pool.submit(_validate, item))
                if len(pending) >= 256:
                    for future in pending:
                        consume(future.result())
                    pending = []
            for future in pending:
                consume(future.result())

        per_label: dict[str, list[_Valid]] = defaultdict(list)
        for sha, entries in by_hash.items():
            if len(entries) > 1:
                report.conflicts.append({"kind": "identical", "labels": sorted(entries),
                                         "origins": sorted(v.origin for v in entries.values())})
                continue
            (valid,) = entries.values()
            per_label[valid.label].append(valid)
        groups = _near_duplicates(per_label, near_duplicate_bits, report)

        empty = sorted(labels_seen - {label for label, v in per_label.items() if v})
        if not per_label:
            raise DataError("no valid images found in the data source")
        if empty:
            raise DataError(f"class folder(s) with no valid images: {', '.join(empty)} "
                             "(remove them or add images)")

        for label, images in sorted(per_label.items()):
            images.sort(key=lambda v: hashlib.sha256(f"{seed}:{v.sha256}".encode()).hexdigest())
            if max_per_class and len(images) > max_per_class:
                report.capped += len(images) - max_per_class
                images = images[:max_per_class]
            folder = staging / label
            folder.mkdir(parents=True)
            for valid in images:
                os.replace(incoming / valid.staged_name, folder / valid.filename)
                report.converted += valid.converted
            report.counts[label] = len(images)
        shutil.rmtree(incoming)
        kept_groups = [[f"{v.label}/{v.filename}" for v in group if (staging / v.label / v.filename).exists()]
                       for group in groups]
        kept_groups = [group for group in kept_groups if len(group) > 1]
        (staging / NEAR_DUPLICATES_FILE).write_text(json.dumps(kept_groups, indent=1) + "\n")
        report.near_duplicates = [{"label": g[0].split("/")[0], "files": g} for g in kept_groups]
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.skipped.sort(key=lambda s: s["origin"])
    return report


def _near_duplicates(per_label: dict[str, list[_Valid]], max_bits: int, report: IngestReport) -> list[list[_Valid]]:
    """Near-identical groups within one class (returned); groups spanning classes are label
    conflicts: reported and removed from ``per_label``."""
    kept = [valid for label in sorted(per_label) for valid in per_label[label]]
    groups = []
    for indices in near_duplicate_groups([v.phash for v in kept], max_bits):
        members = [kept[i] for i in indices]
        labels = sorted({v.label for v in members})
        if len(labels) == 1:
            groups.append(members)
            continue
        report.conflicts.append({"kind": "near-identical", "labels": labels,
                                 "origins": sorted(v.origin for v in members)})
        for valid in members:
            per_label[valid.label].remove(valid)
    return groups
