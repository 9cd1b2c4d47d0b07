"""The real tfds.load path, offline, against a tiny TFDS dataset the test prepares."""
import io

import numpy as np
import tensorflow_datasets as tfds
from conftest import COLORS, make_image
from PIL import Image

from imgclf.data.ingest import ingest
from imgclf.data.sources import iter_tfds

LABELS = ["daisy", "roses", "tulips"]


def _jpeg(seed: int, color) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_image(seed, color, 32)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class TinyFlowers(tfds.core.GeneratorBasedBuilder):
    """Shaped like tf_flowers: one `train` split, features `image` and `label`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=LABELS),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for c, _ in enumerate(LABELS):
            for i in range(5):
                # the TFDS Image feature re-encodes arrays; pass encoded bytes via a file object
                yield f"{c}-{i}", {"image": io.BytesIO(_jpeg(c * 10 + i, COLORS[c])), "label": c}
        yield "dup", {"image": io.BytesIO(_jpeg(0, COLORS[0])), "label": 0}


def test_tfds_source_yields_original_bytes_offline(tmp_path):
    TinyFlowers(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    items = list(iter_tfds("tiny_flowers", str(tmp_path / "tfds")))
    assert len(items) == 16
    assert {item.label for item in items} == set(LABELS)
    originals = {_jpeg(c * 10 + i, COLORS[c]) for c in range(3) for i in range(5)}
    assert {item.data for item in items} == originals  # byte for byte, not re-encoded

    report = ingest(iter(items), tmp_path / "raw", max_per_class=0, seed=0, near_duplicate_bits=64)
    assert report.counts == {"daisy": 5, "roses": 5, "tulips": 5}
    assert len(report.duplicates) == 1
    first = next((tmp_path / "raw" / "daisy").iterdir()).read_bytes()
    assert first in originals and np.asarray(Image.open(io.BytesIO(first))).shape == (32, 32, 3)
