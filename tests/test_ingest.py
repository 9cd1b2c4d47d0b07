import shutil
from collections import Counter

import pytest
from conftest import make_folder

from imgclf.data.ingest import ingest
from imgclf.data.sources import iter_folder


def test_ingest_keeps_valid_unique_images_and_reports_the_rest(tmp_path):
    src = make_folder(tmp_path / "src", classes=3, per_class=8)
    (src / "class_0" / "notes.txt").write_text("not an image")
    (src / "class_0" / "zero.jpg").write_bytes(b"")
    good = (src / "class_1" / "img_000.jpg").read_bytes()
    (src / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    shutil.copy(src / "class_1" / "img_001.jpg", src / "class_1" / "copy_of_1.jpg")  # same class
    shutil.copy(src / "class_2" / "img_002.jpg", src / "class_0" / "conflict.jpg")  # two classes
    (src / "stray.txt").write_text("outside any class")

    report = ingest(iter_folder(src), tmp_path / "raw", max_per_class=0, seed=0, near_duplicate_bits=64)

    skipped = {s["origin"].split("/")[-1]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"notes.txt", "zero.jpg", "truncated.jpg", "stray.txt"}
    assert "empty" in skipped["zero.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert len(report.duplicates) == 1
    pair = {report.duplicates[0]["kept"].split("/")[-1], report.duplicates[0]["dropped"].split("/")[-1]}
    assert pair == {"img_001.jpg", "copy_of_1.jpg"}
    assert len(report.conflicts) == 1 and report.conflicts[0]["labels"] == ["class_0", "class_2"]
    # the conflicting image is excluded from both classes
    assert report.counts == {"class_0": 8, "class_1": 8, "class_2": 7}
    written = Counter(p.parent.name for p in (tmp_path / "raw").rglob("*.jpg"))
    assert written == report.counts


def test_max_per_class_caps_deterministically(tmp_path):
    src = make_folder(tmp_path / "src", classes=2, per_class=10)
    a = ingest(iter_folder(src), tmp_path / "a", max_per_class=4, seed=1, near_duplicate_bits=64)
    ingest(iter_folder(src), tmp_path / "b", max_per_class=4, seed=1, near_duplicate_bits=64)
    assert a.counts == {"class_0": 4, "class_1": 4} and a.capped == 12
    names = lambda root: sorted(p.name for p in root.rglob("*.jpg"))  # noqa: E731
    assert names(tmp_path / "a") == names(tmp_path / "b")


def test_class_with_only_bad_files_fails_and_writes_nothing(tmp_path):
    src = make_folder(tmp_path / "src", classes=2, per_class=3)
    (src / "broken").mkdir()
    (src / "broken" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no valid images: broken"):
        ingest(iter_folder(src), tmp_path / "raw", max_per_class=0, seed=0, near_duplicate_bits=64)
    assert not (tmp_path / "raw").exists()
    assert not list(tmp_path.glob(".raw*"))


def test_near_identical_images_are_grouped_and_conflicts_across_classes_excluded(tmp_path):
    import json

    from test_images import smooth_image

    from imgclf.data.split import assign, list_class_images, read_groups
    from imgclf.params import SplitParams

    src = tmp_path / "src"
    for label, seeds in (("a", range(0, 30)), ("b", range(100, 130))):
        (src / label).mkdir(parents=True)
        for seed in seeds:
            smooth_image(seed).save(src / label / f"{seed}.png")
    for seed in range(0, 10):  # near-identical copies within class a: resized, re-encoded, cropped
        image = smooth_image(seed)
        image.resize((64, 64)).save(src / "a" / f"{seed}_small.jpg", quality=60)
        image.crop((1, 1, 95, 95)).save(src / "a" / f"{seed}_crop.jpg", quality=80)  # 2% off each side
    smooth_image(105).resize((80, 80)).save(src / "a" / "105_in_wrong_class.jpg", quality=70)

    raw = tmp_path / "raw"
    report = ingest(iter_folder(src), raw, max_per_class=0, seed=0, near_duplicate_bits=64)

    near = [c for c in report.conflicts if c["kind"] == "near-identical"]
    assert len(near) == 1 and near[0]["labels"] == ["a", "b"]
    assert {o.split("/")[-1] for o in near[0]["origins"]} == {"105.png", "105_in_wrong_class.jpg"}
    assert report.counts == {"a": 50, "b": 29}  # both copies of the conflicting image excluded
    assert len(report.near_duplicates) == 10 and all(len(g["files"]) == 3 for g in report.near_duplicates)
    assert json.loads((raw / "near_duplicates.json").read_text()) == [g["files"] for g in report.near_duplicates]
    assert report.summary()["near_duplicate_groups"] == 10

    groups = read_groups(raw)
    splits = {a.source: a.split for a in assign(list_class_images(raw), SplitParams(0.5, 0.25, 0.25, "corrections.csv"), 3, groups)}
    assert len({s for s in splits.values()}) == 3
    for group in groups:
        assert len({splits[path] for path in group}) == 1, f"group split apart: {group}"
