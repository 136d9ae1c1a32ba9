"""The web process's work per upload: accepted formats only, the size from the header before any decode, and
peak extra memory within a small multiple of the decoded 8-bit RGB size (measured, and printed)."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.exceptions import ImageError, ImageTooLargeError
from inference.images import ACCEPTED_FORMATS, image_check, image_open
from depthsite.testing import images

ROOT = Path(__file__).resolve().parents[2]
MEGAPIXELS_5 = (2560, 1960)
# Extra peak memory of the web process's check, as a multiple of the photo's decoded 8-bit RGB size.
MAX_RSS_MULTIPLE = 1.5
# Python-side allocations (numpy arrays, bytes): the web process makes no pixel copies at all.
MAX_TRACED_MULTIPLE = 0.05

# Run in a fresh process: resets the resident high-water mark, then checks one file and reports what it cost.
MEASURE = r"""
import json, resource, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
from inference import images

data = open(sys.argv[2], "rb").read()
check = getattr(images, sys.argv[3])

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

check(data)  # once, so that lazily imported plugins and codecs count as the baseline
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the kernel resets VmHWM to the current resident size
before = rss_kb()
tracemalloc.start()
result = check(data)
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss_extra": (hwm_kb() - before) * 1024, "traced_peak": traced}))
"""


def measure(path: Path, function: str = "image_check") -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(path), function],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def five_megapixel_photos() -> dict[str, bytes]:
    width, height = MEGAPIXELS_5
    ramp = np.linspace(0, 65535, width * height, dtype=np.float64).reshape(height, width).astype(np.uint16)
    rgb = images.photo_array(width, height)
    rgba = np.dstack([rgb, np.full((height, width), 200, np.uint8)])
    return {
        "png 16-bit grey": encode(Image.fromarray(ramp), "PNG", compress_level=1),
        "jpeg rgb": encode(Image.fromarray(rgb), "JPEG", quality=90),
        "jpeg progressive": encode(Image.fromarray(rgb), "JPEG", quality=90, progressive=True),
        "png rgba": encode(Image.fromarray(rgba), "PNG", compress_level=1),
        "tiff cmyk": encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
        "webp": encode(Image.fromarray(rgb), "WEBP", quality=80),
    }


@pytest.mark.slow
def test_peak_memory_of_the_web_check_is_a_small_multiple_of_the_rgb_size(tmp_path):
    width, height = MEGAPIXELS_5
    rgb_bytes = width * height * 3
    figures = []
    for name, data in five_megapixel_photos().items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(data)
        info = image_check(data)
        assert (info.width, info.height) == (width, height)
        measured = measure(path)
        figures.append((name, len(data), measured["rss_extra"] / rgb_bytes, measured["traced_peak"] / rgb_bytes))
    print(f"\nweb-process check of a {width}x{height} photo (8-bit RGB = {rgb_bytes / 1e6:.1f} MB):")
    for name, size, rss, traced in figures:
        print(f"  {name:18s} {size / 1e3:8.0f} KB file: peak extra RSS {rss:.2f} x RGB, "
              f"Python/numpy {traced:.3f} x RGB")
    for name, _, rss, traced in figures:
        assert rss <= MAX_RSS_MULTIPLE, f"{name}: {rss:.2f} x the RGB size"
        assert traced <= MAX_TRACED_MULTIPLE, f"{name}: {traced:.3f} x the RGB size in Python objects"


@pytest.mark.slow
def test_the_worker_converts_16_bit_without_float64_copies(tmp_path):
    width, height = MEGAPIXELS_5
    path = tmp_path / "deep.png"
    path.write_bytes(five_megapixel_photos()["png 16-bit grey"])
    measured = measure(path, "image_open")
    rgb_bytes = width * height * 3
    print(f"\nworker conversion of a 16-bit {width}x{height} PNG: Python/numpy peak "
          f"{measured['traced_peak'] / rgb_bytes:.2f} x RGB, RSS {measured['rss_extra'] / rgb_bytes:.2f} x RGB")
    # The RGB array it returns and one band at a time: a float64 copy alone would be 2.7 x.
    assert measured["traced_peak"] <= 1.4 * rgb_bytes


def ico_with_png(png: bytes) -> bytes:
    """An .ico whose one entry says 256x256 but embeds the given PNG (Pillow decodes it while opening)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


@pytest.mark.parametrize("check", [image_check, image_open])
def test_an_ico_embedding_a_bomb_is_refused_before_any_decode(check, monkeypatch):
    from PIL import IcoImagePlugin

    bomb = ico_with_png(images.png_bomb(20000))

    def never(*args, **kwargs):
        raise AssertionError("the ICO reader ran")

    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", never)
    with pytest.raises(ImageError) as caught:
        check(bomb)
    assert caught.value.extra["kind"] == "not_an_image" and "JPEG, PNG, WebP, GIF, BMP or TIFF" in caught.value.message


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_outside_the_list_are_refused(fmt):
    data = encode(Image.fromarray(images.photo_array(32, 24)), fmt)
    with pytest.raises(ImageError) as caught:
        image_check(data)
    assert caught.value.extra["kind"] == "not_an_image" and caught.value.extra["accepted"] == list(ACCEPTED_FORMATS)


@pytest.mark.parametrize("fmt, params", [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
                                         ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})])
def test_every_accepted_format_passes_the_check_and_converts(fmt, params):
    data = encode(Image.fromarray(images.photo_array(40, 30)), fmt, **params)
    info = image_check(data)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    assert image_open(data).rgb.shape == (30, 40, 3)


def test_the_pixel_limit_is_checked_on_the_header_before_decoding(monkeypatch):
    data = images.png_bomb(20000)

    def never(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", never)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", never)
    with pytest.raises(ImageTooLargeError) as caught:
        image_check(data, max_pixels=50_000_000)
    assert caught.value.extra["kind"] == "too_many_pixels"


def test_the_upright_size_comes_from_the_exif_header():
    info = image_check(images.exif_rotated_jpeg())
    assert (info.width, info.height) == (72, 96)


def test_sixteen_bit_rounding_matches_the_real_range():
    values = np.array([[0, 128, 129, 257, 385, 386, 65535]], dtype=np.uint16)
    loaded = image_open(encode(Image.fromarray(values), "PNG"))
    assert loaded.rgb[0, :, 0].tolist() == [0, 0, 1, 1, 1, 2, 255]
