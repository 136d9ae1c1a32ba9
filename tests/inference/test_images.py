"""Reading photos: every mode to upright RGB, EXIF orientation, and clear errors for what is not a photo."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.exceptions import ImageError, ImageTooLargeError
from inference.images import image_open


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def test_rgb_jpeg():
    loaded = image_open(encode(Image.fromarray(gradient()), "JPEG", quality=95))
    assert loaded.rgb.shape == (48, 64, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.format == "JPEG" and loaded.mode == "RGB"
    assert loaded.rgb.flags.writeable


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = image_open(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.rgb.shape == (64, 48, 3)
    assert loaded.exif_transposed
    # the left column of the stored image (red = 0) becomes the top row of the upright one
    assert loaded.rgb[0, :, 0].mean() < 20 and loaded.rgb[-1, :, 0].mean() > 235


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_modes_become_rgb(mode):
    source = Image.fromarray(gradient()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    loaded = image_open(encode(source, fmt))
    assert loaded.rgb.shape == (48, 64, 3)
    assert loaded.mode == mode


def test_rgba_drops_alpha_without_darkening():
    rgba = np.dstack([gradient(), np.zeros((48, 64), np.uint8)])  # fully transparent
    loaded = image_open(encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(loaded.rgb, gradient())


def test_sixteen_bit_png_uses_the_full_range():
    values = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    loaded = image_open(encode(Image.fromarray(values), "PNG"))
    assert loaded.mode.startswith("I")
    assert loaded.rgb[0, 0, 0] == 0 and loaded.rgb[-1, -1, 0] == 255
    assert 120 <= loaded.rgb[24, 32, 0] <= 135  # mid-grey, not clipped to white


def test_palette_with_transparency():
    image = Image.fromarray(gradient()).convert("P")
    image.info["transparency"] = 0
    loaded = image_open(encode(image, "PNG", transparency=0))
    assert loaded.rgb.shape == (48, 64, 3)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.fromarray(np.full((32, 32, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    loaded = image_open(buffer.getvalue())
    assert loaded.animated
    assert abs(int(loaded.rgb.mean()) - 10) <= 2


def test_empty_file():
    with pytest.raises(ImageError) as caught:
        image_open(b"")
    assert caught.value.extra["kind"] == "empty" and "empty" in caught.value.message


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("definitely not a JPEG")
    with pytest.raises(ImageError) as caught:
        image_open(path)
    assert caught.value.extra["kind"] == "not_an_image"
    assert caught.value.status == 400


def test_truncated_jpeg():
    data = encode(Image.fromarray(gradient(256, 256)), "JPEG", quality=95)
    with pytest.raises(ImageError) as caught:
        image_open(data[: len(data) // 2])
    assert caught.value.extra["kind"] == "truncated"


def test_decompression_bomb_is_refused_before_decoding():
    # 20000x20000 of one colour compresses to a few hundred KB but would need 1.2 GB decoded.
    image = Image.new("L", (20000, 20000), 0)
    data = encode(image, "PNG", optimize=False, compress_level=9)
    assert len(data) < 2_000_000
    with pytest.raises(ImageTooLargeError) as caught:
        image_open(data, max_pixels=50_000_000)
    assert caught.value.status == 413
    assert "400 megapixels" in caught.value.message and "limit of 50 megapixels" in caught.value.message


def test_pixel_limit_is_configurable():
    data = encode(Image.fromarray(gradient(64, 48)), "PNG")
    with pytest.raises(ImageTooLargeError):
        image_open(data, max_pixels=1000)
    assert image_open(data, max_pixels=64 * 48).width == 64
