"""load_rgb: every mode becomes correct 8-bit RGB, bad or hostile files become a short UnreadableImage reason."""

from __future__ import annotations

import inspect
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageFile

from transferkit.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, decode_rgb, has_image_extension, load_rgb, to_rgb
from transferkit.data.sources import scan_dataset
from transferkit.errors import UnreadableImage, UserError

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def _saved(tmp_path: Path, im: Image.Image, name: str = "img.png", **params) -> Path:
    path = tmp_path / name
    if path.suffix.lower() in (".heic", ".heif"):  # without registering pillow-heif's plugin: transferkit must
        pillow_heif.from_pillow(im.convert("RGB")).save(path, **params)
    else:
        im.save(path, **params)
    return path


def _reason(path: Path, **kw) -> str:
    with pytest.raises(UnreadableImage) as info:
        load_rgb(path, **kw)
    assert isinstance(info.value, UserError)
    return str(info.value)


def _mode_on_disk(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def _png_with_header(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width × height pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_rgb_image_is_fully_loaded_and_independent_of_the_file(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    path = _saved(tmp_path, Image.fromarray(arr))
    im = load_rgb(path)
    path.unlink()  # the pixels must already be in memory
    assert im.mode == "RGB" and im.size == (40, 48)
    assert getattr(im, "fp", None) is None
    np.testing.assert_array_equal(np.asarray(im), arr)


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_decodes(tmp_path: Path, ext: str) -> None:
    mode = "L" if ext == ".pgm" else "RGB"
    im = load_rgb(_saved(tmp_path, Image.new(mode, (33, 17), 200), f"img{ext}"))
    assert im.mode == "RGB" and im.size == (33, 17)
    assert abs(im.getpixel((5, 5))[0] - 200) <= 3  # lossy formats are close, not exact


def test_extension_check_is_case_insensitive() -> None:
    assert has_image_extension("a/B.JPG") and has_image_extension("x.Tiff")
    assert not has_image_extension("notes.txt") and not has_image_extension("jpg")


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    assert load_rgb(_saved(tmp_path, Image.new("L", (32, 32), 100))).getpixel((3, 3)) == (100, 100, 100)


def test_one_bit_becomes_black_and_white(tmp_path: Path) -> None:
    im = Image.new("1", (32, 32), 0)
    im.putpixel((1, 1), 1)
    out = load_rgb(_saved(tmp_path, im))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == WHITE and out.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(tmp_path: Path, mode: str) -> None:
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black must come out white
    im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black is mid grey
    out = load_rgb(_saved(tmp_path, im.convert(mode)))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    assert out.getpixel((5, 5)) == (RED if mode == "RGBA" else (76, 76, 76))  # L of pure red is 76


@pytest.mark.parametrize("name", ["pal.png", "pal.gif"])
def test_palette_transparency_is_white(tmp_path: Path, name: str) -> None:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0] + list(BLUE) + [0, 0, 0] * 254)
    im.putpixel((0, 0), 0)
    path = _saved(tmp_path, im, name, transparency=0)
    assert _mode_on_disk(path) == "P"
    out = load_rgb(path)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE and out.getpixel((9, 9)) == BLUE


def test_palette_with_alpha_band_is_composited() -> None:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0] + list(BLUE) + [0, 0, 0] * 254)
    pa = im.convert("PA")
    pa.putpixel((0, 0), (1, 0))
    out = to_rgb(pa)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((2, 2)) == BLUE


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16).repeat(32, axis=0)
    path = _saved(tmp_path, Image.fromarray(values))
    assert _mode_on_disk(path).startswith("I")  # a genuine 16-bit file
    out = np.asarray(load_rgb(path))
    assert out.shape == (32, 5, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 4, 128, 255])  # v / 257, rounded
    assert (out[..., 0] == out[..., 2]).all()


def _first_channel(im: Image.Image) -> list[int]:
    return np.asarray(im)[..., 0].ravel().tolist()


def test_thirty_two_bit_int_and_float_use_their_range() -> None:
    as_int = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32))
    assert as_int.mode == "I"
    assert _first_channel(to_rgb(as_int)) == [0, 128, 255]  # 8-bit data in an int image stays put
    wide_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert _first_channel(to_rgb(wide_int)) == [0, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert as_float.mode == "F"
    assert _first_channel(to_rgb(as_float)) == [0, 128, 255]


def test_cmyk_is_converted(tmp_path: Path) -> None:
    im = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    im.putpixel((0, 0), (0, 0, 0, 0))
    out = load_rgb(_saved(tmp_path, im, "cmyk.tif"))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == RED and out.getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("name", ["rot.png", "rot.jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, name: str) -> None:
    im = Image.new("RGB", (64, 32), BLUE)
    im.paste(RED, (0, 0, 16, 16))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = load_rgb(_saved(tmp_path, im, name, exif=exif.tobytes()))
    assert out.size == (32, 64)
    r, g, b = out.getpixel((32 - 8, 8))  # top-left went to the top-right
    assert r > 200 and b < 60
    r, g, b = out.getpixel((8, 8))
    assert b > 200 and r < 60


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path: Path, fmt: str) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _saved(tmp_path, Image.fromarray(arr), f"full.{fmt.lower()}")
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert _reason(cut) == "truncated or corrupt"


def test_truncation_is_not_papered_over_globally(tmp_path: Path) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").touch()
    assert _reason(tmp_path / "empty.jpg") == "empty file"


def test_text_file_with_an_image_name(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_text("this is not a JPEG\n")
    assert _reason(tmp_path / "fake.jpg") == "not an image"


def test_only_the_listed_formats_are_decoded(tmp_path: Path) -> None:
    png_named_jpg = _saved(tmp_path, Image.new("RGB", (32, 32), RED), "really_png.jpg", format="PNG")
    assert load_rgb(png_named_jpg).getpixel((0, 0)) == RED  # content decides the decoder, not the name
    (tmp_path / "script.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    assert _reason(tmp_path / "script.png") == "not an image"  # never handed to Ghostscript


def test_missing_file_and_directory_cannot_be_read(tmp_path: Path) -> None:
    assert _reason(tmp_path / "missing.png").startswith("cannot read: ")
    (tmp_path / "dir.png").mkdir()
    assert _reason(tmp_path / "dir.png").startswith("cannot read: ")


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path, Image.new("RGB", (64, 48)))

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert _reason(path, max_pixels=1000) == "too large: 64×48 pixels exceeds limit 1000"


def test_default_limit_is_pillows() -> None:
    assert MAX_PIXELS == 89_478_485
    assert inspect.signature(load_rgb).parameters["max_pixels"].default == MAX_PIXELS


def test_crafted_header_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(9_500, 9_500))  # 90 M pixels: just over the default, 270 MB if decoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # pytest shows every warning; see below
        assert _reason(path) == f"too large: 9500×9500 pixels exceeds limit {MAX_PIXELS}"
    # as a command runs it (Python's own warning filters): the reason is the one message, no Pillow warning
    code = (f"from transferkit.data.images import UnreadableImage, load_rgb\n"
            f"try:\n    load_rgb({str(path)!r})\nexcept UnreadableImage:\n    pass")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "DecompressionBombWarning" not in done.stderr, done.stderr


def test_crafted_header_far_over_pillows_hard_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))  # 30 GB if anything tried to decode it
    assert _reason(path).startswith("too large: ")
    assert _reason(path, max_pixels=10**12).startswith("too large: ")  # Pillow's own ceiling still holds


def test_bytes_in_memory_decode_like_files(tmp_path: Path) -> None:
    """decode_rgb (server uploads) gives the pixels and the refusal reasons load_rgb gives for the same bytes."""
    im = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    good = _saved(tmp_path, im, "good.png", exif=exif.tobytes())
    assert np.array_equal(np.asarray(decode_rgb(good.read_bytes())), np.asarray(load_rgb(good)))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_header(9_500, 9_500))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    (tmp_path / "empty.png").touch()
    for path in (bomb, cut, tmp_path / "empty.png"):
        with pytest.raises(UnreadableImage) as info:
            decode_rgb(path.read_bytes(), max_pixels=1_000_000)
        assert str(info.value) == _reason(path, max_pixels=1_000_000)


def test_iphone_heic_and_avif_photos_decode_and_are_found_like_any_other(tmp_path: Path) -> None:
    """HEIC (iPhones' format, through pillow-heif) and AVIF (Pillow's own) are dataset images (decision 0296)."""
    y, x = np.mgrid[0:240, 0:320]
    smooth = Image.fromarray(np.stack([x * 255 // 320, y * 255 // 240, (x + y) * 255 // 560], -1).astype(np.uint8))
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        pillow_heif.from_pillow(smooth).save(tmp_path / label / "photo.HEIC", quality=95)
        smooth.save(tmp_path / label / "photo.avif", quality=95)
    for path in sorted(tmp_path.rglob("photo.*")):
        decoded = load_rgb(path)
        assert decoded.mode == "RGB" and decoded.size == (320, 240)
        assert np.abs(np.asarray(decoded, np.float32) - np.asarray(smooth, np.float32)).mean() < 4
    index = scan_dataset(tmp_path, 0.5, 0.0, 0)
    assert not index.skipped and len(index.samples) == 4
    cut = tmp_path / "a" / "photo.HEIC"
    cut.write_bytes(cut.read_bytes()[:1000])
    assert _reason(cut) == "truncated or corrupt"
