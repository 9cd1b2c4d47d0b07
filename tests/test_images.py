import io

import numpy as np
import pytest
from PIL import Image

from imgclf.images import BadImageError, decode_rgb, inspect_bytes, normalized_bytes
from conftest import make_image


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
