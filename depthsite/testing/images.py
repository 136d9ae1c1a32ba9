"""Real image files for job tests: a photo-like picture in many encodings, and the classic bad uploads."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo_array(width: int = 96, height: int = 72) -> np.ndarray:
    """A smooth scene with a bright disc 'near' the camera: something a network can chew on."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    sky = np.stack([90 + 80 * y / height, 140 + 60 * y / height, 220 - 40 * y / height], axis=-1)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.6) ** 2) < (min(width, height) * 0.25) ** 2
    sky[disc] = (230, 120, 40)
    return np.clip(sky + (x[..., None] * 7 % 13), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def jpeg(width: int = 96, height: int = 72, **params) -> bytes:
    return encode(Image.fromarray(photo_array(width, height)), "JPEG", quality=92, **params)


def png(width: int = 96, height: int = 72) -> bytes:
    return encode(Image.fromarray(photo_array(width, height)), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 megapixels at 20000) that compresses to a few hundred KB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000))
    body += compressor.compress(row * (side % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.fromarray(photo_array(64, 48)).convert("P"),
              Image.fromarray(photo_array(64, 48)[::-1].copy()).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(photo_array(80, 60)).convert("CMYK"), "JPEG", quality=90)


def png_16bit() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def rgba_png() -> bytes:
    rgba = np.dstack([photo_array(64, 48), np.full((48, 64), 128, np.uint8)])
    return encode(Image.fromarray(rgba, mode="RGBA"), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 96x72, EXIF orientation 6: shown (and estimated) upright as 72x96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo_array(96, 72)), "JPEG", quality=92, exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    data = jpeg(160, 120)
    return data[: len(data) // 2]


# name -> (file name, bytes, expected): "ok" with the upright (width, height), or the HTTP status of the refusal.
def bad_uploads() -> dict[str, tuple[str, bytes, object]]:
    return {
        "text_named_jpg": ("holiday.jpg", b"this is not a photo, just text\n" * 20, 400),
        "truncated_jpeg": ("cut.jpg", truncated_jpeg(), 400),
        "zero_bytes": ("empty.jpg", b"", 400),
        "png_bomb_20000": ("bomb.png", png_bomb(), 413),
        "animated_gif": ("anim.gif", animated_gif(), ("ok", 64, 48)),
        "cmyk_jpeg": ("cmyk.jpg", cmyk_jpeg(), ("ok", 80, 60)),
        "png_16bit": ("deep.png", png_16bit(), ("ok", 64, 48)),
        "rgba_png": ("alpha.png", rgba_png(), ("ok", 64, 48)),
        "exif_rotated_jpeg": ("rotated.jpg", exif_rotated_jpeg(), ("ok", 72, 96)),
    }
