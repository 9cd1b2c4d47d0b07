import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, make_image
from PIL import Image

from imgclf.data.images import BadImageError, decode_rgb, inspect_bytes, normalized_bytes


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


RGB = Image.fromarray(make_image(1, (200, 50, 50), 40))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file", "not an image"),
    (encode(RGB, "JPEG")[:300], "truncated"),
    (encode(RGB, "PNG")[:200], "truncated"),
])
def test_bad_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImageError, match=reason):
        inspect_bytes(data)


def rgba_with_transparency() -> Image.Image:
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    array[..., 0] = 255
    array[:20, :, 3] = 255  # top opaque red, bottom fully transparent
    return Image.fromarray(array, "RGBA")


@pytest.mark.parametrize("data,keeps_bytes", [
    (encode(RGB, "JPEG"), True),
    (encode(RGB, "PNG"), True),
    (encode(RGB.convert("L"), "JPEG"), True),
    (encode(RGB.convert("CMYK"), "JPEG"), False),
    (encode(RGB.convert("P"), "PNG"), False),
    (encode(rgba_with_transparency(), "PNG"), False),
    (encode(RGB, "BMP"), False),
    (encode(RGB.convert("P"), "GIF"), False),
    (encode(RGB.convert("I;16"), "PNG"), False),
])
def test_every_supported_kind_becomes_a_three_channel_image(data, keeps_bytes):
    info = inspect_bytes(data)
    out, extension = normalized_bytes(data, info)
    assert (out is data) == keeps_bytes
    assert extension in (".jpg", ".png")
    array = decode_rgb(out, 24)
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8
    with Image.open(io.BytesIO(out)) as reread:
        assert reread.format in ("JPEG", "PNG") and reread.mode in ("RGB", "L")


def test_transparency_is_composited_on_white():
    data = encode(rgba_with_transparency(), "PNG")
    out, _ = normalized_bytes(data, inspect_bytes(data))
    array = decode_rgb(out, 40)
    assert tuple(array[5, 5]) == (255, 0, 0)
    assert tuple(array[35, 5]) == (255, 255, 255)


def test_decode_resizes_any_size_to_a_square(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.fromarray(make_image(3, (10, 200, 10), 64)).resize((120, 50)).save(path)
    assert decode_rgb(path, 32).shape == (32, 32, 3)


def _upright_test_image() -> Image.Image:
    """40 x 24, asymmetric in both directions: red, green on top, blue below."""
    up = np.zeros((24, 40, 3), np.uint8)
    up[:12, :20], up[:12, 20:], up[12:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return Image.fromarray(up)


T = Image.Transpose
# what a camera stores for each EXIF orientation tag, given the upright scene
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}


def tagged_jpeg(tag: int) -> bytes:
    image = _upright_test_image()
    stored = image if STORED_AS[tag] is None else image.transpose(STORED_AS[tag])
    exif = Image.Exif()
    exif[0x0112] = tag
    return encode(stored, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("tag", sorted(STORED_AS))
def test_exif_orientation_is_applied_wherever_images_are_decoded(tag, tmp_path):
    from imgclf.data.images import load_images
    from imgclf.predict import load_batch

    expected = decode_rgb(encode(_upright_test_image(), "PNG"), 32).astype(int)
    data = tagged_jpeg(tag)
    path = tmp_path / f"tag{tag}.jpg"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert (info.width, info.height) == (40, 24)  # as shown, not as stored
    batch, good, bad = load_batch([path], 32)
    for decoded in (decode_rgb(data, 32), load_images([path], 32)[0], batch[0]):  # stages / predict
        assert np.abs(decoded.astype(int) - expected).mean() < 20, f"tag {tag} not upright"  # wrong: ~100


def smooth_image(seed: int, size: int = 96) -> Image.Image:
    """A photo-like image: random colour fields at four scales (detail at several frequencies,
    as photos have; no two seeds alike)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3))
    for cells, weight in ((4, 1.0), (8, 0.6), (16, 0.4), (32, 0.25)):
        field = Image.fromarray(rng.integers(0, 255, (cells, cells, 3)).astype(np.uint8))
        out += weight * np.asarray(field.resize((size, size), Image.Resampling.BICUBIC), np.float64)
    return Image.fromarray(((out - out.min()) / (out.max() - out.min()) * 255).astype(np.uint8))


def bits_apart(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def test_perceptual_hash_sees_resized_reencoded_and_cropped_copies_and_tells_others_apart():
    from imgclf.data.images import near_duplicate_groups

    original = smooth_image(1)
    copies = [original.resize((60, 60), Image.Resampling.LANCZOS),  # resized
              original,  # re-encoded at low quality below
              original.crop((2, 2, 94, 94))]  # slightly cropped
    hashes = [inspect_bytes(encode(original, "PNG")).phash]
    hashes += [inspect_bytes(encode(copy, "JPEG", quality=50)).phash for copy in copies]
    others = [inspect_bytes(encode(smooth_image(seed), "PNG")).phash for seed in range(2, 12)]
    assert max(bits_apart(hashes[0], h) for h in hashes[1:]) <= 64
    assert min(bits_apart(a, b) for i, a in enumerate(others) for b in others[i + 1:] + hashes[:1]) > 64
    groups = near_duplicate_groups(hashes + others, 64)
    assert groups == [[0, 1, 2, 3]]
    assert near_duplicate_groups(hashes + others, 0) == []


REAL_PHOTOS = sorted((Path(__file__).parent / "data" / "flowers").glob("*.jpg"))


def crop_each_side(image: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def test_copies_of_real_photos_are_grouped_and_unrelated_photos_are_not():
    """tf_flowers photos (tests/data/flowers): copies cropped by 2% on every side, resized to
    80% and re-encoded at JPEG quality 50 are grouped with their original at the default
    threshold; the photos themselves are never grouped with each other."""
    from imgclf.data.images import near_duplicate_groups

    default_bits = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["near_duplicate_bits"]
    photos = [Image.open(path).convert("RGB") for path in REAL_PHOTOS]
    assert len(photos) >= 6
    originals = [inspect_bytes(path.read_bytes()).phash for path in REAL_PHOTOS]
    assert near_duplicate_groups(originals, default_bits) == []
    for photo, original in zip(photos, originals):
        cropped = crop_each_side(photo, 0.02)
        copies = [cropped, photo.resize((round(photo.width * 0.8), round(photo.height * 0.8))),
                  cropped.resize((round(cropped.width * 0.8), round(cropped.height * 0.8)))]
        hashes = [original] + [inspect_bytes(encode(copy, "JPEG", quality=50)).phash for copy in copies]
        assert near_duplicate_groups(hashes + [h for h in originals if h != original], default_bits) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("tag", [3, 6, 8])
def test_the_perceptual_hash_is_taken_of_the_upright_image(tag):
    scene = smooth_image(7)
    exif = Image.Exif()
    exif[0x0112] = tag
    stored = scene.transpose(STORED_AS[tag])
    tagged = inspect_bytes(encode(stored, "JPEG", quality=90, exif=exif)).phash
    assert bits_apart(tagged, inspect_bytes(encode(scene, "PNG")).phash) <= 16
    assert bits_apart(tagged, inspect_bytes(encode(stored, "PNG")).phash) > 64
