"""A person's decisions on the audit's suspects, kept in the project's own files: exclude and
relabel are rows of the corrections file (:mod:`imgclf.data.corrections`), one per photo; "the
label is right" (keep) is a row of the memory file ``reviewed.csv`` beside it, so a photo judged
right is not asked about again. Both files are rewritten atomically (a temporary file, then a
rename), their other rows kept in order, and read afresh for every decision, so two pages deciding
the same photo end with the later decision and nothing lost or duplicated."""
from __future__ import annotations

import csv
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .corrections import ACTIONS, COLUMNS, DATA_COLUMN, read_corrections

KEEP = "keep"
DECISIONS = (*ACTIONS, KEEP)
MEMORY_FILE = "reviewed.csv"
MEMORY_COLUMNS = ["path", DATA_COLUMN]


@dataclass(frozen=True)
class Decision:
    action: str  # exclude | relabel | keep
    label: str = ""  # the new class of a relabel


@dataclass(frozen=True)
class _Before:
    """What one decision replaced, for undo: the photo's corrections row and where it stood, and
    whether the memory file held it."""

    path: str
    row: dict | None
    index: int
    kept: bool


def _read(path: Path, columns: list[str]) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        return columns, []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [f.strip() for f in reader.fieldnames or []] or columns
        reader.fieldnames = header
        return header, [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(out.getvalue())
    os.replace(tmp, path)


class Decisions:
    """The decisions stored in ``corrections`` and its memory file, for the data set ``data_name``
    (written in each new row's ``data`` column). Thread-safe; undo works back through this
    object's own decisions."""

    def __init__(self, corrections: Path, data_name: str):
        self.corrections = corrections
        self.memory = corrections.with_name(MEMORY_FILE)
        self.data_name = data_name
        self._lock = threading.Lock()
        self._undo: list[_Before] = []
        read_corrections(corrections)  # a malformed file stops here, naming the file and line
        if not self.memory.exists():  # there from the start, so `git add` of both files always works
            _write(self.memory, MEMORY_COLUMNS, [])

    def current(self) -> dict[str, Decision]:
        """Every photo decided so far: corrections rows, then the photos remembered as right."""
        with self._lock:
            return self._current()

    def _current(self) -> dict[str, Decision]:
        _, rows = _read(self.corrections, COLUMNS)
        found = {row["path"]: Decision(row["action"].lower(), row.get("label", "")) for row in rows}
        _, kept = _read(self.memory, MEMORY_COLUMNS)
        for row in kept:
            found.setdefault(row["path"], Decision(KEEP))
        return found

    def decide(self, path: str, decision: Decision) -> None:
        """Record ``decision`` for ``path``, replacing whatever was decided for it before."""
        if decision.action not in DECISIONS:
            raise ValueError(f"unknown decision {decision.action!r}; one of {', '.join(DECISIONS)}")
        if decision.action == "relabel" and not decision.label:
            raise ValueError("relabel needs the new class")
        with self._lock:
            before = self._set(path, decision)
            self._undo.append(before)

    def undo(self) -> str | None:
        """Put back what the last decision replaced; the photo's path, or None with nothing to undo."""
        with self._lock:
            if not self._undo:
                return None
            before = self._undo.pop()
            header, rows = self._corrections_rows()
            rows = [row for row in rows if row["path"] != before.path]
            if before.row is not None:
                rows.insert(min(before.index, len(rows)), before.row)
            _write(self.corrections, header, rows)
            self._remember(before.path, before.kept)
            return before.path

    def _corrections_rows(self) -> tuple[list[str], list[dict]]:
        header, rows = _read(self.corrections, COLUMNS)
        if DATA_COLUMN not in header:  # a file of three columns gains the fourth; its rows apply to any data
            header = header + [DATA_COLUMN]
        return header, rows

    def _set(self, path: str, decision: Decision) -> _Before:
        header, rows = self._corrections_rows()
        index = next((i for i, row in enumerate(rows) if row["path"] == path), len(rows))
        old = rows[index] if index < len(rows) else None
        _, kept = _read(self.memory, MEMORY_COLUMNS)
        before = _Before(path, old, index, any(row["path"] == path for row in kept))
        if decision.action == KEEP:
            if old is not None:
                del rows[index]
        else:
            new = {"path": path, "action": decision.action, "label": decision.label if decision.action == "relabel" else "",
                   DATA_COLUMN: self.data_name}
            rows[index:index + 1] = [new]
        _write(self.corrections, header, rows)
        self._remember(path, decision.action == KEEP)
        return before

    def _remember(self, path: str, kept: bool) -> None:
        header, rows = _read(self.memory, MEMORY_COLUMNS)
        has = any(row["path"] == path for row in rows)
        if kept == has:
            return
        rows = ([*rows, {"path": path, DATA_COLUMN: self.data_name}] if kept
                else [row for row in rows if row["path"] != path])
        _write(self.memory, header, rows)
