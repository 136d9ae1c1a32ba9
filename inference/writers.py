"""Depth map outputs: .npy, .pfm (as MiDaS's run.py), 16-bit PNG with its real range, colour PNG, side by side.

Every output is written to a temporary file beside its final name and renamed, so a reader never sees
half a file.
"""
from __future__ import annotations

import contextlib
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, PngImagePlugin

from inference.colormaps import DEFAULT_COLORMAP, colorize
from models_registry.exceptions import ValidationError

OUTPUT_FORMATS = ("png", "png16", "npy", "pfm", "side")
# File suffix per output: two PNG outputs cannot share ".png".
SUFFIXES = {"png": ".png", "png16": ".16bit.png", "npy": ".npy", "pfm": ".pfm", "side": ".side.png"}
CONTENT_TYPES = {"png": "image/png", "png16": "image/png", "npy": "application/octet-stream",
                 "pfm": "application/octet-stream", "side": "image/png"}
PNG16_MAX = 65535


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
                raise ValidationError(f"unknown output format {item!r}; choose from {', '.join(OUTPUT_FORMATS)} or all",
                                      extra={"field": "outputs"})
    if not wanted:
        raise ValidationError("choose at least one output format", extra={"field": "outputs"})
    return [fmt for fmt in OUTPUT_FORMATS if fmt in wanted]


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator[Path]:
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_npy(depth: np.ndarray, dest: Path) -> Path:
    with _atomic(dest) as tmp:
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
    with _atomic(dest) as tmp:
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
    with _atomic(dest) as tmp:
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


def write_color_png(depth: np.ndarray, dest: Path, colormap: str = DEFAULT_COLORMAP,
                    meta: DepthMeta = DepthMeta()) -> Path:
    with _atomic(dest) as tmp:
        Image.fromarray(colorize(depth, colormap)).save(tmp, format="PNG", pnginfo=_png_info(meta))
    return dest


def write_side_by_side(image_rgb: np.ndarray, depth: np.ndarray, dest: Path,
                       colormap: str = DEFAULT_COLORMAP) -> Path:
    """The input photo and its coloured depth map next to each other (same height)."""
    coloured = colorize(depth, colormap)
    if coloured.shape[:2] != image_rgb.shape[:2]:
        raise ValueError(f"depth {coloured.shape[:2]} and image {image_rgb.shape[:2]} differ in size")
    gap = np.full((image_rgb.shape[0], 8, 3), 255, np.uint8)
    with _atomic(dest) as tmp:
        Image.fromarray(np.concatenate([image_rgb, gap, coloured], axis=1)).save(tmp, format="PNG")
    return dest


def write_outputs(*, depth: np.ndarray, image_rgb: np.ndarray, folder: Path, stem: str, formats: Iterable[str],
                  colormap: str = DEFAULT_COLORMAP, meta: DepthMeta = DepthMeta()) -> dict[str, Path]:
    """Write each requested output as `<folder>/<stem><suffix>`; returns {format: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in parse_formats(list(formats)):
        dest = folder / f"{stem}{SUFFIXES[fmt]}"
        if fmt == "npy":
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
