"""Score ensembles of rows that `bench/sweep.py --save DIR` wrote, over one or more splits.

    python bench/ensembles.py --rows 0 --rows 0,1 --rows 0,1,2 runs/seed1 runs/seed2 runs/seed3

Each folder holds one split's ``<row>.npz`` files (val and test probabilities and labels). For each
``--rows`` list, the rows' probabilities are averaged (an ensemble) and scored on every folder; prints
validation / test accuracy per folder and their means. ``--subsets K`` also averages the score of
every K-row ensemble from each folder's rows (less run-to-run noise than one particular K).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np


def load_rows(folder: Path) -> dict[int, dict]:
    rows = {int(path.stem): dict(np.load(path)) for path in folder.glob("*.npz") if path.stem.isdigit()}
    if not rows:
        raise SystemExit(f"error: {folder} holds no <row>.npz files (write them with bench/sweep.py --save)")
    return rows


def accuracy(rows: dict[int, dict], members: tuple[int, ...], part: str) -> float:
    probs = np.mean([rows[i][part] for i in members], axis=0)
    return float(np.mean(probs.argmax(axis=1) == rows[members[0]][f"{part}_labels"]))


def report(name: str, scores: list[tuple[float, float]]) -> None:
    per_split = " | ".join(f"{val:.4f} / {test:.4f}" for val, test in scores)
    means = np.mean(scores, axis=0)
    print(f"{name:>16}: {per_split}   mean {means[0]:.4f} / {means[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", action="append", default=[], type=lambda text: tuple(int(k) for k in text.split(",")),
                        help="comma-separated row numbers averaged into one ensemble (repeatable)")
    parser.add_argument("--subsets", action="append", default=[], type=int,
                        help="K: the mean score of every K-row ensemble of each folder (repeatable)")
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    splits = [load_rows(folder) for folder in args.folders]
    for members in args.rows:
        for folder, rows in zip(args.folders, splits):
            if missing := set(members) - set(rows):
                raise SystemExit(f"error: {folder} has no row {sorted(missing)[0]}")
        report("rows " + ",".join(map(str, members)),
               [(accuracy(rows, members, "val"), accuracy(rows, members, "test")) for rows in splits])
    for k in args.subsets:
        scores = []
        for rows in splits:
            groups = list(itertools.combinations(sorted(rows), k))
            scores.append(tuple(np.mean([accuracy(rows, g, part) for g in groups]) for part in ("val", "test")))
        report(f"any {k} rows", scores)


if __name__ == "__main__":
    main()
