"""The data audit (labels that look wrong, copies across splits) and the corrections file that
the split stage applies."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_folder, run_program

from imgclf.data.corrections import apply_corrections, read_corrections
from imgclf.data.split import list_class_images
from imgclf.errors import DataError
from imgclf.params import AuditParams
from imgclf.serve.audit import AuditSet, audit, cross_split_copies

CLASSES = ["daisy", "roses", "tulips"]
PARAMS = AuditParams(folds=5, gallery_size=8, copy_similarity=0.99)


def clustered_sets(per_class: dict[str, int], flips: dict[str, list[int]], seed: int = 0) -> list[AuditSet]:
    """Features in one well-separated cluster per class (as a backbone gives photos of different
    flowers), with the labels of the images listed in ``flips`` moved to the next class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(CLASSES), 64)) * 3
    sets = []
    for split, count in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), count)
        features = centres[labels] + rng.normal(0, 1, (len(labels), 64))
        given = labels.copy()
        for i in flips.get(split, []):
            given[i] = (labels[i] + 1) % len(CLASSES)
        paths = [f"{CLASSES[label]}/{split}_{i}.jpg" for i, label in enumerate(given)]
        sets.append(AuditSet(split, features.astype(np.float32), given, paths))
    return sets


def test_flipped_labels_rank_first_in_every_split():
    flips = {"train": [0, 45, 90, 130], "val": [3, 22], "test": [5, 31]}
    sets = clustered_sets({"train": 60, "val": 15, "test": 15}, flips)
    report = audit(sets, CLASSES, PARAMS, seed=1)
    flipped = {sets[i].paths[j] for i, s in enumerate(sets) for j in flips[s.split]}
    top = [row["path"] for row in report.label_issues[:len(flipped)]]
    assert set(top) == flipped
    assert len(report.label_issues) == sum(len(s.labels) for s in sets)
    scores = [row["score"] for row in report.label_issues]
    assert scores == sorted(scores) and 0 <= scores[0] < scores[-1] <= 1
    first = report.label_issues[0]
    assert first["suggested"] != first["given"]
    flagged = {row["path"] for row in report.label_issues if row["issue"]}
    assert flagged <= flipped and len(flagged) >= 0.75 * len(flipped)  # cleanlab flags conservatively
    assert report.summary["suspects"] == len(flagged)
    assert report.summary["per_split"]["test"]["images"] == 45


def test_probabilities_are_out_of_sample():
    """A memorising model would score its own training labels as right: an image whose label
    is flipped must score low: the model that judged it never saw it."""
    flips = {"train": [7]}
    sets = clustered_sets({"train": 30, "val": 10, "test": 10}, flips, seed=3)
    rows = {row["path"]: row for row in audit(sets, CLASSES, PARAMS, seed=0).label_issues}
    assert rows[sets[0].paths[7]]["score"] < 0.2


def test_copies_in_different_splits_are_reported_and_copies_within_a_split_are_not():
    sets = clustered_sets({"train": 10, "val": 5, "test": 5}, {})
    sets[1].features[2] = sets[0].features[4] * 1.01  # a val image copying a train image
    sets[0].features[6] = sets[0].features[7]  # two train images alike: not a leak
    copies = cross_split_copies(sets, 0.99)
    assert [(c["path_a"], c["split_a"], c["path_b"], c["split_b"]) for c in copies] == [
        (sets[0].paths[4], "train", sets[1].paths[2], "val")]


@pytest.mark.parametrize("per_class,reason", [
    ({"train": 1, "val": 1, "test": 2}, "fewer train+val images than audit.folds=5"),
])
def test_too_few_images_give_an_empty_report_with_the_reason(per_class, reason):
    report = audit(clustered_sets(per_class, {}), CLASSES, PARAMS, seed=0)
    assert report.label_issues == [] and report.summary["suspects"] == 0
    assert reason in report.summary["skipped"]


def test_one_class_gives_an_empty_report():
    sets = [AuditSet("train", np.zeros((6, 4), np.float32), np.zeros(6, int), [f"a/{i}.jpg" for i in range(6)])]
    report = audit(sets, ["a"], PARAMS, seed=0)
    assert report.label_issues == [] and "one class only" in report.summary["skipped"]


def write_corrections(path, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "action", "label"] + (["data"] if rows and len(rows[0]) == 4 else []))
        writer.writerows(rows)
    return path


def test_corrections_exclude_and_relabel(tmp_path):
    raw = make_folder(tmp_path / "raw", classes=3, per_class=4)
    file = write_corrections(tmp_path / "corrections.csv", [["class_0/img_001.jpg", "exclude", ""],
                                                             ["class_1/img_002.jpg", "relabel", "class_2"]])
    classes, counts = apply_corrections(list_class_images(raw), read_corrections(file), raw, file)
    assert counts == {"excluded": 1, "relabelled": 1, "skipped": 0, "other_data": 0}
    assert raw / "class_0/img_001.jpg" not in classes["class_0"] and len(classes["class_0"]) == 3
    assert raw / "class_1/img_002.jpg" in classes["class_2"] and len(classes["class_2"]) == 5
    assert len(classes["class_1"]) == 3


@pytest.mark.parametrize("row,message", [
    (["class_0/nope.jpg", "exclude", ""], "line 3: no image class_0/nope.jpg under"),
    (["class_0/img_001.jpg", "relabel", "class_9"], "line 3: unknown class 'class_9'"),
    (["class_0/img_001.jpg", "delete", ""], "line 3: unknown action 'delete'; use one of: exclude, relabel"),
    (["class_0/img_001.jpg", "relabel", ""], "line 3: relabel needs the new class"),
])
def test_a_bad_row_stops_with_one_line_naming_it(tmp_path, row, message):
    raw = make_folder(tmp_path / "raw", classes=2, per_class=3)
    file = write_corrections(tmp_path / "corrections.csv", [["class_1/img_000.jpg", "exclude", ""], row])
    with pytest.raises(DataError, match=message) as err:
        apply_corrections(list_class_images(raw), read_corrections(file), raw, file)
    assert str(file) in str(err.value) and "\n" not in str(err.value)


def test_a_file_made_for_another_data_set_is_named_as_such(tmp_path):
    raw = make_folder(tmp_path / "raw", classes=2, per_class=3)
    file = write_corrections(tmp_path / "corrections.csv", [["tulips/a.jpg", "exclude", ""],
                                                             ["roses/b.jpg", "relabel", "tulips"]])
    with pytest.raises(DataError, match=r"none of its 2 rows names an image under .*made for another data set\? "
                                        r"Name it in a data column \(this data is 'photos'\), or start a new file "
                                        r"from the header line alone: path,action,label,data"):
        apply_corrections(list_class_images(raw), read_corrections(file), raw, file, data_name="photos")


def test_rows_made_for_another_data_set_are_set_aside_and_typos_for_this_one_still_stop(tmp_path):
    """One file serves several data sets: tf_flowers' rows do not stop a run on your photos, while a
    row meant for your photos (named so, or naming no data set) that matches nothing still does."""
    raw = make_folder(tmp_path / "raw", classes=2, per_class=3)
    file = write_corrections(tmp_path / "corrections.csv", [["tulips/a.jpg", "exclude", "", "tf_flowers"],
                                                             ["roses/b.jpg", "relabel", "tulips", "tf_flowers"],
                                                             ["class_0/img_001.jpg", "exclude", "", "photos"]])
    classes, counts = apply_corrections(list_class_images(raw), read_corrections(file), raw, file, data_name="photos")
    assert counts == {"excluded": 1, "relabelled": 0, "skipped": 0, "other_data": 2}
    assert raw / "class_0/img_001.jpg" not in classes["class_0"]
    classes, counts = apply_corrections(list_class_images(raw), read_corrections(file)[:2], raw, file,
                                        data_name="photos")  # only another data set's rows: nothing to do
    assert counts["other_data"] == 2 and sum(map(len, classes.values())) == 6
    for typo in (["class_0/img_01.jpg", "exclude", "", "photos"], ["class_0/img_01.jpg", "exclude", "", ""]):
        file = write_corrections(tmp_path / "corrections.csv", [["tulips/a.jpg", "exclude", "", "tf_flowers"],
                                                                 ["class_1/img_000.jpg", "exclude", "", "photos"], typo])
        with pytest.raises(DataError, match="line 4: no image class_0/img_01.jpg under"):
            apply_corrections(list_class_images(raw), read_corrections(file), raw, file, data_name="photos")


@pytest.mark.parametrize("source,path,name", [("tfds", "", "tf_flowers"), ("folder", "/photos/my_flowers/", "my_flowers"),
                                              ("url", "https://example.com/a/flower_photos.tgz?x=1", "flower_photos"),
                                              ("url", "photos.tar.gz", "photos")])
def test_the_data_set_name_that_rows_are_matched_against(source, path, name):
    from imgclf.params import DataParams

    assert DataParams(source, "tf_flowers", path, "", 0, 0).set_name == name


def test_a_capped_subset_skips_the_rows_of_images_it_left_out(tmp_path):
    raw = make_folder(tmp_path / "raw", classes=2, per_class=3)
    file = write_corrections(tmp_path / "corrections.csv", [["class_0/img_001.jpg", "exclude", ""],
                                                             ["class_0/img_007.jpg", "relabel", "class_1"],
                                                             ["class_1/img_009.jpg", "exclude", ""]])
    classes, counts = apply_corrections(list_class_images(raw), read_corrections(file), raw, file, subset=True)
    assert counts == {"excluded": 1, "relabelled": 0, "skipped": 2, "other_data": 0}
    assert [f.name for f in classes["class_0"]] == ["img_000.jpg", "img_002.jpg"] and len(classes["class_1"]) == 3
    with pytest.raises(DataError, match="line 3: no image class_0/img_007.jpg under"):
        apply_corrections(list_class_images(raw), read_corrections(file), raw, file)


def test_the_committed_corrections_are_well_formed_tf_flowers_rows():
    """The reviewed fixes of tf_flowers that the default run applies (docs/audit.md)."""
    rows = read_corrections(ROOT / "corrections.csv")
    assert {row.data for row in rows} == {"tf_flowers"}  # set aside on any other data
    classes = {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    assert rows and all(row.path.split("/")[0] in classes and row.path.endswith(".jpg") for row in rows)
    assert all(row.label in classes and row.label != row.path.split("/")[0] for row in rows if row.action == "relabel")


def test_a_file_without_the_header_is_refused(tmp_path):
    file = tmp_path / "corrections.csv"
    file.write_text("class_0/img_001.jpg,exclude,\n")
    with pytest.raises(DataError, match="the header must be path,action,label"):
        read_corrections(file)


@pytest.mark.parametrize("mode", ["plain", "guarded"])
def test_the_label_issue_step_starts_no_process(mode):
    """The audit stage once hung for good: cleanlab forked a process pool from the threaded stage
    process and a worker waited forever on a lock. Run as the stage runs it, on a machine counted
    as 4 cores, the step must fork nothing (nor, with the stage's guard on, fail on a refused fork)."""
    done = run_program("audit_forks.py", mode, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"forks": 0, "children": [], "rows": 900}


def test_a_stage_process_refuses_to_fork():
    """What every stage runs first (run_stage): a fork, by a library's process pool or by us, fails
    at once with a line naming the rule, instead of a race that may hang."""
    code = ("import multiprocessing, os\n"
            "from imgclf.concurrency import forbid_fork\n"
            "forbid_fork()\n"
            "try:\n"
            "    multiprocessing.Pool(2)\n"
            "except RuntimeError as err:\n"
            "    print(err)\n"
            "try:\n"
            "    os.fork()\n"
            "except RuntimeError as err:\n"
            "    print(err)\n"
            "import subprocess, sys\n"
            "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True).stdout)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = done.stdout.split("\n")[:3]
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(lines) == 3, done.stdout
    for refused in lines[:2]:
        assert refused.startswith("a stage process must not fork") and "imgclf/concurrency.py" in refused
    assert lines[2] == "7"  # subprocess execs at once and stays allowed
