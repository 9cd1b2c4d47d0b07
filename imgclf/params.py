"""Read and validate ``params.yaml`` into typed, frozen objects.

This is the only module that parses the params file. Every bad value raises
:class:`ParamsError`, whose message names the key and says what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

BACKBONES = ("efficientnetb0", "mobilenetv2", "resnet50")
SOURCES = ("tfds", "folder", "url")
WEIGHTS = ("imagenet", "none")
QUANTIZATIONS = ("none", "float16", "int8")
LR_SCHEDULES = ("cosine", "constant")
MODEL_NAMES = ("baseline", "head", "finetune")


class ParamsError(ValueError):
    """A value in params.yaml is missing, of the wrong type or not allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"params.yaml: {key}: {message}")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParamsError(key, message)


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"{value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _non_negative(value: float, key: str) -> None:
    _check(value >= 0, key, f"must be >= 0, got {value}")


def _positive(value: float, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value}")


def _fraction(value: float, key: str, upper_inclusive: bool = False) -> None:
    ok = 0 <= value <= 1 if upper_inclusive else 0 <= value < 1
    _check(ok, key, f"must be in [0, 1{']' if upper_inclusive else ')'}, got {value}")


@dataclass(frozen=True)
class DataParams:
    source: str = "tfds"
    name: str = "tf_flowers"
    path: str = "inputs"
    sha256: str = ""
    max_per_class: int = 0

    def validate(self, key: str) -> None:
        _choice(self.source, f"{key}.source", SOURCES)
        _non_negative(self.max_per_class, f"{key}.max_per_class")
        if self.source == "tfds":
            _check(bool(self.name), f"{key}.name", "a TFDS dataset name is required when data.source is tfds")
        else:
            _check(bool(self.path), f"{key}.path", f"a path is required when data.source is {self.source}")
        if self.sha256:
            _check(len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256),
                   f"{key}.sha256", "must be 64 hex digits or empty")


@dataclass(frozen=True)
class SplitParams:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def validate(self, key: str) -> None:
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            _check(0 < value < 1, f"{key}.{name}", f"must be a fraction in (0, 1), got {value}")
        total = self.train + self.val + self.test
        _check(math.isclose(total, 1.0, abs_tol=1e-6), key,
               f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = {total:g}")


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "efficientnetb0"
    weights: str = "imagenet"
    image_size: int = 224
    dropout: float = 0.2
    hidden_units: int = 0

    def validate(self, key: str) -> None:
        _choice(self.backbone, f"{key}.backbone", BACKBONES)
        _choice(self.weights, f"{key}.weights", WEIGHTS)
        _check(self.image_size >= 32, f"{key}.image_size", f"must be >= 32, got {self.image_size}")
        _fraction(self.dropout, f"{key}.dropout")
        _non_negative(self.hidden_units, f"{key}.hidden_units")


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = 32
    mixed_precision: bool = False
    label_smoothing: float = 0.1

    def validate(self, key: str) -> None:
        _positive(self.batch_size, f"{key}.batch_size")
        _fraction(self.label_smoothing, f"{key}.label_smoothing")


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = True
    crop: float = 0.12
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0

    def validate(self, key: str) -> None:
        for name in ("crop", "rotation", "zoom", "contrast"):
            _fraction(getattr(self, name), f"{key}.{name}")


@dataclass(frozen=True)
class BaselineParams:
    image_size: int = 96
    epochs: int = 16
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"
    patience: int = 8
    filters: tuple[int, ...] = (32, 64, 128, 256)
    stem_stride: int = 2
    convs_per_block: int = 1
    separable: bool = False
    dropout: float = 0.3

    def validate(self, key: str) -> None:
        _check(self.image_size >= 32, f"{key}.image_size", f"must be >= 32, got {self.image_size}")
        _non_negative(self.epochs, f"{key}.epochs")
        _positive(self.learning_rate, f"{key}.learning_rate")
        _choice(self.lr_schedule, f"{key}.lr_schedule", LR_SCHEDULES)
        _non_negative(self.patience, f"{key}.patience")
        _check(self.stem_stride in (1, 2), f"{key}.stem_stride", f"must be 1 or 2, got {self.stem_stride}")
        _check(len(self.filters) > 0 and all(f > 0 for f in self.filters), f"{key}.filters",
               f"must be a non-empty list of positive integers, got {list(self.filters)}")
        _fraction(self.dropout, f"{key}.dropout")
        _check(self.convs_per_block >= 1, f"{key}.convs_per_block", f"must be >= 1, got {self.convs_per_block}")


@dataclass(frozen=True)
class HeadParams:
    epochs: int = 20
    learning_rate: float = 1e-3
    patience: int = 3
    cache_features: bool = True
    augment: bool = False

    def validate(self, key: str) -> None:
        _non_negative(self.epochs, f"{key}.epochs")
        _positive(self.learning_rate, f"{key}.learning_rate")
        _non_negative(self.patience, f"{key}.patience")


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = 8
    learning_rate: float = 3e-4
    unfreeze_layers: int = 40
    patience: int = 3
    reduce_lr_patience: int = 2
    cache_activations: bool = True
    cached_views: int = 1

    def validate(self, key: str) -> None:
        _check(self.cached_views >= 1, f"{key}.cached_views", f"must be >= 1, got {self.cached_views}")
        _non_negative(self.epochs, f"{key}.epochs")
        _positive(self.learning_rate, f"{key}.learning_rate")
        _non_negative(self.unfreeze_layers, f"{key}.unfreeze_layers")
        _non_negative(self.patience, f"{key}.patience")
        _non_negative(self.reduce_lr_patience, f"{key}.reduce_lr_patience")


@dataclass(frozen=True)
class EvaluateParams:
    f1_threshold: float = 0.8
    gallery_size: int = 16
    calibration_bins: int = 10
    tta: bool = False

    def validate(self, key: str) -> None:
        _fraction(self.f1_threshold, f"{key}.f1_threshold", upper_inclusive=True)
        _non_negative(self.gallery_size, f"{key}.gallery_size")
        _positive(self.calibration_bins, f"{key}.calibration_bins")


@dataclass(frozen=True)
class GradcamParams:
    num_images: int = 12
    include_baseline: bool = False

    def validate(self, key: str) -> None:
        _positive(self.num_images, f"{key}.num_images")


@dataclass(frozen=True)
class ExportParams:
    quantization: str = "float16"

    def validate(self, key: str) -> None:
        _choice(self.quantization, f"{key}.quantization", QUANTIZATIONS)


@dataclass(frozen=True)
class MlflowParams:
    enabled: bool = True
    experiment: str = "image-classification"

    def validate(self, key: str) -> None:
        _check(bool(self.experiment), f"{key}.experiment", "must be a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    head: HeadParams = field(default_factory=HeadParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    gradcam: GradcamParams = field(default_factory=GradcamParams)
    export: ExportParams = field(default_factory=ExportParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def validate(self) -> None:
        _non_negative(self.seed, "seed")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)

    def flat(self) -> dict[str, Any]:
        """Params as ``{"model.backbone": "mobilenetv2", ...}`` (for MLflow)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if dataclasses.is_dataclass(value):
                for f in dataclasses.fields(value):
                    walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
            else:
                out[prefix] = list(value) if isinstance(value, tuple) else value

        walk("", self)
        return out


def _coerce(value: Any, target: Any, key: str) -> Any:
    """Convert a YAML value to the dataclass field type, or raise ParamsError."""
    if target is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if target is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if target is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"must be a number, got {value!r}")
        return float(value)
    if target is str:
        if value is None:
            return ""
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if target == tuple[int, ...]:
        _check(isinstance(value, (list, tuple)), key, f"must be a list of integers, got {value!r}")
        return tuple(_coerce(v, int, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported field type {target} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    _check(isinstance(raw, Mapping), prefix or "params.yaml", f"must be a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        key = f"{prefix}.{name}" if prefix else str(name)
        _check(name in known, key, f"unknown key; known keys here: {', '.join(known)}")
    values = {}
    hints = _type_hints(cls)
    for name, f in known.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, key)
        else:
            values[name] = _coerce(raw[name], hint, key)
    return cls(**values)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def params_from_dict(raw: Mapping[str, Any] | None) -> Params:
    """Build and validate Params from a parsed params mapping."""
    params = _build(Params, raw or {}, "")
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path.resolve()}")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ParamsError("params.yaml", f"not valid YAML: {err}") from err
    return params_from_dict(raw)
