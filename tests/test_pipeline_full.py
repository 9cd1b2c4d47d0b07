"""The whole pipeline, tiny, in a throw-away git + DVC repo: repro, metrics, plots, predict,
experiments tracked in MLflow, and the push / clone / pull round trip. The tests share one
project and run in file order."""
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import COLORS, clean_env, dvc, make_folder, make_image, make_project, run, tiny_params, wait_until

pytestmark = pytest.mark.slow

MODELS = ("baseline", "head", "finetune")
STAGES_RUN = ("weights", "download", "split", "store@baseline", "store@transfer", "baseline", "activations", "head",
              "finetune", "evaluate", "audit", "gradcam", "export")
KEYS = {"accuracy", "macro_f1", "weighted_f1", "top2_accuracy", "roc_auc_macro_ovr", "ece", "test_loss",
        "throughput_images_per_s", "params_total", "model_file_mb", "ece_uncalibrated", "temperature"}


@pytest.fixture(scope="module", autouse=True)
def on_litert():
    """Every inference pass of these runs on LiteRT (tiny passes would stay on Keras): the whole
    pipeline is tested on the runtime a CPU uses on real data, the same in every run compared."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGCLF_RUNTIME", "litert")
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    photos = make_folder(base / "photos", classes=3, per_class=14)
    (photos / "class_1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    root = make_project(base / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    done = dvc(root, "repro")
    (base / "repro.log").write_text(done.stdout + done.stderr)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny run"], root)
    (base / "uninterrupted.json").write_text(json.dumps(results(root)))  # before other tests change it
    return root


TIMING = re.compile(r"second|throughput|latency|_ms$|per_s$|date|time")


def results(root) -> dict:
    """Every metric, report and training curve of a run, without its timings (which vary)."""
    def drop_timings(value):
        if isinstance(value, dict):
            return {k: drop_timings(v) for k, v in value.items() if not TIMING.search(str(k))}
        return value

    found = {}
    for path in sorted([*root.glob("metrics/*.json"), *root.glob("reports/*/*.json"), *root.glob("reports/*/*.csv"),
                        *root.glob("plots/*/*.csv")]):
        relative = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            found[relative] = drop_timings(json.loads(path.read_text()))
        else:
            with path.open() as fh:
                found[relative] = [drop_timings(row) for row in csv.DictReader(fh)]
    return found


def mlflow_runs(root):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_repro_writes_every_metric_model_and_plot(project):
    headline = json.loads((project / "metrics/evaluate.json").read_text())
    metrics = json.loads((project / "reports/evaluate/summary.json").read_text())
    assert set(metrics) == set(MODELS) and set(headline) == {"base", "head", "fine"}
    for name in MODELS:
        assert KEYS <= set(metrics[name]), KEYS - set(metrics[name])
        assert 0 <= metrics[name]["accuracy"] <= 1
        assert headline[name[:4]] == {"acc": metrics[name]["accuracy"], "f1": metrics[name]["macro_f1"]}
    for name in MODELS:
        assert (project / "models" / f"{name}.keras").exists()
        header = (project / f"plots/{name}/history.csv").read_text().splitlines()[0]
        assert {"epoch", "loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"} <= set(header.split(","))
    assert (project / "plots/gradcam/finetune.png").stat().st_size > 10_000
    assert (project / "plots/evaluate/finetune_reliability.png").stat().st_size > 5_000
    trained = json.loads((project / "reports/finetune/summary.json").read_text())
    assert trained["temperature"] == metrics["finetune"]["temperature"] > 0
    assert {"best_epoch", "train_accuracy", "val_accuracy", "val_ece_calibrated"} <= set(trained)
    assert "Best model on the test split" in (project / "reports/evaluate/comparison.md").read_text()
    assert (project / "models/export/saved_model/saved_model.pb").exists()
    assert json.loads((project / "reports/export/summary.json").read_text())["tflite_float32"]["top1_agreement"] >= 0.9
    split = json.loads((project / "reports/split/summary.json").read_text())
    assert sum(split[s]["total"] for s in ("train", "val", "test")) == 3 * 14
    # the audit scores every image of every split, by its path under data/raw
    with (project / "reports/audit/label_issues.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "score"] and len(rows) == 3 * 14
    assert all((project / "data/raw" / row["path"]).is_file() for row in rows)
    assert [float(r["score"]) for r in rows] == sorted(float(r["score"]) for r in rows)
    suspects = json.loads((project / "metrics/suspects.json").read_text())["suspects"]
    assert suspects == json.loads((project / "reports/audit/summary.json").read_text())["suspects"]
    assert (project / "plots/audit/suspects.png").stat().st_size > 5_000
    # every inference-only pass ran on LiteRT, checked against Keras, and the reports say so
    activations = json.loads((project / "reports/activations/summary.json").read_text())
    audit = json.loads((project / "reports/audit/summary.json").read_text())
    for report in [activations["runtime"], *audit["runtime"].values(), *(metrics[m]["runtime"] for m in MODELS)]:
        assert report["runtime"] == "litert" and report["parity"]["max_abs_diff"] <= report["parity"]["allowed"]
    assert all(metrics[m]["runtime"]["parity"]["top1_agreement"] == 1 for m in MODELS)
    assert activations["images_per_s"] > 0


# (stage, what is killed, seconds to wait before the kill, counted from when DVC starts the stage or,
# with True, from when the stage has opened its MLflow run): while TensorFlow loads, while the stage
# trains, evaluates or writes its outputs
KILL_POINTS = [("download", "stage", 1.0, False), ("baseline", "dvc", 1.0, True), ("activations", "stage", 0.5, True),
               ("finetune", "dvc", 3.0, True), ("evaluate", "stage", 2.0, True), ("export", "dvc", 4.0, True)]


def stage_processes(module: str, session: int) -> list[int]:
    """Processes of ``python -m <module>`` in a session."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"-m" in args and module.encode() in args and os.getsid(int(entry.name)) == session:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def stage_run_opened(root, stage: str) -> bool:
    """Whether ``stage`` has a RUNNING MLflow run in the project's store."""
    with contextlib.suppress(Exception):  # the store may be new or busy
        return any(r.data.tags.get("stage") == stage and r.info.status == "RUNNING" for r in mlflow_runs(root))
    return False


def repro_killed_in(root, stage: str, target: str, delay: float, after_run_opens: bool) -> bool:
    """`dvc repro`, SIGKILLed while it runs ``stage``: the stage alone, or DVC and everything under
    it (a lost session). Whether the stage was still running to be killed."""
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env=clean_env(PYTHONUNBUFFERED="1"))  # each line as DVC writes it
    module, hit = f"stages.{stage.split('@')[0]}", False
    for line in process.stdout:
        if f"Running stage '{stage}'" in line:
            deadline = time.time() + 120
            while after_run_opens and not stage_run_opened(root, stage) and time.time() < deadline and \
                    stage_processes(module, process.pid):
                time.sleep(0.2)
            time.sleep(delay)
            victims = stage_processes(module, process.pid)
            hit = bool(victims)
            if not victims:  # the stage is over: stop DVC at its next stage, not while it rewrites dvc.lock
                next((line for line in process.stdout if line.startswith("Running stage")), None)
            if target == "dvc" or not victims:  # DVC waits on a stage process here, so dvc.lock is whole
                with contextlib.suppress(ProcessLookupError):  # (or it has already finished the run)
                    os.killpg(process.pid, signal.SIGKILL)
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
    process.stdout.read()
    process.wait(timeout=300)
    return hit


def test_a_run_killed_at_many_points_and_reproduced_equals_an_uninterrupted_one(project, tmp_path):
    """SIGKILL (the OOM killer, a preempted machine) at several points of the pipeline, each
    followed by `dvc repro` going on from there: the end is the same metrics, reports and
    curves as the uninterrupted run, and no MLflow run is left RUNNING."""
    import yaml

    params = yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], project).stdout)
    root = make_project(tmp_path / "killed", params)
    hits = [repro_killed_in(root, *point) for point in KILL_POINTS]
    dvc(root, "repro")
    assert "Running stage" not in dvc(root, "repro").stdout
    assert results(root) == json.loads((project.parent / "uninterrupted.json").read_text())
    runs = mlflow_runs(root)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    killed = [r for r in runs if r.info.status == "KILLED"]
    # most kills found their stage running; those after it had opened its MLflow run left it RUNNING
    assert sum(hits) >= len(KILL_POINTS) // 2 and killed, (hits, [r.info.run_name for r in killed])
    assert all("imgclf.found_dead" in r.data.tags for r in killed)


DVC_OWN = re.compile(r"^(Running stage '|> python -m stages\.|Generating lock file|Updating lock file|To track the "
                     r"changes|\s+git add |To enable auto staging|\s+dvc config core\.autostage|Use `dvc push`|$)")


def test_repro_prints_dvc_lines_and_one_line_per_stage(project):
    """Quiet by default: besides DVC's own lines, each stage prints one line of its own (with its
    time) and a warning line for what needs attention (here the corrupt photo), nothing else."""
    log = (project.parent / "repro.log").read_text()
    ours = [line for line in log.splitlines() if not DVC_OWN.match(line)]
    warnings = [line for line in ours if line.startswith("warning: ")]
    assert len(warnings) == 1 and "1 file skipped" in warnings[0] and "corrupt.jpg" in warnings[0], ours
    stages = [line.split(":")[0] for line in ours if not line.startswith("warning: ")]
    assert sorted(stages) == sorted(STAGES_RUN), ours
    assert all(re.search(r"\((\d+\.\d|\d+) s\)$|\(\d+ min \d\d s\)$", line) for line in ours if line not in warnings), ours
    assert next(line for line in ours if line.startswith("download: ")).startswith(
        "download: 42 images in 3 classes (1 skipped)")


def test_dvc_metrics_and_plots_show(project, tmp_path):
    shown = dvc(project, "metrics", "show", "--json").stdout
    workspace = next(iter(json.loads(shown).values()))  # keyed "" or "workspace" by DVC version
    assert list(workspace["data"]) == ["metrics/evaluate.json", "metrics/suspects.json"]
    assert set(workspace["data"]["metrics/evaluate.json"]["data"]["fine"]) == {"acc", "f1"}
    out = tmp_path / "plots"
    dvc(project, "plots", "show", "--json", "-o", str(out))
    rendered = dvc(project, "plots", "show", "--json").stdout
    for name in ("Confusion matrix, finetune", "plots/gradcam/finetune.png", "Accuracy per epoch"):
        assert name in rendered, name


def test_second_repro_does_nothing(project):
    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    assert "up to date" in dvc(project, "status").stdout


def test_editing_the_decoder_marks_every_stage_that_decodes_images_as_changed(project):
    images = project / "imgclf" / "data" / "images.py"
    original = images.read_text()
    assert "Image.Resampling.BILINEAR" in original
    images.write_text(original.replace("Image.Resampling.BILINEAR", "Image.Resampling.BICUBIC"))
    try:
        changed = set(json.loads(dvc(project, "status", "--json").stdout))
    finally:
        images.write_text(original)
    assert {"download", "split", "store@baseline", "store@transfer", "baseline", "activations", "head", "finetune",
            "evaluate", "gradcam", "export"} <= changed
    assert "up to date" in dvc(project, "status").stdout


def test_a_params_key_removed_stops_the_stage_naming_it(project):
    import yaml

    params = project / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    del raw["finetune"]["patience"]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        result = dvc(project, "repro", "finetune", check=False)
    finally:
        # dvc repro removed the stage's outputs before running it: they come back from the DVC cache
        run(["git", "checkout", "-q", "--", "."], project)
        dvc(project, "checkout", "-f")
    assert result.returncode != 0
    assert "params.yaml: finetune.patience: missing" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "up to date" in dvc(project, "status").stdout


def test_predict_command_on_a_folder(project, tmp_path):
    for i in range(3):
        Image.fromarray(make_image(900 + i, COLORS[i], 40)).save(tmp_path / f"new_{i}.png")
    (tmp_path / "readme.txt").write_text("skip me")
    result = run([sys.executable, "-m", "imgclf.predict", str(tmp_path), "--json"], project, check=False)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 and result.returncode == 1
    assert {r["label"] for line in lines for r in line["top_k"]} <= {"class_0", "class_1", "class_2"}
    assert "readme.txt" in result.stderr


def test_repro_is_tracked_as_one_parent_with_a_child_per_stage(project):
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get("imgclf.run_kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["stage"] for r in children} == {
        "weights", "download", "split", "store@baseline", "store@transfer", "baseline", "activations", "head", "finetune",
        "evaluate", "audit", "gradcam", "export"}
    head = next(r for r in children if r.data.tags["stage"] == "head")
    assert head.data.params["model.backbone"] == "mobilenetv2"
    assert head.data.tags["git_commit"] != "unknown"
    assert "finetune_accuracy" in parents[0].data.metrics
    # one point per epoch on each curve; the kept epoch's numbers under their own names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for stage in ("baseline", "head", "finetune"):
        child = next(r for r in children if r.data.tags["stage"] == stage)
        summary = json.loads((project / f"reports/{stage}/summary.json").read_text())
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == list(range(summary["epochs_run"])), (stage, steps)
        assert child.data.metrics["kept_val_accuracy"] == pytest.approx(summary["val_accuracy"])


def test_two_experiments_are_compared_in_dvc_and_mlflow(project):
    # two fine-tuned members served as one model, through evaluate, Grad-CAM and the export's parity check
    dvc(project, "exp", "run", "-n", "finetune-2-epochs", "-S", "finetune.epochs=2", "-S", "finetune.members=2")
    dvc(project, "exp", "run", "-n", "efficientnetb0-run", "-S", "model.backbone=efficientnetb0")
    table = json.loads(dvc(project, "exp", "show", "--json").stdout)
    names = {e.get("name") for rev in table for e in rev.get("experiments") or [] for e in e.get("revs", [])}
    assert {"finetune-2-epochs", "efficientnetb0-run"} <= names, names
    assert "model.backbone" in dvc(project, "params", "diff", "finetune-2-epochs", "efficientnetb0-run").stdout

    # what a 120-column terminal shows: DVC pages the full-width table through `less -S`, which
    # cuts every line at 120 characters; each experiment's six headline numbers must be on screen
    screen = [line[:120] for line in dvc(project, "exp", "show").stdout.splitlines()]
    header = next(line for line in screen if "Experiment" in line)
    headline = [f"{model}.{name}" for model in ("base", "head", "fine") for name in ("acc", "f1")]
    assert [h for h in header.split() if h in headline] == headline, header
    revs = {r["name"]: r["data"]["metrics"]["metrics/evaluate.json"]["data"]
            for rev in table for e in rev.get("experiments") or [] for r in e["revs"]}
    for name in ("finetune-2-epochs", "efficientnetb0-run"):
        row = next(line for line in screen if f"[{name}]" in line)
        shown = [float(x) for x in re.findall(r"(?<![\d:.])[01](?:\.\d+)?(?![\d:.])", row.split("]", 1)[1])][:6]
        expected = [revs[name][model][key] for model in ("base", "head", "fine") for key in ("acc", "f1")]
        assert shown == pytest.approx(expected, abs=1e-5), row
    # `dvc metrics diff --all` lists the headline numbers and the audit's count of suspect labels
    diff = json.loads(dvc(project, "metrics", "diff", "finetune-2-epochs", "efficientnetb0-run", "--all", "--json").stdout)
    assert sorted(diff) == ["metrics/evaluate.json", "metrics/suspects.json"]
    assert sorted(diff["metrics/evaluate.json"]) == sorted(headline) and list(diff["metrics/suspects.json"]) == ["suspects"]

    runs = mlflow_runs(project)
    by_exp = {}
    for r in runs:
        by_exp.setdefault(r.data.tags.get("dvc_exp_name"), []).append(r)
    for name, backbone in (("finetune-2-epochs", "mobilenetv2"), ("efficientnetb0-run", "efficientnetb0")):
        parent = [r for r in by_exp[name] if r.data.tags.get("imgclf.run_kind") == "pipeline"]
        assert len(parent) == 1, name
        children = [r for r in by_exp[name] if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
        assert "finetune" in {c.data.tags["stage"] for c in children}
        assert parent[0].data.params["model.backbone"] == backbone
        assert "finetune_accuracy" in parent[0].data.metrics
    # only the stages that depend on the changed param ran for the epochs experiment
    stages = {c.data.tags["stage"]: c for c in by_exp["finetune-2-epochs"] if c.data.tags.get("stage")}
    assert not set(stages) & {"head", "baseline", "activations", "store@transfer"} and "finetune" in stages
    assert stages["finetune"].data.metrics["members"] == 2 and {"gradcam", "export"} <= set(stages)


def test_push_clone_pull_round_trip(project, tmp_path):
    run(["git", "checkout", "-q", "--", "."], project)
    dvc(project, "checkout", "-f")
    dvc(project, "remote", "add", "-d", "-f", "local", str(tmp_path / "remote"))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "remote", "--allow-empty"], project)
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status").stdout
    assert "Running stage" not in dvc(clone, "repro").stdout
    assert (clone / "models/finetune.keras").exists()
    # the model declared under `artifacts:` in dvc.yaml, given a version (a GTO git tag, as
    # `gto register` writes) and fetched straight from the repository through its remote
    run(["git", "tag", "-a", "image-classifier@v1.0.0", "-m", "Registering artifact image-classifier version v1.0.0"],
        project)
    fetched = tmp_path / "fetched.keras"
    dvc(tmp_path, "artifacts", "get", str(project), "image-classifier", "-o", str(fetched))
    assert fetched.read_bytes() == (project / "models/finetune.keras").read_bytes()


def test_a_queued_experiment_in_a_clone_without_dvc_lock_reruns_only_what_changed(project, tmp_path):
    """A fresh clone that never committed dvc.lock, sharing the cache: a queued experiment that
    changes one fine-tuning param restores every other stage from DVC's run cache."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["git", "rm", "-q", "dvc.lock"], clone)
    run(["git", "commit", "-qm", "no lock"], clone)
    dvc(clone, "cache", "dir", str(project / ".dvc" / "cache"))
    dvc(clone, "exp", "run", "--queue", "-n", "lr-only", "-S", "finetune.learning_rate=0.001")
    dvc(clone, "queue", "start", "-j", "1")
    wait_until(lambda: "Success" in dvc(clone, "queue", "status").stdout
               or "Failed" in dvc(clone, "queue", "status").stdout, "the queued experiment", timeout=900)
    log = dvc(clone, "queue", "logs", "lr-only").stdout
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert "Success" in dvc(clone, "queue", "status").stdout, log[-3000:]
    assert ran == {"finetune", "evaluate", "gradcam", "export"}, log[-3000:]
    assert "Stage 'baseline' is cached - skipping run" in log
