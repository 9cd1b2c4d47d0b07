"""README screenshots from a real run: the MLflow UI (the experiment's runs, a fine-tuning run's
curves, the registered model), `dvc exp show` as a 120-column terminal shows it, and the review page
of the audit's suspects.

    python docs/screenshots.py [PROJECT]             # PROJECT: a repository with runs (default: here)
    python docs/screenshots.py --review [PROJECT]    # the review page alone (PROJECT audited)

Starts `mlflow server` on a free loopback port over PROJECT's mlflow.db, photographs pages with
headless Chromium driven by Playwright (`apt install chromium`, `pip install playwright`: tools for
the docs only, not dependencies of the project), stops the server, writes docs/images/*.png.
"""
from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"
TERMINAL_COLUMNS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# MLflow 3.17's UI opens an assistant panel on the first visit: mark it seen and closed
UI_STORAGE = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}


@contextlib.contextmanager
def browser_page(size: tuple[int, int], storage: dict[str, str]) -> Iterator:
    """A headless Chromium page whose origin's localStorage holds ``storage`` before any script."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.add_init_script(f"for (const [k, v] of Object.entries({json.dumps(storage)})) "
                                 "localStorage.setItem(k, v);")
            yield page
        finally:
            browser.close()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found: apt install chromium")


def screenshot(url: str, path: Path, size: tuple[int, int] = (1500, 900), ready: str | None = None,
               settle_s: float = 3.0, storage: dict[str, str] | None = None, search: str = "") -> None:
    """Open ``url``, wait for the text ``ready`` (if given), type ``search`` into the page's search
    box (if given), let the page settle, save a PNG."""
    with browser_page(size, {**UI_STORAGE, **(storage or {})}) as page:
        page.goto(url, wait_until="load")
        if ready:  # MLflow's UI keeps polling: wait for what should be on screen, not for silence
            page.get_by_text(ready, exact=False).first.wait_for(timeout=60_000)
        if search:
            page.get_by_placeholder("Search", exact=False).first.fill(search)
        time.sleep(settle_s)
        page.screenshot(path=str(path))
    print(f"wrote {path}")


def terminal_page(text: str) -> str:
    """``text`` as a dark terminal ``TERMINAL_COLUMNS`` characters wide, cut as `less -S` cuts."""
    lines = "\n".join(line[:TERMINAL_COLUMNS] for line in text.splitlines())
    return ("<html><body style='margin:0;background:#1e1e1e'><pre style='margin:0;padding:12px;"
            "color:#e0e0e0;font:14px/1.35 monospace'>$ dvc exp show\n" + html.escape(lines)
            + "</pre></body></html>")


def api(base: str, path: str, payload: dict | None = None) -> dict:
    request = urllib.request.Request(base + path, data=None if payload is None else json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def runs_table_state(exp_id: str, expanded: list[str]) -> dict[str, str]:
    """The runs table as a user would set it up: the newest pipelines expanded into their stages,
    headline metrics and the backbone as columns (the UI keeps this state in localStorage)."""
    columns = ["attributes.`Dataset`", "attributes.`Duration`", "params.`model.backbone`",
               "params.`finetune.unfreeze_layers`", *(f"metrics.`{m}_accuracy`" for m in ("baseline", "head", "finetune")),
               "metrics.`val_accuracy`", "attributes.`Models`"]
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
             "selectedColumns": columns, "columnOrder": [], "columnWidths": {},
             "runsExpanded": {run_id: True for run_id in expanded}, "runsPinned": [], "runsHidden": [],
             "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
             "runListHidden": False, "isAccordionReordered": False, "useGroupedValuesInCharts": True,
             "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {}, "autoRefreshEnabled": False,
             "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}
    return {f'MLflowLocalStorage-1.1-ExperimentPage-["{exp_id}"]-ReactComponentState': json.dumps(state)}


def mlflow_pages(project: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)], cwd=project,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("error: mlflow server did not start")
                time.sleep(1)
        experiment = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=image-classification")
        exp_id = experiment["experiment"]["experiment_id"]
        runs = api(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp_id], "filter": "tags.stage = 'finetune'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]})["runs"]
        parents = api(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp_id], "filter": "tags.`imgclf.run_kind` = 'pipeline'", "max_results": 2,
            "order_by": ["attributes.start_time DESC"]})["runs"]
        screenshot(f"{base}/#/experiments/{exp_id}/runs", OUT / "mlflow_runs.png", size=(1900, 820),
                   ready="matching runs", storage=runs_table_state(exp_id, [r["info"]["run_id"] for r in parents]))
        if runs:
            run_id = runs[0]["info"]["run_id"]
            screenshot(f"{base}/#/experiments/{exp_id}/runs/{run_id}/model-metrics", OUT / "mlflow_curves.png",
                       size=(1500, 1000), ready="Model metrics", settle_s=15, search="accuracy")
        screenshot(f"{base}/#/models/image-classifier", OUT / "mlflow_registered_model.png", size=(1500, 700),
                   ready="Version 1")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def exp_show_page(project: Path) -> None:
    table = subprocess.run([sys.executable, "-m", "dvc", "exp", "show"], cwd=project, check=True,
                           capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "exp_show.html"
        page.write_text(terminal_page(table))
        height = 24 + 19 * (len(table.splitlines()) + 1)
        screenshot(page.as_uri(), OUT / "dvc_exp_show.png", size=(1010, height), settle_s=0)


def review_page(project: Path) -> None:
    """`python -m imgclf.review` over PROJECT's audit, on its first suspect."""
    first = json.loads((project / "reports/audit/suspects.json").read_text())["suspects"][0]["path"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "imgclf.review", "--port", str(port)], cwd=project,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        for _ in range(60):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            time.sleep(0.5)
        screenshot(f"http://127.0.0.1:{port}/", OUT / "review_page.png", size=(1400, 900), ready=first, settle_s=2)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--review"]
    project = Path(args[0] if args else ".").resolve()
    OUT.mkdir(exist_ok=True)
    if "--review" in sys.argv:
        review_page(project)
        return
    exp_show_page(project)
    mlflow_pages(project)
    review_page(project)


if __name__ == "__main__":
    main()
