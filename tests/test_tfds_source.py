"""The real tfds.load path, offline, against a tiny TFDS dataset the test prepares."""
import io

import numpy as np
import pytest
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


class ManyFlowers(TinyFlowers):
    """Like TinyFlowers, with 50 images: written in several shards, read interleaved by tfds.load."""

    def _generate_examples(self):
        for i in range(50):
            c = i % len(LABELS)
            yield f"{i}", {"image": io.BytesIO(_jpeg(100 + i, COLORS[c])), "label": c}


def test_the_tfrecord_reader_gives_what_tfds_load_gives_in_its_order_without_tensorflow(tmp_path):
    """Read without TensorFlow, a dataset in three shards yields the same records in the same
    order (so the same indices) as tfds.load's interleaved reading."""
    import subprocess
    import sys

    from conftest import ROOT

    from imgclf.data.sources import on_local_tfrecords, tfds_load_examples, tfrecord_examples

    builder = ManyFlowers(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    assert len(builder.info.splits["train"].filepaths) == 3 and on_local_tfrecords(builder)
    expected = list(tfds_load_examples(builder))
    assert [index for _, index, _, _ in expected] == list(range(50))
    assert [label for _, _, _, label in expected] != [i % 3 for i in range(50)]  # interleaved, not in order
    assert list(tfrecord_examples(builder)) == expected

    code = ("import sys; from imgclf.data.sources import iter_tfds; "
            f"items = list(iter_tfds('many_flowers', {str(tmp_path / 'tfds')!r})); "
            "print(len(items), 'tensorflow' in sys.modules)")
    # the builder class must be registered in the child too: import this test module there
    code = f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}]; import test_tfds_source; " + code
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["50", "False"]


def _framed(record: bytes) -> bytes:
    return len(record).to_bytes(8, "little") + b"\0" * 4 + record + b"\0" * 4


@pytest.mark.parametrize("content, message", [
    ((10).to_bytes(8, "little") + b"\0" * 4 + b"short", "bad.tfrecord: truncated TFRecord file"),
    (_framed(b"\x0a\x05ab"), r"bad.tfrecord: record 0: not a tf.train.Example record"),
    (_framed(b""), "bad.tfrecord: record 0 has no image or label feature"),
])
def test_a_bad_tfrecord_file_is_named(tmp_path, content, message):
    from imgclf.data.tfrecord import read_examples
    from imgclf.errors import DataError

    path = tmp_path / "bad.tfrecord"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_examples(path, ("image", "label")))


@pytest.mark.parametrize("cycle, block", [(4, 3), (16, 16), (1, 16)])
def test_interleave_follows_tf_data(cycle, block):
    """More sources than the cycle holds, of uneven lengths: the slots refill as tf.data's do."""
    import tensorflow as tf

    from imgclf.data.sources import interleave

    lengths = [5, 0, 17, 3, 9, 1, 12, 7, 0, 4, 20, 2]
    sources = [[100 * s + i for i in range(n)] for s, n in enumerate(lengths)]
    expected = tf.data.Dataset.from_tensor_slices(np.arange(len(lengths))).interleave(
        lambda s: tf.data.Dataset.range(tf.gather(tf.constant(lengths, tf.int64), s)).map(lambda i: i + 100 * s),
        cycle_length=cycle, block_length=block)
    assert list(interleave([iter(s) for s in sources], cycle, block)) == [int(x) for x in expected.as_numpy_iterator()]
