"""The package's shape: its import graph (imports inside functions included) has no cycles,
and every expected failure shares one base class that run_stage turns into one line."""
import os

import pytest

from conftest import ROOT, run_program
from imgclf.project import STAGE_TIME_LIMIT_ENV
from test_dvc_wiring import imported_modules

MODULES = sorted(p for p in (ROOT / "imgclf").glob("*.py") if p.name != "__init__.py")


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in MODULES:
        name = f"imgclf.{path.stem}"
        graph[name] = {m for m in imported_modules(path) if m.startswith("imgclf.") and m != name}
    return graph


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
