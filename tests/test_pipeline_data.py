"""`dvc repro split` end to end in a throw-away git + DVC repository."""
import csv
import hashlib
import json
import shutil
import sys

import pytest
import yaml

from conftest import ROOT, dvc, make_folder, make_project, run, tiny_params
from imgclf.data.corrections import read_corrections


@pytest.mark.slow
def test_repro_split_on_a_folder_with_bad_files(tmp_path):
    photos = make_folder(tmp_path / "photos", classes=3, per_class=15)
    (photos / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "class_1" / "empty.png").write_bytes(b"")
    shutil.copy(photos / "class_2" / "img_000.jpg", photos / "class_0" / "same_as_class_2.jpg")
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))

    result = dvc(project, "repro", "split")
    assert "skipped" in result.stdout

    report = json.loads((project / "reports/download/report.json").read_text())
    skipped = sorted(s["origin"].rsplit("/", 1)[-1] for s in report["skipped"])
    assert skipped == ["broken.jpg", "empty.png"]
    assert report["conflicts"][0]["labels"] == ["class_0", "class_2"]

    seen = {}
    for split in ("train", "val", "test"):
        for f in (project / "data/split" / split).rglob("*.*"):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            assert digest not in seen, f"{f.name} is in {split} and {seen[digest]}"
            seen[digest] = split
    assert len(seen) == 15 * 3 - 1  # the conflicting image left both classes
    counts = json.loads((project / "reports/split/summary.json").read_text())
    assert sum(counts[s]["total"] for s in ("train", "val", "test")) == len(seen)
    assert (project / "plots/download/class_distribution.png").stat().st_size > 0

    again = dvc(project, "repro", "split")
    assert "Data and pipelines are up to date" in again.stdout or "didn't change" in again.stdout
    assert "Running stage" not in again.stdout

    status = dvc(project, "status", "split")
    assert "up to date" in status.stdout.lower()


@pytest.mark.slow
def test_bad_params_stop_the_stage_with_the_key(tmp_path):
    project = make_project(tmp_path / "project", tiny_params(
        data={"source": "folder", "path": str(tmp_path / "missing")}))
    result = dvc(project, "repro", "download", check=False)
    assert result.returncode != 0
    assert str(tmp_path / "missing") in result.stderr + result.stdout  # DVC checks the dependency
    direct = run([sys.executable, "-m", "stages.download"], project, check=False)
    assert direct.returncode != 0
    assert "data.path: folder not found" in direct.stderr
    assert not (project / "data/raw").exists()

    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(split={"train": 0.9})))
    direct = run([sys.executable, "-m", "stages.split"], project, check=False)
    assert "split: train + val + test must sum to 1" in direct.stderr


@pytest.mark.slow
def test_corrections_are_a_dependency_that_the_split_stage_applies(tmp_path):
    photos = make_folder(tmp_path / "photos", classes=3, per_class=10)
    project = make_project(tmp_path / "project", tiny_params(data={"source": "folder", "path": str(photos)}))
    # the committed file holds tf_flowers' reviewed fixes: they do not stop a run on other photos
    shutil.copy(ROOT / "corrections.csv", project / "corrections.csv")
    result = dvc(project, "repro", "split")
    rows = len(read_corrections(ROOT / "corrections.csv"))
    assert f"({rows} rows of corrections.csv made for tf_flowers set aside: this data is photos)" in result.stdout
    raw = sorted(p.relative_to(project / "data/raw").as_posix() for p in (project / "data/raw").rglob("*.jpg"))
    moved, dropped = next(p for p in raw if p.startswith("class_0/")), next(p for p in raw if p.startswith("class_1/"))
    corrections = project / "corrections.csv"
    corrections.write_text(f"path,action,label\n{moved},relabel,class_2\n{dropped},exclude,\n")
    assert "split" in json.loads(dvc(project, "status", "--json").stdout)  # the file is a dependency

    result = dvc(project, "repro", "split")
    assert "1 excluded, 1 relabelled" in result.stdout
    summary = json.loads((project / "reports/split/summary.json").read_text())
    assert summary["corrections"] == {"excluded": 1, "relabelled": 1, "skipped": 0, "other_data": 0}
    assert [sum(summary[s][c] for s in ("train", "val", "test")) for c in ("class_0", "class_1", "class_2")] == [9, 9, 11]
    with (project / "data/split/manifest.csv").open() as fh:
        rows = {row["source"]: row for row in csv.DictReader(fh)}
    assert rows[moved]["label"] == "class_2" and dropped not in rows

    corrections.write_text(f"path,action,label\n{moved},relabel,class_2\nclass_0/nope.jpg,exclude,\n")
    failed = dvc(project, "repro", "split", check=False)
    assert failed.returncode != 0
    assert f"error: {corrections}, line 3: no image class_0/nope.jpg under" in failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr

    # a quick run on a capped subset (data.max_per_class) skips the rows of the images it left out
    corrections.write_text(f"path,action,label\n{moved},relabel,class_2\n{dropped},exclude,\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["max_per_class"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(project, "repro", "split")
    summary = json.loads((project / "reports/split/summary.json").read_text())
    assert sum(summary["corrections"].values()) == 2 and summary["corrections"]["skipped"] >= 1
    assert f"{summary['corrections']['skipped']} skipped: not in this capped subset)" in result.stdout
