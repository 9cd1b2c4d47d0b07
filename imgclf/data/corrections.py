"""Label corrections: a reviewed, git-tracked CSV (``path,action,label[,data]``) that the split stage
applies to ``data/raw`` before assigning images to splits, so fixing labels is a commit that DVC
reruns and compares like any other change. Nothing here edits the data itself.

The optional ``data`` column names the data set a row was made for (:attr:`imgclf.params.DataParams.set_name`:
``tf_flowers``, or the folder's or archive's name): rows made for another data set are set aside and
counted, so one file can serve several data sets; a row without it applies to whatever data runs."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ACTIONS = ("exclude", "relabel")
COLUMNS = ["path", "action", "label"]
DATA_COLUMN = "data"  # optional fourth column


@dataclass(frozen=True)
class Correction:
    path: str  # as the image appears under data/raw: <class>/<file>
    action: str  # exclude | relabel
    label: str  # the new class (relabel), empty for exclude
    row: int  # line number in the file, for messages
    data: str = ""  # the data set the row was made for; empty: any


def read_corrections(path: Path) -> list[Correction]:
    """Parse the corrections file; a DataError naming the file and row for anything malformed.
    Whether the images and classes exist is checked by :func:`apply_corrections`."""
    if not path.is_file():
        raise DataError(f"corrections file not found: {path} (split.corrections; an empty file needs only "
                        f"the header {','.join(COLUMNS)})")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [f.strip() for f in reader.fieldnames or []]
        if header not in (COLUMNS, COLUMNS + [DATA_COLUMN]):
            raise DataError(f"{path}: the header must be {','.join(COLUMNS)} (and optionally ,{DATA_COLUMN}), "
                            f"got {','.join(header)}")
        reader.fieldnames = header
        out, seen = [], {}
        for row in reader:
            line = reader.line_num
            where = f"{path}, line {line}"
            if None in row or any(row[c] is None for c in header):
                raise DataError(f"{where}: expected {len(header)} columns ({','.join(header)})")
            item = Correction(row["path"].strip(), row["action"].strip().lower(), row["label"].strip(), line,
                              (row.get(DATA_COLUMN) or "").strip())
            if item.action not in ACTIONS:
                raise DataError(f"{where}: unknown action {item.action!r}; use one of: {', '.join(ACTIONS)}")
            if item.action == "relabel" and not item.label:
                raise DataError(f"{where}: relabel needs the new class in the label column")
            if item.path in seen:
                raise DataError(f"{where}: {item.path} is corrected twice (also on line {seen[item.path]})")
            seen[item.path] = line
            out.append(item)
    return out


def apply_corrections(classes: dict[str, list[Path]], corrections: list[Correction], raw_dir: Path,
                      source: Path, *, subset: bool = False, data_name: str = "",
                      ) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """``classes`` (class -> image files under ``raw_dir``) with images excluded or moved to their
    new class; and the counts. Rows made for another data set than ``data_name`` are set aside and
    counted (``other_data``). A row naming an image that is not there, or an unknown class, stops
    with a DataError naming ``source`` and the row; when ``raw_dir`` holds a capped subset of the data
    (``data.max_per_class``), rows for images left out are skipped and counted instead."""
    out = {label: list(files) for label, files in classes.items()}
    where_is = {f"{label}/{file.name}": label for label, files in classes.items() for file in files}
    mine = [item for item in corrections if not item.data or item.data == data_name]
    if mine and not subset and not any(item.path in where_is for item in mine):
        raise DataError(f"{source}: none of its {len(mine)} rows names an image under {raw_dir}: made for "
                        f"another data set? Name it in a {DATA_COLUMN} column (this data is {data_name!r}), "
                        f"or start a new file from the header line alone: {','.join(COLUMNS)},{DATA_COLUMN}")
    counts = {"excluded": 0, "relabelled": 0, "skipped": 0, "other_data": len(corrections) - len(mine)}
    for item in mine:
        where = f"{source}, line {item.row}"
        label = where_is.get(item.path)
        if label is None and subset:
            counts["skipped"] += 1
            continue
        if label is None:
            raise DataError(f"{where}: no image {item.path} under {raw_dir} (paths are <class>/<file> as in "
                            "data/raw and reports/audit/label_issues.csv)")
        file = raw_dir / item.path
        out[label].remove(file)
        if item.action == "exclude":
            counts["excluded"] += 1
            continue
        if item.label not in out:
            raise DataError(f"{where}: unknown class {item.label!r}; classes: {', '.join(sorted(out))}")
        out[item.label].append(file)
        counts["relabelled"] += 1
    empty = sorted(label for label, files in out.items() if not files)
    if empty:
        raise DataError(f"{source}: the corrections leave no images in class(es) {', '.join(empty)}")
    return {label: sorted(files) for label, files in out.items()}, counts
