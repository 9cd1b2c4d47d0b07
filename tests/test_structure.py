"""The package's shape: its import graph (imports inside functions included) has no cycles,
and every expected failure shares one base class that run_stage turns into one line."""
import pytest

from conftest import ROOT, run_program
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
