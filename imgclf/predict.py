"""Classify new images with a trained model.

    python -m imgclf.predict photos/ extra.jpg               # readable table
    python -m imgclf.predict photos/ --json --top-k 2        # one JSON object per line
    python -m imgclf.predict photo.png --model models/head.keras

Exit status: 0 all files classified, 1 some files skipped (reasons on stderr), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, TextIO

import numpy as np

from .data.images import BadImageError, decode_checked
from .progress import Progress


def collect_files(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly and every file under named folders (recursively, sorted)."""
    files, missing = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        else:
            missing.append((name, "no such file or folder"))
    return files, missing


def load_batch(paths: list[Path], size: int) -> tuple[np.ndarray, list[Path], list[tuple[str, str]]]:
    """Decode like training does (any mode to RGB, resized); bad files come back with a reason."""
    arrays, good, bad = [], [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as err:
            bad.append((str(path), f"unreadable: {err}"))
            continue
        try:
            arrays.append(decode_checked(data, size))
            good.append(path)
        except BadImageError as reason:
            bad.append((str(path), str(reason)))
    images = np.stack(arrays).astype(np.float32) if arrays else np.empty((0, size, size, 3), np.float32)
    return images, good, bad


def top_k(probs: np.ndarray, class_names: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": class_names[i], "confidence": round(float(probs[i]), 6)} for i in order]


def format_row(path: str, ranked: list[dict]) -> str:
    return f"{path}\t" + "\t".join(f"{r['label']} {r['confidence']:.3f}" for r in ranked)


def predict_files(model_path: Path, inputs: list[str], k: int = 3, as_json: bool = False,
                  batch_size: int = 32, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from .model.modelio import read_metadata
    from .serve.inference import predict_probs
    from .serve.saved import load_runner

    out, err = out or sys.stdout, err or sys.stderr
    info = read_metadata(model_path)
    names, size = info.class_names, info.image_size
    k = max(1, min(k, len(names)))
    files, skipped = collect_files(inputs)
    progress = Progress(len(files), err) if len(files) > batch_size else None
    if not as_json:
        out.write("path\t" + "\t".join(f"top{i + 1}" for i in range(k)) + "\n")
    served = None  # the runtime for every batch, chosen (and checked) on the first
    for start in range(0, len(files), batch_size):
        images, good, bad = load_batch(files[start:start + batch_size], size)
        skipped.extend(bad)
        if len(images):
            # LiteRT without TensorFlow where the model's conversion is recorded, else Keras loaded here
            served = served or load_runner(model_path, len(files) * (2 if info.tta else 1), images)
        probs = predict_probs(served, images, info.tta) if len(images) else np.empty((0, len(names)))
        for path, row in zip(good, probs):
            ranked = top_k(row, names, k)
            out.write((json.dumps({"path": str(path), "top_k": ranked}) if as_json
                       else format_row(str(path), ranked)) + "\n")
        out.flush()
        if progress:
            progress.update(len(images) + len(bad))
    for path, reason in skipped:
        err.write(f"skipped {path}: {reason}\n")
    if skipped:
        err.write(f"{len(skipped)} file(s) skipped\n")
    return 1 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.predict", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", default="models/finetune.keras", help="a .keras model saved by the pipeline")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded and held at a time (default 32)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        print("error: --top-k must be >= 1", file=sys.stderr)
        return 2
    from .model.modelio import ModelFileError
    from .project import limit_malloc_arenas

    limit_malloc_arenas()
    try:
        return predict_files(Path(args.model), args.inputs, args.top_k, args.json, args.batch_size)
    except ModelFileError as error:
        print(f"error: {error} (pass another one with --model)", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
