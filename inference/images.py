"""Reading uploaded photos safely: any Pillow format to upright 8-bit RGB, with clear errors and a pixel limit."""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.exceptions import ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 50_000_000


@dataclass
class LoadedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, upright
    format: str  # what Pillow recognised: JPEG, PNG, ...
    mode: str  # the mode before conversion: RGB, L, P, CMYK, I;16, ...
    exif_transposed: bool
    frames: int

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale to 8-bit by its real range 0..65535, not by clipping at 255."""
    array = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_8(image).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8)).convert("RGB")
    if mode == "P":
        # A palette with transparency expands to RGBA first; the alpha is then dropped like any other.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La"):
        return image.convert("L").convert("RGB")
    # RGBA/RGBa drop alpha; CMYK, YCbCr, LAB, HSV and 1-bit convert through Pillow's own matrices.
    return image.convert("RGB")


def image_open(source: bytes | bytearray | Path | str | BinaryIO, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode a photo to upright RGB uint8; ImageError (400) or ImageTooLargeError (413) with a clear message."""
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the file is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
        stream: BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such file", extra={"field": "image", "kind": "missing"})
        if path.stat().st_size == 0:
            raise ImageError(f"{path.name} is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
        stream = open(path, "rb")
    else:
        stream = source
        start = stream.tell() if stream.seekable() else 0
        if stream.read(1) == b"":
            raise ImageError("the file is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
        stream.seek(start)

    try:
        with warnings.catch_warnings():
            # Our limit is checked below; Pillow's own (higher) one only raises DecompressionBombError,
            # caught below, and its warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width * height > limit:
                raise ImageTooLargeError(
                    f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
                    f"{limit / 1e6:.0f} megapixels",
                    extra={"field": "image", "kind": "too_many_pixels", "width": width, "height": height},
                )
            if width < 1 or height < 1:
                raise ImageError("the image has no pixels", extra={"field": "image", "kind": "empty"})
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1:
                image.seek(0)  # an animation: its first frame is the photo
            mode = image.mode
            image.load()
            transposed = _has_rotation(image)
            upright = ImageOps.exif_transpose(image)
            rgb = np.array(_to_rgb(upright), dtype=np.uint8)  # writable: torch refuses read-only arrays
            image_format = image.format or ""
    except (ImageError, ImageTooLargeError):
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image: the file is not a format Pillow can read (JPEG, PNG, WebP, TIFF, ...)",
                         extra={"field": "image", "kind": "not_an_image"}) from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses before we can read the size ourselves; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)) / 1e6:.0f} megapixels)" if found else ""
        raise ImageTooLargeError(f"the image{size} is over the limit of {limit / 1e6:.0f} megapixels",
                                 extra={"field": "image", "kind": "too_many_pixels"}) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken" in text else "damaged"
        raise ImageError(f"the image is {'truncated' if kind == 'truncated' else 'damaged'} and cannot be decoded "
                         f"({text})", extra={"field": "image", "kind": kind}) from None
    finally:
        if isinstance(source, (str, Path)):
            stream.close()
    if rgb.ndim != 3 or rgb.shape[2] != 3:  # pragma: no cover - _to_rgb always yields 3 channels
        raise ImageError(f"unsupported image layout {rgb.shape}", extra={"field": "image"})
    return LoadedImage(rgb=np.ascontiguousarray(rgb), format=image_format, mode=mode,
                       exif_transposed=bool(transposed), frames=frames)


def _has_rotation(image: Image.Image) -> bool:
    try:
        return int(image.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # damaged EXIF is not worth failing a photo for
        return False
