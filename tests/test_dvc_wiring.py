"""dvc.yaml says what each stage really depends on: every project module its command imports
(directly or through other modules) and every params section it reads. When they drift,
`dvc repro` reruns too little (a stale model) or too much, so these tests walk the code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

# Modules that cannot change a stage's outputs, so they are left out of its deps:
# the package marker (log level only), MLflow tracking, path layout, params parsing (the values
# themselves are tracked through each stage's `params:`), network retries and error messages
# (what is fetched is named by params), a progress bar, the served MLflow model and its packaging, and
# the error classes, how many threads a stage uses (concurrency: results do not depend on it) and what
# a stage prints (console). What these import is not followed: packaging reads the decoder and the model's
# metadata only to log the MLflow model.
NOT_OUTPUT_AFFECTING = {"imgclf/__init__.py", "imgclf/track/tracking.py", "imgclf/project.py", "imgclf/params.py",
                        "imgclf/network.py", "imgclf/progress.py", "imgclf/track/mlflow_model.py",
                        "imgclf/track/model_packaging.py", "imgclf/errors.py",
                        "imgclf/concurrency.py", "imgclf/console.py"}
# Params sections no stage output depends on (tracking switches and experiment name).
NOT_OUTPUT_PARAMS = {"mlflow"}
# The only library entry point that may take the whole Params: it logs all of them to MLflow.
WHOLE_PARAMS_CALLS = {"tracking.stage_run"}

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def expand(stages: dict) -> dict:
    """``foreach`` stages as DVC runs them: ``name@key`` with ``${key}`` and ``${item}`` filled in."""
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for key, item in stage["foreach"].items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key).replace("${item}", str(item))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


STAGE_DEFS = expand(DVC["stages"])
STAGES = sorted(STAGE_DEFS)


def module_file(name: str) -> Path | None:
    """``imgclf.model.models`` -> imgclf/model/models.py (None for anything outside the project)."""
    if not name.split(".")[0] in ("imgclf", "stages"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from imgclf import models`
    names = set()
    for name in found:
        # importing imgclf.x also runs imgclf/__init__.py
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in names if module_file(n) is not None}


def import_closure(module: str) -> set[str]:
    """Project files reachable from ``module`` through imports, relative to the root."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if not not_output_affecting(module_file(name).relative_to(ROOT).as_posix()):
            todo.extend(imported_modules(module_file(name)))
    return {module_file(n).relative_to(ROOT).as_posix() for n in seen}


def not_output_affecting(path: str) -> bool:
    """Listed in NOT_OUTPUT_AFFECTING, or a package marker (an ``__init__.py``: docstrings only)."""
    return path in NOT_OUTPUT_AFFECTING or path.endswith("/__init__.py")


def stage_module(stage: str) -> str:
    cmd = STAGE_DEFS[stage]["cmd"]
    assert cmd.startswith("python -m stages."), f"{stage}: unexpected cmd {cmd!r}"
    return cmd.split()[2]


def declared(stage: str, key: str) -> set[str]:
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in STAGE_DEFS[stage].get(key, [])}


def params_read(path: Path) -> tuple[set[str], list[str]]:
    """(sections read as ``params.<section>``, calls that receive the whole ``params``)."""
    tree = ast.parse(path.read_text())
    sections, whole = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
            sections.add(node.attr)
        if isinstance(node, ast.Call):
            args = list(node.args) + [k.value for k in node.keywords]
            if any(isinstance(a, ast.Name) and a.id == "params" for a in args):
                whole.append(ast.unparse(node.func))
    return sections, whole


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_match_the_stage_imports(stage):
    needed = {path for path in import_closure(stage_module(stage)) if not not_output_affecting(path)}
    listed = {d for d in declared(stage, "deps") if d.endswith(".py")}
    assert not needed - listed, f"{stage}: dvc.yaml deps miss {sorted(needed - listed)}"
    assert not listed - needed, f"{stage}: dvc.yaml deps list modules it does not import: {sorted(listed - needed)}"


@pytest.mark.parametrize("stage", STAGES)
def test_params_match_the_sections_the_stage_reads(stage):
    script = ROOT / (stage_module(stage).replace(".", "/") + ".py")
    sections, whole = params_read(script)
    from imgclf.params import Params

    known = {f for f in Params.__dataclass_fields__}
    sections = (sections & known) - NOT_OUTPUT_PARAMS
    # a stage may list single keys (`model.image_size`): it then reads that section
    listed = {entry.split(".")[0] for entry in declared(stage, "params")}
    if "@" in stage:  # one script for every item of a foreach: each item reads its own sections
        listed_by_all = {entry.split(".")[0] for other in STAGES if other.split("@")[0] == stage.split("@")[0]
                         for entry in declared(other, "params")}
        assert listed <= sections and sections == listed_by_all, \
            f"{stage}: the script reads {sorted(sections)}, dvc.yaml lists {sorted(listed_by_all)} over its items"
    else:
        assert sections == listed, f"{stage}: reads {sorted(sections)}, dvc.yaml lists {sorted(listed)}"
    assert set(whole) <= WHOLE_PARAMS_CALLS, f"{stage}: passes the whole params to {whole}; pass sections"


def test_no_library_module_takes_the_whole_params():
    for path in sorted((ROOT / "imgclf").rglob("*.py")):
        if path.name in ("params.py", "tracking.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        assert "Params" not in imported, f"{path.name} imports Params: take the sections you use instead"


def test_the_walk_sees_lazy_and_relative_imports():
    closure = import_closure("stages.baseline")
    # stages.baseline -> imgclf.train.training -> .augment (relative) and imgclf.data.images via datasets
    assert {"imgclf/train/augment.py", "imgclf/data/images.py", "imgclf/model/models.py", "stages/baseline.py"} <= closure
