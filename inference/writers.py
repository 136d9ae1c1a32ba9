"""Depth map outputs: .npy, .pfm (as MiDaS's run.py), 16-bit PNG with its real range, colour PNG, side by side,
and a coloured point cloud (.ply, with a downsampled preview for the browser).

Every output is written to a temporary file beside its final name and renamed, so a reader never sees
half a file.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, PngImagePlugin

from inference.colormaps import DEFAULT_COLORMAP, colorize, colormap_table, colour_indices
from models_registry import cachefs
from depthsite.exceptions import InvalidRequestError

OUTPUT_FORMATS = ("png", "png16", "npy", "pfm", "side", "ply")
# A file written beside an output, for pages rather than people: the browser's 3D view loads the preview.
PLY_PREVIEW = "ply_preview"
# File suffix per output: two PNG outputs cannot share ".png".
SUFFIXES = {"png": ".png", "png16": ".16bit.png", "npy": ".npy", "pfm": ".pfm", "side": ".side.png", "ply": ".ply",
            PLY_PREVIEW: ".preview.ply"}
# PLY has no registered media type; application/x-ply is what viewers and servers commonly use.
CONTENT_TYPES = {"png": "image/png", "png16": "image/png", "npy": "application/octet-stream",
                 "pfm": "application/octet-stream", "side": "image/png", "ply": "application/x-ply",
                 PLY_PREVIEW: "application/x-ply"}
PNG16_MAX = 65535

DEFAULT_FOV_DEGREES = 60.0
FOV_RANGE = (10.0, 170.0)  # a pinhole camera's horizontal field of view that makes a readable cloud
# z = 1 / (n + floor) for the normalised inverse depth n in [0, 1]: the nearest point is at 1 / (1 + floor), the
# farthest at 1 / floor, so the cloud spans a depth ratio of (1 + floor) / floor = 11 with this floor.
PLY_DEPTH_FLOOR = 0.1
PLY_PREVIEW_POINTS = 120_000  # the browser view's budget; the .ply itself keeps one point per pixel
_PLY_ROWS_PER_CHUNK = 256
_PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


@dataclass(frozen=True)
class DepthMeta:
    """What a depth file says about itself (stored in the PNG text chunks)."""

    model: str = ""
    weights_sha256: str = ""
    semantics: str = ""


def parse_formats(values: Iterable[str] | str) -> list[str]:
    """'png,npy' / ['all'] -> the output list, validated, in canonical order."""
    if isinstance(values, str):
        values = [values]
    wanted: set[str] = set()
    for value in values:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item == "all":
                wanted.update(OUTPUT_FORMATS)
            elif item in OUTPUT_FORMATS:
                wanted.add(item)
            else:
                raise InvalidRequestError(f"unknown output format {item!r}; choose from {', '.join(OUTPUT_FORMATS)} or all",
                                      extra={"field": "outputs"})
    if not wanted:
        raise InvalidRequestError("choose at least one output format", extra={"field": "outputs"})
    return [fmt for fmt in OUTPUT_FORMATS if fmt in wanted]


def write_npy(depth: np.ndarray, dest: Path) -> Path:
    with cachefs.atomic_write(dest) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(depth, dtype=np.float32))
    return dest


def write_pfm(depth: np.ndarray, dest: Path) -> Path:
    """Portable float map as MiDaS's run.py writes it: 'Pf', 'W H', negative scale = little-endian, bottom row first."""
    data = np.asarray(depth, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"a PFM depth map is 2-D, got shape {data.shape}")
    little = data.dtype.byteorder == "<" or (data.dtype.byteorder in "=|" and sys.byteorder == "little")
    scale = -1.0 if little else 1.0
    with cachefs.atomic_write(dest) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"Pf\n")
            handle.write(f"{data.shape[1]} {data.shape[0]}\n".encode("ascii"))
            handle.write(f"{scale:f}\n".encode("ascii"))
            np.flipud(data).tofile(handle)
    return dest


def read_pfm(path: Path) -> np.ndarray:
    with open(path, "rb") as handle:
        header = handle.readline().strip()
        if header not in (b"Pf", b"PF"):
            raise ValueError(f"{path} is not a PFM file")
        width, height = (int(value) for value in handle.readline().split())
        scale = float(handle.readline())
        dtype = "<f4" if scale < 0 else ">f4"
        channels = 3 if header == b"PF" else 1
        data = np.fromfile(handle, dtype=dtype, count=width * height * channels)
    shape = (height, width, 3) if channels == 3 else (height, width)
    return np.flipud(data.reshape(shape)).astype(np.float32)


def _png_info(meta: DepthMeta, **values: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in {"depthsite:model": meta.model, "depthsite:weights_sha256": meta.weights_sha256,
                       "depthsite:semantics": meta.semantics, **values}.items():
        if value:
            info.add_text(key, str(value))
    return info


def write_png16(depth: np.ndarray, dest: Path, meta: DepthMeta = DepthMeta()) -> Path:
    """Depth scaled to 0..65535; min and max go into text chunks so the real values can be recovered."""
    data = np.asarray(depth, dtype=np.float64)
    low, high = float(data.min()), float(data.max())
    span = high - low
    scaled = np.zeros(data.shape, np.uint16) if span <= 0 else np.round((data - low) / span * PNG16_MAX).astype(np.uint16)
    info = _png_info(meta, **{"depthsite:depth_min": repr(low), "depthsite:depth_max": repr(high),
                              "depthsite:scale": "depth = min + value / 65535 * (max - min)"})
    with cachefs.atomic_write(dest) as tmp:
        Image.fromarray(scaled).save(tmp, format="PNG", pnginfo=info)
    return dest


def read_png16(path: Path) -> np.ndarray:
    """The float32 depth a 16-bit PNG of ours holds (to within 16-bit quantisation)."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
        values = np.asarray(image, dtype=np.float64)
    try:
        low, high = float(text["depthsite:depth_min"]), float(text["depthsite:depth_max"])
    except KeyError:
        raise ValueError(f"{path} has no depthsite:depth_min/max text chunks") from None
    return (low + values / PNG16_MAX * (high - low)).astype(np.float32)


def color_image(depth: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> Image.Image:
    """The coloured depth map as an indexed image: the 256-entry colour map is its palette, one byte a pixel.
    Its pixels are colorize()'s exactly; saved as PNG it took 0.18-0.31x the time of the RGB image to encode (three
    runs) and 0.61-0.65x the bytes here (bench/colour_png.py), and every browser and image library reads it."""
    image = Image.fromarray(colour_indices(depth))
    image.putpalette(colormap_table(colormap).tobytes())
    return image


def write_color_png(depth: np.ndarray, dest: Path, colormap: str = DEFAULT_COLORMAP,
                    meta: DepthMeta = DepthMeta()) -> Path:
    image = color_image(depth, colormap)
    with cachefs.atomic_write(dest) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(meta))
    return dest


def write_side_by_side(image_rgb: np.ndarray, depth: np.ndarray, dest: Path,
                       colormap: str = DEFAULT_COLORMAP) -> Path:
    """The input photo and its coloured depth map next to each other (same height)."""
    coloured = colorize(depth, colormap)
    if coloured.shape[:2] != image_rgb.shape[:2]:
        raise ValueError(f"depth {coloured.shape[:2]} and image {image_rgb.shape[:2]} differ in size")
    gap = np.full((image_rgb.shape[0], 8, 3), 255, np.uint8)
    with cachefs.atomic_write(dest) as tmp:
        Image.fromarray(np.concatenate([image_rgb, gap, coloured], axis=1)).save(tmp, format="PNG")
    return dest


def fov_check(value) -> float:
    """A horizontal field of view in degrees, as a number within FOV_RANGE; InvalidRequestError naming `fov` otherwise."""
    low, high = FOV_RANGE
    try:
        fov = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"the field of view must be a number of degrees from {low:g} to {high:g}, "
                              f"not {value!r}",
                              extra={"field": "fov"}) from None
    if not (math.isfinite(fov) and low <= fov <= high):
        raise InvalidRequestError(f"the field of view must be from {low:g} to {high:g} degrees, not {value!r}",
                              extra={"field": "fov"})
    return fov


@dataclass(frozen=True)
class PinholeCamera:
    """The camera a point cloud assumes: square pixels, principal point at the image centre."""

    width: int
    height: int
    fov_degrees: float = DEFAULT_FOV_DEGREES

    @property
    def focal(self) -> float:
        return (self.width / 2) / math.tan(math.radians(self.fov_degrees) / 2)

    @property
    def cx(self) -> float:
        return (self.width - 1) / 2

    @property
    def cy(self) -> float:
        return (self.height - 1) / 2


def ply_depth(depth: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """Relative inverse depth (larger is nearer) -> a positive depth along the camera axis, up to scale.

    MiDaS-style networks give inverse depth with unknown scale and shift; normalising to n in [0, 1] removes both,
    and z = 1 / (n + PLY_DEPTH_FLOOR) turns it into a depth whose order is right (nearer = smaller z) and whose
    ratios are only a guess. The cloud is relative: its units are not metres.
    """
    data = np.asarray(depth, dtype=np.float64)
    span = high - low
    normalised = np.zeros(data.shape) if not span > 0 else np.clip((data - low) / span, 0.0, 1.0)
    normalised = np.where(np.isfinite(normalised), normalised, 0.0)  # a NaN pixel goes to the back, not to infinity
    return 1.0 / (normalised + PLY_DEPTH_FLOOR)


def _ply_header(*, count: int, camera: PinholeCamera, low: float, high: float, stride: int, meta: DepthMeta) -> bytes:
    lines = [
        "ply",
        "format binary_little_endian 1.0",
        "comment depthsite point cloud: RELATIVE depth (unknown scale and shift), not metres",
        f"comment model: {meta.model or 'unknown'}; weights sha256: {meta.weights_sha256 or 'unknown'}",
        f"comment values: {meta.semantics or 'relative inverse depth, larger is nearer'}",
        f"comment camera: pinhole, horizontal fov {camera.fov_degrees:g} degrees, image {camera.width}x{camera.height}"
        f" px, fx=fy={camera.focal:.6g} px, cx={camera.cx:g}, cy={camera.cy:g}",
        "comment axes: x right, y down, z forward (OpenCV camera); x = (u - cx) * z / fx, y = (v - cy) * z / fy",
        f"comment depth: n = (d - d_min) / (d_max - d_min), z = 1 / (n + {PLY_DEPTH_FLOOR:g});"
        f" d_min={low!r}, d_max={high!r}",
        f"comment points: one per pixel{'' if stride == 1 else f' of one row and column in {stride} (preview)'},"
        " row-major from the top-left, coloured from the input image",
        "obj_info relative depth, not metric",
        f"element vertex {count}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        "end_header",
    ]
    # Header lines are ASCII by the format, one per line: a model name or semantics with other characters (a line
    # break included) is escaped rather than allowed to end the header early.
    lines = [line.replace("\r", " ").replace("\n", " ") for line in lines]
    return ("\n".join(lines) + "\n").encode("ascii", "backslashreplace")


def write_ply(depth: np.ndarray, image_rgb: np.ndarray, dest: Path, *, fov_degrees: float = DEFAULT_FOV_DEGREES,
              meta: DepthMeta = DepthMeta(), stride: int = 1) -> Path:
    """A binary little-endian PLY: one vertex (x, y, z float32; red, green, blue uchar) per pixel, or per
    `stride`-th pixel in each direction for a preview; written in row chunks so a large photo needs no
    full-size copy of the cloud in memory."""
    data = np.asarray(depth)
    if data.ndim != 2:
        raise ValueError(f"a depth map is 2-D, got shape {data.shape}")
    if image_rgb.shape[:2] != data.shape:
        raise ValueError(f"depth {data.shape} and image {image_rgb.shape[:2]} differ in size")
    fov = fov_check(fov_degrees)
    height, width = data.shape
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    camera = PinholeCamera(width=width, height=height, fov_degrees=fov)
    rows = np.arange(0, height, stride)
    columns = np.arange(0, width, stride)
    u = (columns - camera.cx) / camera.focal
    with cachefs.atomic_write(dest) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(_ply_header(count=rows.size * columns.size, camera=camera, low=low, high=high,
                                     stride=stride, meta=meta))
            for start in range(0, rows.size, _PLY_ROWS_PER_CHUNK):
                chunk_rows = rows[start:start + _PLY_ROWS_PER_CHUNK]
                z = ply_depth(data[np.ix_(chunk_rows, columns)], low=low, high=high)
                v = ((chunk_rows - camera.cy) / camera.focal)[:, None]
                vertices = np.empty(z.shape, _PLY_VERTEX)
                vertices["x"] = u[None, :] * z
                vertices["y"] = v * z
                vertices["z"] = z
                colours = image_rgb[np.ix_(chunk_rows, columns)]
                vertices["red"], vertices["green"], vertices["blue"] = (colours[..., 0], colours[..., 1],
                                                                        colours[..., 2])
                handle.write(vertices.tobytes())
    return dest


def ply_preview_stride(*, width: int, height: int, points: int = PLY_PREVIEW_POINTS) -> int:
    """The smallest stride that keeps a preview cloud within `points`."""
    return max(1, math.ceil(math.sqrt(width * height / points)))


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """(header lines, vertices) of a binary little-endian PLY with float x, y, z and uchar colours."""
    with open(path, "rb") as handle:
        header: list[str] = []
        while True:
            line = handle.readline()
            if not line:
                raise ValueError(f"{path}: no end_header")
            text = line.decode("ascii").rstrip("\n")
            header.append(text)
            if text == "end_header":
                break
        count = next(int(h.split()[2]) for h in header if h.startswith("element vertex "))
        vertices = np.fromfile(handle, dtype=_PLY_VERTEX, count=count)
        if vertices.size != count or handle.read(1):
            raise ValueError(f"{path}: the vertex data does not match the header's count {count}")
    return header, vertices


# What the writers put per pixel: float32 depth in .npy and .pfm, one _PLY_VERTEX a pixel in the .ply, and in the PNG
# outputs a palette index (the colour map), a 16-bit grey level, or RGB photo beside depth.
_PNG_SAMPLE_BYTES = {"png": 1, "png16": 2, "side": 3}
_SIDE_GAP = 8  # the white columns write_side_by_side puts between the photo and its depth
# Each file's header and trailer besides its pixels: PNG chunks (palette, text), the .npy dictionary, the PFM
# lines, the .ply's comment lines (which quote the model name and semantics). All are well under this.
_FILE_OVERHEAD = 8192


def png_bytes_bound(*, width: int, height: int, sample_bytes: int) -> int:
    """The most bytes a PNG of these pixels can take: deflate stores what it cannot shrink (noise, a dithered
    colour map) at its raw size plus a few bytes a block, each row starts with one filter byte, and PNG cuts the
    stream into chunks of 12 bytes' framing."""
    raw = height * (width * sample_bytes + 1)
    return raw + raw // 256 + _FILE_OVERHEAD


def outputs_bytes_bound(*, formats: Iterable[str], width: int, height: int) -> int:
    """The most bytes write_outputs can write for a photo of width x height (the depth map is as large as the
    photo), the .ply's browser preview included: what a quota counts for a job before it has run.
    tests/jobs/test_quota_pending.py holds it against what the writers write."""
    pixels = width * height
    total = 0
    for fmt in formats:
        if fmt in ("npy", "pfm"):
            total += pixels * np.dtype(np.float32).itemsize + _FILE_OVERHEAD
        elif fmt == "ply":
            stride = ply_preview_stride(width=width, height=height)
            preview = -(-width // stride) * -(-height // stride)  # rows and columns of one in `stride`, rounded up
            total += (pixels + preview) * _PLY_VERTEX.itemsize + 2 * _FILE_OVERHEAD
        elif fmt == "side":
            total += png_bytes_bound(width=2 * width + _SIDE_GAP, height=height, sample_bytes=3)
        else:
            total += png_bytes_bound(width=width, height=height, sample_bytes=_PNG_SAMPLE_BYTES[fmt])
    return total


def write_outputs(*, depth: np.ndarray, image_rgb: np.ndarray, folder: Path, stem: str, formats: Iterable[str],
                  colormap: str = DEFAULT_COLORMAP, meta: DepthMeta = DepthMeta(),
                  fov_degrees: float = DEFAULT_FOV_DEGREES, previews: bool = False) -> dict[str, Path]:
    """Write each requested output as `<folder>/<stem><suffix>`; returns {format: path}.

    With `previews`, a .ply output also gets its downsampled browser preview (PLY_PREVIEW) beside it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in parse_formats(list(formats)):
        dest = folder / f"{stem}{SUFFIXES[fmt]}"
        if fmt == "ply":
            written[fmt] = write_ply(depth, image_rgb, dest, fov_degrees=fov_degrees, meta=meta)
            if previews:
                height, width = np.asarray(depth).shape
                written[PLY_PREVIEW] = write_ply(depth, image_rgb, folder / f"{stem}{SUFFIXES[PLY_PREVIEW]}",
                                                 fov_degrees=fov_degrees, meta=meta,
                                                 stride=ply_preview_stride(width=width, height=height))
        elif fmt == "npy":
            written[fmt] = write_npy(depth, dest)
        elif fmt == "pfm":
            written[fmt] = write_pfm(depth, dest)
        elif fmt == "png16":
            written[fmt] = write_png16(depth, dest, meta)
        elif fmt == "png":
            written[fmt] = write_color_png(depth, dest, colormap, meta)
        else:
            written[fmt] = write_side_by_side(image_rgb, depth, dest, colormap)
    return written
