"""Save and load .keras models together with what serving them needs (class names, input
size, test-time augmentation).

The metadata travels inside the .keras zip file as ``imgclf.json``; Keras ignores it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    import keras

METADATA_ENTRY = "imgclf.json"


class ModelFileError(DataError):
    """A model file is missing, not a .keras file, or was not saved by this pipeline."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class ModelInfo:
    """What a saved model needs besides its weights to be served the way it was evaluated."""

    stage: str
    backbone: str
    class_names: list[str]
    image_size: int
    tta: bool  # predictions averaged with the horizontally mirrored image
    temperature: float = 1.0  # already folded into the last layer's weights (1: not calibrated)
    input: str = "RGB uint8 or float in 0..255, shape (H, W, 3) at image_size"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def save_model(model: keras.Model, path: Path, info: ModelInfo) -> None:
    """Write ``model`` and its ``info`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps(info.as_dict(), indent=2))
    os.replace(tmp, path)


def read_metadata(path: Path) -> ModelInfo:
    """The ModelInfo stored in a .keras file; ModelFileError (naming the file) if it has none."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "model file not found (run `dvc repro` or check the path)")
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY not in archive.namelist():
                raise ModelFileError(path, f"has no {METADATA_ENTRY}: it was not saved by this pipeline")
            raw = json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelFileError(path, f"not a .keras model file ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelFileError(path, f"{METADATA_ENTRY} is not valid JSON ({err})") from None
    fields = {f.name: f for f in dataclasses.fields(ModelInfo)}
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise ModelFileError(path, f"{METADATA_ENTRY} lacks {', '.join(missing)}: "
                                   "saved by an older version of the pipeline; run `dvc repro` to retrain")
    info = ModelInfo(**{name: raw[name] for name in fields if name in raw})
    if not (isinstance(info.class_names, list) and len(info.class_names) >= 2
            and isinstance(info.image_size, int) and info.image_size > 0):
        raise ModelFileError(path, f"{METADATA_ENTRY} has bad class_names or image_size")
    return info


def load_model(path: Path) -> tuple[keras.Model, ModelInfo]:
    """Load in safe mode (no arbitrary code), with the saved ModelInfo."""
    import keras

    info = read_metadata(path)
    try:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except (ValueError, TypeError, OSError, KeyError) as err:
        raise ModelFileError(Path(path), f"cannot load the Keras model ({err})") from None
    return model, info
