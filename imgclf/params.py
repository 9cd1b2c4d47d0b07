"""Read and validate ``params.yaml`` into typed, frozen objects.

This is the only module that parses the params file. ``params.yaml`` is the one source of
defaults: the dataclasses have none, so a missing key is an error, never a silent default
that DVC does not track. Every bad value raises :class:`ParamsError`, whose message names
the key and says what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import StageError

BACKBONES = ("efficientnetb0", "mobilenetv2", "resnet50")
SOURCES = ("tfds", "folder", "url")
WEIGHTS = ("imagenet", "none")
QUANTIZATIONS = ("none", "float16", "int8")
LR_SCHEDULES = ("cosine", "constant")
MODEL_NAMES = ("baseline", "head", "finetune")


class ParamsError(StageError, ValueError):
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
    source: str
    name: str
    path: str
    sha256: str
    max_per_class: int
    near_duplicate_bits: int

    @property
    def set_name(self) -> str:
        """The data set's name in the corrections file's ``data`` column: the TFDS name, else the
        folder's or the archive's name (``/photos/my_flowers`` -> ``my_flowers``)."""
        if self.source == "tfds":
            return self.name
        base = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
            if base.lower().endswith(suffix):
                return base[:-len(suffix)]
        return base

    def validate(self, key: str) -> None:
        _choice(self.source, f"{key}.source", SOURCES)
        _non_negative(self.max_per_class, f"{key}.max_per_class")
        _check(0 <= self.near_duplicate_bits <= 128, f"{key}.near_duplicate_bits",
               f"must be between 0 (off) and 128 bits of the 256-bit hash, got {self.near_duplicate_bits}")
        if self.source == "tfds":
            _check(bool(self.name), f"{key}.name", "a TFDS dataset name is required when data.source is tfds")
        else:
            _check(bool(self.path), f"{key}.path", f"a path is required when data.source is {self.source}")
        if self.sha256:
            _check(len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256),
                   f"{key}.sha256", "must be 64 hex digits or empty")


@dataclass(frozen=True)
class SplitParams:
    train: float
    val: float
    test: float
    corrections: str

    def validate(self, key: str) -> None:
        _check(bool(self.corrections), f"{key}.corrections", "must name the corrections file (e.g. corrections.csv)")
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            _check(0 < value < 1, f"{key}.{name}", f"must be a fraction in (0, 1), got {value}")
        total = self.train + self.val + self.test
        _check(math.isclose(total, 1.0, abs_tol=1e-6), key,
               f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = {total:g}")


@dataclass(frozen=True)
class ModelParams:
    backbone: str
    weights: str
    image_size: int
    dropout: float
    hidden_units: int

    def validate(self, key: str) -> None:
        _choice(self.backbone, f"{key}.backbone", BACKBONES)
        _choice(self.weights, f"{key}.weights", WEIGHTS)
        _check(self.image_size >= 32, f"{key}.image_size", f"must be >= 32, got {self.image_size}")
        _fraction(self.dropout, f"{key}.dropout")
        _non_negative(self.hidden_units, f"{key}.hidden_units")


@dataclass(frozen=True)
class TrainParams:
    batch_size: int
    mixed_precision: bool
    label_smoothing: float
    tta: bool  # stored in each model's metadata: every inference path serves what evaluate measured
    calibrate: bool  # temperature scaling on the validation split, folded into the last layer

    def validate(self, key: str) -> None:
        _positive(self.batch_size, f"{key}.batch_size")
        _fraction(self.label_smoothing, f"{key}.label_smoothing")


@dataclass(frozen=True)
class AugmentParams:
    flip: bool
    crop: float
    rotation: float
    zoom: float
    contrast: float

    def validate(self, key: str) -> None:
        for name in ("crop", "rotation", "zoom", "contrast"):
            _fraction(getattr(self, name), f"{key}.{name}")


@dataclass(frozen=True)
class BaselineParams:
    image_size: int
    epochs: int
    learning_rate: float
    lr_schedule: str
    patience: int
    filters: tuple[int, ...]
    stem_stride: int
    convs_per_block: int
    separable: bool
    dropout: float

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
    epochs: int
    learning_rate: float
    patience: int
    cache_features: bool
    augment: bool

    def validate(self, key: str) -> None:
        _non_negative(self.epochs, f"{key}.epochs")
        _positive(self.learning_rate, f"{key}.learning_rate")
        _non_negative(self.patience, f"{key}.patience")


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int
    learning_rate: float
    unfreeze_layers: int
    patience: int
    reduce_lr_patience: int
    cache_activations: bool
    cached_views: int
    mixup: float
    lr_schedule: str
    warmup_epochs: int
    members: int

    def validate(self, key: str) -> None:
        _non_negative(self.mixup, f"{key}.mixup")
        _check(self.members >= 1, f"{key}.members", f"must be >= 1, got {self.members}")
        _check(self.members == 1 or self.cache_activations, f"{key}.members",
               f"{self.members} members are fine-tuned on the cached activations: "
               f"set {key}.cache_activations: true, or members: 1")
        _choice(self.lr_schedule, f"{key}.lr_schedule", LR_SCHEDULES)
        _non_negative(self.warmup_epochs, f"{key}.warmup_epochs")
        _check(self.cached_views >= 1, f"{key}.cached_views", f"must be >= 1, got {self.cached_views}")
        _non_negative(self.epochs, f"{key}.epochs")
        _positive(self.learning_rate, f"{key}.learning_rate")
        _non_negative(self.unfreeze_layers, f"{key}.unfreeze_layers")
        _non_negative(self.patience, f"{key}.patience")
        _non_negative(self.reduce_lr_patience, f"{key}.reduce_lr_patience")


@dataclass(frozen=True)
class EvaluateParams:
    f1_threshold: float
    gallery_size: int
    calibration_bins: int

    def validate(self, key: str) -> None:
        _fraction(self.f1_threshold, f"{key}.f1_threshold", upper_inclusive=True)
        _non_negative(self.gallery_size, f"{key}.gallery_size")
        _positive(self.calibration_bins, f"{key}.calibration_bins")


@dataclass(frozen=True)
class AuditParams:
    folds: int
    gallery_size: int
    copy_similarity: float

    def validate(self, key: str) -> None:
        _check(self.folds >= 2, f"{key}.folds", f"must be >= 2, got {self.folds}")
        _non_negative(self.gallery_size, f"{key}.gallery_size")
        _check(0 < self.copy_similarity <= 1, f"{key}.copy_similarity",
               f"must be a cosine similarity in (0, 1], got {self.copy_similarity}")


@dataclass(frozen=True)
class GradcamParams:
    num_images: int
    include_baseline: bool

    def validate(self, key: str) -> None:
        _positive(self.num_images, f"{key}.num_images")


@dataclass(frozen=True)
class ExportParams:
    quantization: str

    def validate(self, key: str) -> None:
        _choice(self.quantization, f"{key}.quantization", QUANTIZATIONS)


@dataclass(frozen=True)
class MlflowParams:
    enabled: bool
    experiment: str
    registered_model: str  # Model Registry name of the fine-tuned model ("" = do not register)

    def validate(self, key: str) -> None:
        _check(bool(self.experiment), f"{key}.experiment", "must be a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    augment: AugmentParams
    baseline: BaselineParams
    head: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    audit: AuditParams
    gradcam: GradcamParams
    export: ExportParams
    mlflow: MlflowParams

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
    for name in known:
        key = f"{prefix}.{name}" if prefix else name
        _check(name in raw, key, "missing; every key must be set in params.yaml (no hidden defaults)")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key)
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


def with_overrides(raw: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of a parsed params mapping with ``key.path=value`` items set, as `dvc exp run -S`
    sets them (values parsed as YAML)."""
    result = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(item, "an override is key.path=value")
        *path, last = key.strip().split(".")
        node = result
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ParamsError(key, f"no section {part!r} to set")
            node = node[part]
        node[last] = yaml.safe_load(value)
    return result


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
