import csv
import hashlib
from collections import Counter

from conftest import make_folder

from imgclf.data.split import assign, list_class_images, write_split
from imgclf.params import SplitParams

FRACTIONS = SplitParams(0.7, 0.15, 0.15, "corrections.csv")


def by_name(assignments):
    return {a.source.name + a.label: a.split for a in assignments}


def test_split_is_stratified_per_class(tmp_path):
    make_folder(tmp_path / "raw", classes=3, per_class=200)
    assignments = assign(list_class_images(tmp_path / "raw"), FRACTIONS, seed=42)
    for label in ("class_0", "class_1", "class_2"):
        counts = Counter(a.split for a in assignments if a.label == label)
        assert abs(counts["train"] / 200 - 0.70) < 0.08, counts
        assert abs(counts["val"] / 200 - 0.15) < 0.07, counts
        assert abs(counts["test"] / 200 - 0.15) < 0.07, counts


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path):
    make_folder(tmp_path / "raw", classes=2, per_class=50)
    classes = list_class_images(tmp_path / "raw")
    first, second = by_name(assign(classes, FRACTIONS, 7)), by_name(assign(classes, FRACTIONS, 7))
    assert first == second
    assert first != by_name(assign(classes, FRACTIONS, 8))


def test_adding_images_never_moves_existing_ones(tmp_path):
    make_folder(tmp_path / "raw", classes=2, per_class=60)
    before = by_name(assign(list_class_images(tmp_path / "raw"), FRACTIONS, 3))
    make_folder(tmp_path / "more", classes=2, per_class=40, seed=9)
    for p in (tmp_path / "more").rglob("*.jpg"):
        p.rename(tmp_path / "raw" / p.parent.name / f"new_{p.name}")
    after = by_name(assign(list_class_images(tmp_path / "raw"), FRACTIONS, 3))
    assert len(after) == 200
    assert all(after[k] == v for k, v in before.items())


def test_written_split_has_no_leakage_and_matches_counts(tmp_path):
    make_folder(tmp_path / "raw", classes=3, per_class=30)
    counts = write_split(assign(list_class_images(tmp_path / "raw"), FRACTIONS, 0), tmp_path / "split")
    digests = {}
    for split in ("train", "val", "test"):
        files = list((tmp_path / "split" / split).rglob("*.jpg"))
        assert len(files) == counts[split]["total"]
        for f in files:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            assert digest not in digests, f"{f} also in {digests[digest]}"
            digests[digest] = split
    assert sum(c["total"] for c in counts.values()) == 90
    with (tmp_path / "split" / "manifest.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 90


def test_small_classes_get_an_image_in_every_split(tmp_path):
    make_folder(tmp_path / "raw", classes=4, per_class=4)
    assignments = assign(list_class_images(tmp_path / "raw"), FRACTIONS, 0)
    for label in {a.label for a in assignments}:
        assert {a.split for a in assignments if a.label == label} == {"train", "val", "test"}


def test_split_files_are_links_to_the_raw_images_not_copies(tmp_path):
    make_folder(tmp_path / "raw", classes=2, per_class=10)
    write_split(assign(list_class_images(tmp_path / "raw"), FRACTIONS, 0), tmp_path / "split")
    raw = {(f.parent.name, f.name): f.stat().st_ino for f in (tmp_path / "raw").rglob("*.jpg")}
    written = list((tmp_path / "split").rglob("*.jpg"))
    assert len(written) == 20
    assert all(f.stat().st_ino == raw[f.parent.name, f.name] for f in written)  # the same bytes on disk, once
