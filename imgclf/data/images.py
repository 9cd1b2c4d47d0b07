"""Decode, validate and normalise images. The one place pixels are read from files."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Formats and modes kept byte for byte; anything else is converted to an RGB PNG.
_KEEP_AS_IS = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


class BadImageError(ValueError):
    """The bytes are not a fully decodable image."""


HASH_SIDE = 16  # perceptual hash: the HASH_SIDE x HASH_SIDE lowest DCT frequencies, 256 bits
HASH_SAMPLE = 64  # ... of the image in grey at HASH_SAMPLE x HASH_SAMPLE
HASH_BITS = HASH_SIDE * HASH_SIDE
_ORIENTATION = 0x0112  # the EXIF orientation tag


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int  # as displayed: after the EXIF orientation
    height: int
    phash: bytes  # 256-bit DCT hash of the upright image (see perceptual_hash)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos taken with the phone turned), if any."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: show the pixels as stored
        return image
    return ImageOps.exif_transpose(image) if orientation in range(2, 9) else image


def _dct_basis(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``."""
    rows = np.cos(np.pi * np.outer(np.arange(k), 2 * np.arange(n) + 1) / (2 * n)) * np.sqrt(2 / n)
    rows[0] /= np.sqrt(2)
    return rows


_DCT = _dct_basis(HASH_SAMPLE, HASH_SIDE)


def perceptual_hash(image: Image.Image) -> bytes:
    """DCT hash (pHash): the image in grey at 64 x 64, its 16 x 16 lowest 2-D DCT frequencies,
    one bit per frequency (above the median of all but the constant term?). Resized, re-encoded
    and slightly cropped copies of a photo differ in few of the 256 bits, unrelated photos in about
    half (docs/pipeline.md gives the distances measured on tf_flowers)."""
    grey = np.asarray(to_rgb(image).convert("L").resize((HASH_SAMPLE, HASH_SAMPLE), Image.Resampling.BOX),
                      dtype=np.float64)
    coefficients = (_DCT @ grey @ _DCT.T).ravel()
    return np.packbits(coefficients > np.median(coefficients[1:])).tobytes()


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


def decode_checked(data: bytes, size: int) -> np.ndarray:
    """:func:`decode_rgb` for bytes from outside (a file to predict, a served request): a
    BadImageError says what is wrong, in :func:`inspect_bytes`' words: not an image, corrupt or
    truncated, or too large (a decompression bomb is refused from its header, never decoded)."""
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_rgb(data, size)
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"corrupt or truncated image: {err}") from None


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


# Written by the download stage into data/raw: [["<class>/<file>", ...], ...], read by split.
NEAR_DUPLICATES_FILE = "near_duplicates.json"
MAX_NEAR_DUPLICATE_BITS = HASH_BITS // 2  # beyond this, hashes are no more alike than unrelated photos
_BLOCK_ELEMENTS = 2**22  # entries of the distance matrix computed at once: 16 MiB of float32


def close_pairs(vectors: np.ndarray, min_dot: float) -> Iterator[tuple[int, int, float]]:
    """Every pair ``(i, j, dot)``, ``i < j``, of rows of ``vectors`` whose dot product is at least
    ``min_dot``, one block of rows against the rest at a time (one matrix product each; the memory
    of one block of at most 16 MiB, never the N x N matrix)."""
    block = max(64, _BLOCK_ELEMENTS // max(len(vectors), 1))
    for start in range(0, len(vectors), block):
        dots = vectors[start:start + block] @ vectors[start:].T  # each pair once: columns from `start`
        for r, c in zip(*np.nonzero(dots >= min_dot)):
            if r < c:
                yield int(start + r), int(start + c), float(dots[r, c])


def near_duplicate_groups(hashes: Sequence[bytes], max_bits: int) -> list[list[int]]:
    """Indices of images whose perceptual hashes differ in at most ``max_bits`` bits, joined
    transitively; groups of two or more, each sorted. 0 finds nothing.

    Hashes as vectors of +-1: the Hamming distance of two is (256 - their dot product) / 2, so
    a block of rows against all the others is one matrix product (about a second for 10,000
    images on 2 cores, and the memory of one block: :func:`close_pairs`)."""
    if max_bits <= 0 or len(hashes) < 2:
        return []
    if max_bits > MAX_NEAR_DUPLICATE_BITS:
        raise ValueError(f"max_bits must be <= {MAX_NEAR_DUPLICATE_BITS}, got {max_bits}")
    packed = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), -1)
    # equal hashes (blank or uniform images can share one) are one node: compare distinct ones
    distinct, node_of = np.unique(packed, axis=0, return_inverse=True)
    signs = np.unpackbits(distinct, axis=1).astype(np.float32) * 2 - 1
    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in close_pairs(signs, signs.shape[1] - 2 * max_bits - 0.5):
        parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i, node in enumerate(np.ravel(node_of)):
        groups.setdefault(find(int(node)), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)
