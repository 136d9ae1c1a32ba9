"""Reading uploaded photos safely: the accepted formats to upright 8-bit RGB, with clear errors and a pixel limit.

Only the formats in ACCEPTED_FORMATS are ever handed to Pillow, and the pixel limit is checked on the size the
header declares, before any pixel is decoded: Pillow's ICO reader, for one, decodes an embedded PNG while
opening, so it is never tried. The web process only checks (`image_check`: header, then a decode that makes
no conversion or copy); the worker converts (`image_open`)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.exceptions import ImageError, ImageTooLargeError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
# The formats a photo may come in: the Pillow readers tried, in this order (a JPEG with extra frames, as some
# cameras write, comes out of the JPEG reader as "MPO").
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Formats every browser shows as they are; the worker makes a PNG preview of any other (TIFF).
BROWSER_IMAGE_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                       "WEBP": "image/webp", "BMP": "image/bmp"}
# Formats the web process only checks from their header (see image_check).
_DECODED_BY_THE_WORKER = ("WEBP",)
# What happens to transparency, said on the form, in the API docs and on the page of a job whose photo had it.
# It states what _to_rgb does: Pillow's RGBA->RGB (LA->L) conversion drops the alpha band and keeps each pixel's
# stored colour; nothing is blended onto a background.
ALPHA_NOTE = ("Transparency is dropped: an alpha channel is discarded and every pixel keeps the colour it stores, "
              "even where it is fully transparent (nothing is blended onto white or any background; transparent "
              "areas often store black); the outputs have no alpha.")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Pixels converted at a time (whole rows): temporaries stay near a MB whatever the image's size.
_BAND_PIXELS = 1 << 18


@dataclass
class LoadedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, upright
    format: str  # what Pillow recognised: JPEG, PNG, ...
    mode: str  # the mode before conversion: RGB, L, P, CMYK, I;16, ...
    exif_transposed: bool
    # Whether the file holds frames after the first (an animation, a multi-page TIFF); only the first is used.
    # Never a count: Pillow counts a TIFF's frames by reading every IFD in its chain, which one crafted file
    # makes take minutes.
    animated: bool

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _bands(image: Image.Image):
    """(top, rows as a numpy array) in bands of about _BAND_PIXELS: never a whole-image copy in a wider type."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(top + rows, height))))


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale to 8-bit by its real range 0..65535, not by clipping at 255.

    Integer arithmetic, band by band: round(v / 257) is v // 257 plus one when the remainder is past half.
    """
    out = np.empty((image.size[1], image.size[0]), dtype=np.uint8)
    for top, band in _bands(image):
        values = np.clip(band.astype(np.int32, copy=False), 0, 65535)
        quotient, remainder = np.divmod(values, 257)
        out[top:top + band.shape[0]] = quotient + (remainder >= 129)
    return Image.fromarray(out)


def _float_to_8(image: Image.Image) -> Image.Image:
    """A float32 image stretched from its own minimum to maximum, band by band in float32."""
    low, high = np.inf, -np.inf
    for _, band in _bands(image):
        finite = band[np.isfinite(band)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    out = np.zeros((image.size[1], image.size[0]), dtype=np.uint8)
    if np.isfinite(low) and high > low:
        scale = np.float32(255.0 / (high - low))
        for top, band in _bands(image):
            scaled = np.nan_to_num((band.astype(np.float32, copy=False) - np.float32(low)) * scale)
            out[top:top + band.shape[0]] = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_8(image).convert("RGB")
    if mode == "F":
        return _float_to_8(image).convert("RGB")
    if mode == "P":
        # A palette with transparency expands to RGBA first; the alpha is then dropped like any other.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La"):
        return image.convert("L").convert("RGB")
    # RGBA/RGBa drop alpha; CMYK, YCbCr, LAB, HSV and 1-bit convert through Pillow's own matrices.
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageInfo:
    """What the web process learns of an upload: its format and upright size, proven decodable."""

    format: str
    mode: str
    width: int  # upright
    height: int
    alpha: bool = False  # transparency, which image_open drops (ALPHA_NOTE); read from the header


# A JPEG's decoding work grows with its scans, not its bytes: libjpeg walks every block of the image once per
# progressive scan, and a scan can be 75 bytes, so one small file of many scans held a web worker for minutes (at
# 49 megapixels, 30 ms a scan). Encoders write up to about a dozen (libjpeg's default progression 10, mozjpeg's
# 10-14); past MAX_JPEG_SCANS the file is refused before Pillow sees it. Markers before and between the scans
# (tables, APPn, comments) are read by Pillow one by one in Python, so they are bounded too.
MAX_JPEG_SCANS = 40
MAX_JPEG_SEGMENTS = 1000
# Bytes between markers before the first scan (fill 0xFF runs, junk a decoder skips): Pillow steps over them one by
# one in Python, so 2 MB of fill cost it 1.8 s.
MAX_JPEG_HEADER_JUNK = 64 * 1024
# The next marker, found as libjpeg finds it: skip anything, then a run of 0xFF, then the marker's byte (not 0x00,
# which stuffs a data byte, and not 0xFF, which is more fill). A walk that stopped at the first unexpected byte
# instead would pass a file whose scans follow one junk byte, which Pillow and libjpeg skip with a warning.
_MARKER = re.compile(rb"\xff+([^\x00\xff])")


def _jpeg_work_check(stream: BinaryIO) -> None:
    """ImageError when a JPEG holds more scans or marker segments than a photo needs; other data passes untouched.

    Reads the file once (a memory map where it has a file descriptor), never decodes, and leaves the stream
    where it was. Damage is not judged here: wherever the walk cannot go on, Pillow reports it."""
    start = stream.tell()
    if stream.read(3) != b"\xff\xd8\xff":
        stream.seek(start)
        return
    stream.seek(start)
    try:
        data = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        position = start
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        data = stream.read()
        stream.seek(start)
        position = 0
    try:
        _jpeg_walk(data, position + 2)
    finally:
        if not isinstance(data, bytes):
            data.close()


def _jpeg_walk(data, position: int) -> None:
    header = True  # before the first scan: what Pillow reads itself, in Python
    scans = segments = junk = 0
    while True:
        found = _MARKER.search(data, position)
        if found is None:
            return
        marker = data[found.start(1)]
        if header:
            junk += found.start(1) - 1 - position  # what lay between the last segment and this marker's 0xFF
            if junk > MAX_JPEG_HEADER_JUNK:
                raise ImageError(f"the JPEG's header holds more than {MAX_JPEG_HEADER_JUNK // 1024} kB of filler "
                                 "between its markers; save it again from an image editor",
                                 extra={"field": "image", "kind": "too_much_filler",
                                        "limit": MAX_JPEG_HEADER_JUNK})
        position = found.end()
        if marker == 0xD9 and not header:  # end of image
            return
        # No length follows these. Pillow's header loop steps over a stray start or end of image too and reads on,
        # so there they are counted like any other segment, and the walk goes on.
        standalone = 0xD0 <= marker <= 0xD9 or marker == 0x01
        if standalone and not header:
            continue  # restart markers inside a scan's data: libjpeg's, read in C
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageError(f"the JPEG holds more than {MAX_JPEG_SEGMENTS} marker segments, far more than a "
                             f"photo has; save it again from an image editor",
                             extra={"field": "image", "kind": "too_many_segments", "limit": MAX_JPEG_SEGMENTS})
        if standalone:
            continue
        if position + 2 > len(data):
            return
        position += (data[position] << 8) | data[position + 1]  # the length counts its own two bytes
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            header = False
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageError(f"the JPEG has more than {MAX_JPEG_SCANS} progressive scans (photos have about "
                                 f"10), each of which decodes the whole image again; save it again from an "
                                 f"image editor", extra={"field": "image", "kind": "too_many_scans",
                                                         "limit": MAX_JPEG_SCANS})


def _stream(source: bytes | bytearray | Path | str | BinaryIO) -> BinaryIO:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the file is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
        return io.BytesIO(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        # No path in the message: a job's error is shown to whoever holds its id (callers name the file).
        if not path.is_file():
            raise ImageError("the file is missing", extra={"field": "image", "kind": "missing"})
        if path.stat().st_size == 0:
            raise ImageError("the file is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
        return open(path, "rb")
    start = source.tell() if source.seekable() else 0
    if source.read(1) == b"":
        raise ImageError("the file is empty (0 bytes)", extra={"field": "image", "kind": "empty"})
    source.seek(start)
    return source


@contextlib.contextmanager
def _opened(source, limit: int):
    """Pillow's image of an accepted format whose declared size is within the limit; nothing decoded yet.

    Every Pillow failure inside the block becomes an ImageError with a kind."""
    stream = _stream(source)
    try:
        _jpeg_work_check(stream)
        with warnings.catch_warnings():
            # Our limit is checked below; Pillow's own (higher) one only raises DecompressionBombError,
            # caught below, and its warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > limit:
                raise ImageTooLargeError(
                    f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
                    f"{limit / 1e6:.0f} megapixels",
                    extra={"field": "image", "kind": "too_many_pixels", "width": width, "height": height},
                )
            if width < 1 or height < 1:
                raise ImageError("the image has no pixels", extra={"field": "image", "kind": "empty"})
            yield image
    except (ImageError, ImageTooLargeError):
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image in an accepted format: photos must be {ACCEPTED_FORMATS_TEXT}",
                         extra={"field": "image", "kind": "not_an_image",
                                "accepted": list(ACCEPTED_FORMATS)}) from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses before we can read the size ourselves; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)) / 1e6:.0f} megapixels)" if found else ""
        raise ImageTooLargeError(f"the image{size} is over the limit of {limit / 1e6:.0f} megapixels",
                                 extra={"field": "image", "kind": "too_many_pixels"}) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # The decoder's own text stays in the log: an OSError may name the file it read (a server path, in a
        # worker) and its errno; the uploader learns what it means for the photo.
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken" in text else "damaged"
        logger.info("an image could not be decoded (%s, %s): %s", kind, type(exc).__name__, text)
        raise ImageError(f"the image is {kind} and cannot be decoded", extra={"field": "image", "kind": kind}) from None
    finally:
        if isinstance(source, (str, Path)):
            stream.close()


def image_check(source: bytes | bytearray | Path | str | BinaryIO, *, max_pixels: int | None = None) -> ImageInfo:
    """The web process's check of an upload: format and size from the header, then a decode that proves the
    data readable without converting or copying pixels.

    A JPEG is decoded at 1/8 scale (libjpeg still reads and checks every coefficient); PNG, GIF, BMP and TIFF
    in their own mode (at most 4 bytes a pixel). WebP is only checked from its header here: Pillow's WebP
    decoder holds three full RGBA copies, so its data is proven by the worker, which fails the job clearly.
    """
    with _opened(source, max_pixels or DEFAULT_MAX_PIXELS) as image:
        width, height = image.size
        mode = image.mode
        image_format = image.format or ""
        rotated = _orientation(image) in (5, 6, 7, 8)
        alpha = _has_alpha(image)
        if image_format in ("JPEG", "MPO"):
            image.draft(None, (max(1, width // 8), max(1, height // 8)))
        if image_format not in _DECODED_BY_THE_WORKER:
            image.load()
    return ImageInfo(format=image_format, mode=mode, width=height if rotated else width,
                     height=width if rotated else height, alpha=alpha)


def image_open(source: bytes | bytearray | Path | str | BinaryIO, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode a photo to upright RGB uint8; ImageError (400) or ImageTooLargeError (413) with a clear message.

    Of a file with several frames, the first is the photo: Pillow opens it there, and nothing here walks the
    frames after it (`is_animated` looks one frame ahead at most, where `n_frames` reads them all)."""
    with _opened(source, max_pixels or DEFAULT_MAX_PIXELS) as image:
        animated = bool(getattr(image, "is_animated", False))
        mode = image.mode
        image.load()
        transposed = _orientation(image) not in (0, 1)
        # exif_transpose copies even an upright image: only call it when there is something to turn.
        upright = ImageOps.exif_transpose(image) if transposed else image
        rgb = _rgb_array(_to_rgb(upright))
        image_format = image.format or ""
    return LoadedImage(rgb=rgb, format=image_format, mode=mode, exif_transposed=bool(transposed),
                       animated=animated)


def _has_alpha(image: Image.Image) -> bool:
    # A palette or grey image can be transparent through a tRNS/transparency entry instead of an alpha band.
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _rgb_array(image: Image.Image) -> np.ndarray:
    """A writable (torch refuses read-only arrays) contiguous (H, W, 3) uint8 copy, filled band by band:
    np.array(image) would hold Pillow's bytes and the array at once."""
    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top, band in _bands(image):
        out[top:top + band.shape[0]] = band
    return out


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when absent); read from the header, before any pixel is decoded."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # damaged EXIF is not worth failing a photo for
        return 1


def pixels_digest(rgb: np.ndarray) -> str:
    """sha256 of decoded pixels and their size: equal for the same picture in any file format or metadata."""
    pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}:".encode("ascii"))
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()
