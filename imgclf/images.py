"""Decode, validate and normalise images. The one place pixels are read from files."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Formats and modes kept byte for byte; anything else is converted to an RGB PNG.
_KEEP_AS_IS = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


class BadImageError(ValueError):
    """The bytes are not a fully decodable image."""


HASH_SIDE = 16  # perceptual hash: HASH_SIDE**2 = 256 bits
_ORIENTATION = 0x0112  # the EXIF orientation tag


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int  # as displayed: after the EXIF orientation
    height: int
    dhash: bytes  # 256-bit difference hash of the upright image (see perceptual_hash)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos taken with the phone turned), if any."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: show the pixels as stored
        return image
    return ImageOps.exif_transpose(image) if orientation in range(2, 9) else image


def perceptual_hash(image: Image.Image) -> bytes:
    """Difference hash: the image in grey at 17 x 16, one bit per pair of horizontal
    neighbours (is the right one brighter?). Resized, re-encoded or slightly cropped copies
    differ in few of the 256 bits; unrelated photos in about half."""
    grey = np.asarray(to_rgb(image).convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX),
                      dtype=np.int16)
    return np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes()


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
                shown = upright(image)
                info = ImageInfo(image.format or "unknown", image.mode, shown.width, shown.height,
                                 perceptual_hash(shown))
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
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array, upright (EXIF orientation
    applied), squashed to the square, bilinear. Every stage and `predict` decode through here."""
    opened = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
    with opened as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # DCT-domain downscale: much faster, never below size
        image.seek(0)
        rgb = to_rgb(upright(image))
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


MAX_NEAR_DUPLICATE_BITS = 15  # the bucketing below finds every pair within 15 of 256 bits
# Written by the download stage into data/raw: [["<class>/<file>", ...], ...], read by split.
NEAR_DUPLICATES_FILE = "near_duplicates.json"


def near_duplicate_groups(hashes: Sequence[bytes], max_bits: int) -> list[list[int]]:
    """Indices of images whose perceptual hashes differ in at most ``max_bits`` bits, joined
    transitively; groups of two or more, each sorted. 0 finds nothing.

    The 256 bits are cut into 16 chunks of 16: two hashes within 15 bits agree on at least
    one whole chunk, so only images sharing a chunk value are compared (no N x N matrix)."""
    if max_bits <= 0 or len(hashes) < 2:
        return []
    if max_bits > MAX_NEAR_DUPLICATE_BITS:
        raise ValueError(f"max_bits must be <= {MAX_NEAR_DUPLICATE_BITS}, got {max_bits}")
    packed = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), -1)
    # equal hashes (blank or uniform images can share one) are one node: compare distinct ones
    distinct, node_of = np.unique(packed, axis=0, return_inverse=True)
    words = np.ascontiguousarray(distinct).view(np.uint64)  # (M, 4): XOR + popcount per pair
    chunks = np.ascontiguousarray(distinct).view(">u2")  # (M, 16)
    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in chunks.T:
        order = np.argsort(column, kind="stable")
        values = column[order]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(values)]):
            members = order[start:end]
            for k in range(len(members) - 1):
                rest = members[k + 1:]
                close = np.bitwise_count(words[rest] ^ words[members[k]]).sum(axis=1) <= max_bits
                for other in rest[close]:
                    parent[find(int(other))] = find(int(members[k]))
    groups: dict[int, list[int]] = {}
    for i, node in enumerate(np.ravel(node_of)):
        groups.setdefault(find(int(node)), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)
