"""Safe decoding of any image file to a fully loaded RGB ``PIL.Image``.

Datasets in the wild hold 16-bit scans, palette GIFs, CMYK JPEGs, rotated phone photos and the odd
corrupt or hostile file. Everything downstream wants plain 8-bit RGB, and a bad file must become a
short, human reason (an :class:`UnreadableImage`) rather than a crash or a silently wrong tensor.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.data.boxes import Box, crop_to
from transferkit.data.members import is_shard_member, member_exists, read_member
from transferkit.errors import UnreadableImage

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".heic", ".heif", ".avif"}
)
"""Suffixes (lowercase, with the dot) treated as images when scanning folders."""

MAX_PIXELS = 89_478_485
"""Default pixel limit: Pillow's own decompression-bomb threshold."""
# Pillow warns from that many pixels on; _check_pixels refuses those images with a reason of its own, so the
# warning would only repeat it (with a traceback-like line) on the console
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_WHITE = (255, 255, 255)

# Decoders for exactly the listed extensions. Sniffing stays on (a PNG named .jpg is fine) but exotic
# plugins never see dataset files: EPS, for one, would hand them to Ghostscript.
_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "HEIF", "AVIF")
# ISO base media files whose brand (bytes 8-12) is HEIF: iPhones' photos. AVIF is Pillow's own.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

# What Pillow raises on damaged data besides OSError: broken chunks, bad headers, bad EXIF.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# Modes whose samples are wider than 8 bits and need rescaling, not clipping.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes with an alpha band (not LAB, whose "A" is a colour axis).
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# Standard full-scale values used to guess the range of 32-bit int / float images.
_NOMINAL_RANGES = (255.0, 65535.0)


def has_image_extension(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with a known image suffix (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Decode ``path`` into an independent, fully loaded 8-bit RGB image.

    The pixel count is checked from the header before any pixel data is decoded, EXIF orientation is
    applied, and the whole file is decoded here so truncation fails now rather than mid-training.
    Pillow's own hard limit (twice ``Image.MAX_IMAGE_PIXELS``) still applies above ``max_pixels``.
    With ``reduce_to``, a JPEG is decoded at the smallest of its scales 1, 1/2, 1/4, 1/8 that keeps both
    sides at least ``reduce_to`` pixels (what a consumer resizing to that short side needs).
    Raises :class:`UnreadableImage` with a short reason for anything unusable.
    """
    try:
        with open_image_file(path) as fh:
            size = fh.getbuffer().nbytes if isinstance(fh, io.BytesIO) else os.fstat(fh.fileno()).st_size
            return _decode(fh, size, max_pixels, reduce_to)
    except OSError as exc:  # _decode maps decoding errors itself; what is left is the OS refusing
        raise UnreadableImage(f"cannot read: {exc.strerror or exc}") from exc


def open_image_file(path: str | os.PathLike[str]) -> BinaryIO:
    """The one way sample paths are opened: a plain file, or a packed dataset's member reference
    (`SHARD.tar::MEMBER`, see `transferkit.data.members`) as its bytes in memory."""
    if is_shard_member(path):
        return io.BytesIO(read_member(path))
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def image_file_exists(path: str | os.PathLike[str]) -> bool:
    """os.path.isfile for sample paths, shard members included."""
    return member_exists(path) if is_shard_member(path) else os.path.isfile(path)


def decode_rgb(data: bytes | bytearray, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """:func:`load_rgb` for bytes already in memory (an upload): the same checks, the same reasons."""
    return _decode(io.BytesIO(data), len(data), max_pixels, reduce_to)


def _decode(fh: BinaryIO, size: int, max_pixels: int, reduce_to: int | None) -> Image.Image:
    """Decode an open file of `size` bytes; map every Pillow failure to one short reason."""
    if size == 0:
        raise UnreadableImage("empty file")
    head = fh.read(12)
    fh.seek(0)
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        register_heif()
    try:
        with Image.open(fh, formats=_openable_formats()) as im:
            _check_pixels(im.size, max_pixels)
            if reduce_to:  # libjpeg's scaled decoding: a 12-megapixel photo ~6x faster; other formats ignore it
                im.draft(im.mode, (reduce_to, reduce_to))
            im.load()
            oriented = ImageOps.exif_transpose(im)  # a new image, detached from ``fh``
        return to_rgb(oriented)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large: exceeds limit {_effective_limit(max_pixels)} pixels") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("not an image") from exc
    except MemoryError as exc:
        raise UnreadableImage("too large: out of memory while decoding") from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImage("truncated or corrupt") from exc


def _openable_formats() -> list[str]:
    """_FORMATS this Pillow can open now (AVIF: Pillow 11.2 and later; HEIF: once pillow-heif is registered)."""
    Image.init()
    return [name for name in _FORMATS if name in Image.OPEN]


@functools.cache
def register_heif() -> None:
    """Pillow reads HEIC through pillow-heif's plugin (decision 0296): registered for the first such file only (its
    import costs ~30 ms), or by a reader that must know the format beforehand (fetch)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse decompression bombs from the header alone, before allocating pixel memory."""
    width, height = size
    if width * height > max_pixels:
        raise UnreadableImage(f"too large: {width}×{height} pixels exceeds limit {max_pixels}")


def _effective_limit(max_pixels: int) -> int:
    """The limit that actually refused an image when Pillow's hard bomb check fired first."""
    if Image.MAX_IMAGE_PIXELS is None:
        return max_pixels
    return min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB.

    Wide modes are rescaled by their range, anything with transparency is composited on white (so a
    transparent background does not turn black), and the rest uses Pillow's own conversion.
    """
    if im.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if _has_transparency(im):
        return _composite_on_white(im)
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise UnreadableImage(f"unsupported color mode {im.mode}") from exc


def _has_transparency(im: Image.Image) -> bool:
    """True for alpha bands (LA, RGBA, PA, ...) and for palette / colour-key transparency."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Flatten transparency onto a white background."""
    try:
        rgba = im.convert("RGBA")
    except ValueError as exc:
        raise UnreadableImage(f"unsupported color mode {im.mode}") from exc
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _wide_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float samples to 0..255 without clipping highlights.

    16-bit data is divided by 257 (65535 → 255). For 32-bit int and float images the full scale is
    the smallest standard range holding the data (1.0 for floats, then 255, then 65535), else the
    image's own maximum; negative values shift the range down instead of being clipped.
    """
    data = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low = min(float(data.min()), 0.0) if data.size else 0.0
    high = 65535.0 if mode.startswith("I;16") else _full_scale(data, floating=mode == "F")
    scaled = (data - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _full_scale(data: np.ndarray, floating: bool) -> float:
    """The nominal maximum of a 32-bit image: first standard range that contains its data."""
    peak = float(data.max()) if data.size else 0.0
    candidates = ((1.0,) if floating else ()) + _NOMINAL_RANGES
    return next((c for c in candidates if peak <= c), peak)


def load_image(path: str, region: Box | None = None, reduce_to: int | None = None) -> Image.Image:
    """The decoded image, cropped to `region` when it has one: what every consumer of a dataset image sees.
    `reduce_to`: see load_rgb (see scale_for with a region)."""
    return crop_to(load_rgb(path, reduce_to=scale_for(region, reduce_to)), region)


def decode_image(data: bytes, region: Box | None = None, reduce_to: int | None = None) -> Image.Image:
    """load_image for an image's bytes (a packed shard's member)."""
    return crop_to(decode_rgb(data, reduce_to=scale_for(region, reduce_to)), region)


def scale_for(region: Box | None, reduce_to: int | None) -> int | None:
    """load_rgb's `reduce_to` for an image read for `region`: none with one, whose coordinates are the full image's."""
    return None if region else reduce_to


VALIDATION_SCALE = 1  # reduce_to when an image is only checked: libjpeg still reads (and checks) all of its data
