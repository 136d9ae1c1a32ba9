"""Colour lookup tables for depth maps (256 RGB entries each), shipped as data so matplotlib is not needed."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from depthsite.exceptions import InvalidRequestError

COLORMAPS = ("inferno", "magma", "viridis", "turbo", "gray")
DEFAULT_COLORMAP = "inferno"
_TABLES = Path(__file__).with_name("colormaps.npz")


@lru_cache(maxsize=None)
def colormap_table(name: str) -> np.ndarray:
    """(256, 3) uint8 table; index 0 is the smallest value (farthest, for inverse depth)."""
    if name not in COLORMAPS:
        raise InvalidRequestError(f"unknown colormap {name!r}; choose one of: {', '.join(COLORMAPS)}",
                              extra={"field": "colormap"})
    if name == "gray":
        ramp = np.arange(256, dtype=np.uint8)
        return np.stack([ramp, ramp, ramp], axis=1)
    with np.load(_TABLES) as tables:
        return tables[name].copy()


def normalise(depth: np.ndarray) -> np.ndarray:
    """Depth scaled to 0..1 by its own min and max (a flat map becomes all zeros)."""
    depth = np.asarray(depth, dtype=np.float64)
    low, high = float(depth.min()), float(depth.max())
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 0:
        return np.zeros_like(depth)
    return (depth - low) / (high - low)


def colorize(depth: np.ndarray, name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 colour image."""
    return colormap_table(name)[colour_indices(depth)]


def colour_indices(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (H, W) uint8 rows of the colour table: the smallest value 0, the largest 255."""
    return np.clip(np.round(normalise(depth) * 255), 0, 255).astype(np.uint8)
