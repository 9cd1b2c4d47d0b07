"""Save and load .keras models together with their metadata (class names, input size).

The metadata travels inside the .keras zip file as ``imgclf.json``; Keras ignores it.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import keras

from . import models  # noqa: F401  (registers custom layers for safe-mode loading)

METADATA_ENTRY = "imgclf.json"


def save_model(model: keras.Model, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``model`` and ``metadata`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2))
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        if METADATA_ENTRY not in archive.namelist():
            raise ValueError(f"{path} has no {METADATA_ENTRY}: it was not saved by this pipeline")
        return json.loads(archive.read(METADATA_ENTRY))


def load_model(path: Path) -> tuple[keras.Model, dict[str, Any]]:
    """Load in safe mode (no arbitrary code), with the saved metadata."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model not found: {path}")
    return keras.models.load_model(path, safe_mode=True, compile=False), read_metadata(path)
