"""Decode, validate and normalise images. The one place pixels are read from files."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Formats and modes kept byte for byte; anything else is converted to an RGB PNG.
_KEEP_AS_IS = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


class BadImageError(ValueError):
    """The bytes are not a fully decodable image."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int
    height: int


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0)
        return Image.fromarray((array * scale).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def inspect_bytes(data: bytes) -> ImageInfo:
    """Fully decode ``data``; raise BadImageError with a reason if it is not a usable image."""
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel: catches truncated files
                info = ImageInfo(image.format or "unknown", image.mode, image.width, image.height)
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombWarning as err:
        raise BadImageError(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"corrupt or truncated image: {err}") from None
    if info.width < 1 or info.height < 1:
        raise BadImageError("image has no pixels")
    return info


def normalized_bytes(data: bytes, info: ImageInfo) -> tuple[bytes, str]:
    """Return (bytes, extension): original bytes for RGB/gray JPEG and PNG, else an RGB PNG."""
    if (info.format, info.mode) in _KEEP_AS_IS:
        return data, ".jpg" if info.format == "JPEG" else ".png"
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)  # first frame of animated GIFs
        rgb = to_rgb(image)
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def decode_rgb(source: str | Path | bytes, size: int) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array (squashed, bilinear)."""
    opened = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
    with opened as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # DCT-domain downscale: much faster, never below size
        image.seek(0)
        rgb = to_rgb(image)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int, workers: int = 4) -> np.ndarray:
    """Decode and resize many files once, in parallel threads (PIL releases the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(index: int) -> None:
        out[index] = decode_rgb(paths[index], size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(len(paths))))
    return out


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
