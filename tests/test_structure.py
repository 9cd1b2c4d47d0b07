"""The package's shape: subpackages in layers that import only downward (imports inside functions
included), no import cycles, and every expected failure sharing one base class that run_stage
turns into one line."""
import os

import pytest

from conftest import ROOT, run_program
from imgclf.project import STAGE_TIME_LIMIT_ENV
from test_dvc_wiring import imported_modules

MODULES = sorted(p for p in (ROOT / "imgclf").rglob("*.py") if p.name != "__init__.py")
# Lowest first: a module may import from its own layer and the layers before it. "core" is the
# modules at the top of the package; the commands (python -m imgclf.<name>) sit above everything.
LAYERS = ["core", "data", "model", "serve", "track", "train", "commands"]
COMMANDS = {"imgclf.predict", "imgclf.team", "imgclf.review"}


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module in COMMANDS:
        return "commands"
    return parts[1] if len(parts) > 2 else "core"


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in MODULES:
        name = module_name(path)
        graph[name] = {m for m in imported_modules(path)
                       if m.startswith("imgclf.") and m != name and (ROOT / m.replace(".", "/")).with_suffix(".py").exists()}
    return graph


def test_every_module_belongs_to_a_layer_and_subpackages_say_what_they_own():
    for path in MODULES:
        assert layer(module_name(path)) in LAYERS, path
    for package in sorted(p for p in (ROOT / "imgclf").iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert package.name in LAYERS, f"imgclf/{package.name}/ is not in LAYERS"
        doc = (package / "__init__.py").read_text().strip()
        assert doc.startswith('"""') and len(doc) > 80, f"imgclf/{package.name}/__init__.py: say what it owns"


def test_imports_go_only_downward_between_layers():
    upward = [f"{module} ({layer(module)}) imports {dep} ({layer(dep)})"
              for module, deps in import_graph().items() for dep in sorted(deps)
              if LAYERS.index(layer(dep)) > LAYERS.index(layer(module))]
    assert not upward, "\n".join(upward)


def test_no_module_imports_a_command():
    for module, deps in import_graph().items():
        assert not deps & COMMANDS, f"{module} imports {sorted(deps & COMMANDS)}"


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_the_error_base_is_the_bottom_of_the_package():
    assert import_graph()["imgclf.errors"] == set()


@pytest.mark.parametrize("failure,line", [
    ("params", "error: params.yaml: model.backbone: bad"),
    ("data", "error: no images"),
    ("tracking", "error: server down"),
    ("distributed", "error: lost"),
])
def test_expected_failures_end_a_stage_with_one_line(failure, line):
    done = run_program("failing_stage.py", failure)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_stage_past_its_time_limit_fails_with_every_thread_stack(tmp_path):
    """The slow tests give every stage IMGCLF_STAGE_TIME_LIMIT seconds: a stage that hangs ends
    with status 1 and the stacks that show where, not at CI's time-out."""
    done = run_program("failing_stage.py", "hang", env={**os.environ, STAGE_TIME_LIMIT_ENV: "2"}, timeout=60)
    assert done.returncode == 1
    assert "Timeout" in done.stderr and "in main" in done.stderr, done.stderr[-2000:]


def test_the_stages_that_need_no_tensorflow_import_none():
    """weights (a file already in Keras' cache is read with h5py), download, split, store and the audit
    (which reads the activations stage's pooled features) start without TensorFlow's seconds of import."""
    import subprocess
    import sys

    code = ("import sys, stages.weights, stages.download, stages.split, stages.store, stages.audit; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'tensorflow_datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
