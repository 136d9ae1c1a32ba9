"""Deterministic checkpoint weights (tests, benchmarks, demo screenshots): every tensor is a pure function of its key, shape and dtype.

Implements the rule of the reference fixtures (SplitMix64 stream seeded by sha256(key)), so that
generated checkpoints reproduce the golden outputs of the official MiDaS code. numpy only; torch is
imported lazily by the helpers that build torch tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

CATALOGUE_DIR = Path(__file__).resolve().parent / "catalogue"

_INCREMENT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# Values made at a time: uint64 and float64 scratch that stays in the CPU's cache, reused, instead of
# temporaries the size of the tensor (DPT_Large's 344M weights took 10.8 s here, in blocks 2.1 s).
STREAM_BLOCK = 1 << 15


def _seed(key: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little"))


def _unit_block(seed: np.uint64, first: int, stop: int, z: np.ndarray, scratch: np.ndarray,
                unit: np.ndarray) -> np.ndarray:
    """SplitMix64 outputs first..stop-1 of the seed's stream as float64 in [-1, 1), written into `unit`
    (z and scratch: uint64 work space of the same length)."""
    z[:] = np.arange(first, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z *= _INCREMENT
        z += seed
        for shift, mix in ((30, _MIX1), (27, _MIX2)):
            np.right_shift(z, np.uint64(shift), out=scratch)
            z ^= scratch
            z *= mix
        np.right_shift(z, np.uint64(31), out=scratch)
        z ^= scratch
    z >>= np.uint64(11)
    unit[:] = z
    unit *= 2.0**-53  # both factors are powers of two: exact, as one expression would compute them
    unit *= 2.0
    unit -= 1.0
    return unit


def _centre_and_half_width(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    if key.endswith("running_var"):
        return 1.0, 0.25
    if key.endswith("running_mean"):
        return 0.0, 0.1
    if len(shape) <= 1:
        return (1.0, 0.1) if key.endswith("weight") else (0.5, 0.1)
    fan_in = shape[-1] if len(shape) == 3 else int(np.prod(shape[1:]))
    return 0.0, math.sqrt(3.0 / fan_in)


def det_array(key: str, shape: Iterable[int], dtype: str = "float32") -> np.ndarray:
    """The deterministic numpy array for one state_dict entry."""
    shape = tuple(int(s) for s in shape)
    dtype = str(dtype).replace("torch.", "")
    if not dtype.startswith(("float", "bfloat")):
        return np.zeros(shape, dtype=dtype)
    count = int(np.prod(shape)) if shape else 1
    centre, half = _centre_and_half_width(key, shape)
    seed, absolute = _seed(key), len(shape) == 4 and shape[0] == 1
    out = np.empty(count, dtype=np.float32)
    block = max(1, min(count, STREAM_BLOCK))  # an empty tensor still gets its (empty) array
    z, scratch, unit = np.empty(block, np.uint64), np.empty(block, np.uint64), np.empty(block, np.float64)
    for start in range(0, count, block):
        stop = min(count, start + block)
        n = stop - start
        values = _unit_block(seed, start + 1, stop + 1, z[:n], scratch[:n], unit[:n])
        if absolute:
            np.abs(values, out=values)
        values *= half  # centre + half * unit, rounded to float32 once, as before
        values += centre
        out[start:stop] = values
    return out.reshape(shape)


def official_layout(model: str) -> list[tuple[str, tuple[int, ...], str]]:
    """[(key, shape, dtype), ...] of the official state_dict of a catalogue model."""
    data = json.loads((CATALOGUE_DIR / f"keys_{model}.json").read_text())
    return [(key, tuple(shape), dtype) for key, shape, dtype in data["keys"]]


def det_numpy_state_dict(model: str, *, with_num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """The official layout of `model` filled by the rule, as numpy arrays (no torch needed)."""
    return {
        key: det_array(key, shape, dtype)
        for key, shape, dtype in official_layout(model)
        if with_num_batches_tracked or not key.endswith("num_batches_tracked")
    }


def det_state_dict(model: str, *, with_num_batches_tracked: bool = True) -> dict:
    """The official layout of `model` filled by the rule, as torch tensors."""
    import torch

    return {
        key: torch.from_numpy(array)
        for key, array in det_numpy_state_dict(model, with_num_batches_tracked=with_num_batches_tracked).items()
    }


def array_digest16(array: np.ndarray) -> str:
    """First 16 hex chars of sha256 over the little-endian C-order bytes (the fixtures' per-key digest)."""
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")
    contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(contiguous.tobytes()).hexdigest()[:16]


def net_input(height: int, width: int) -> np.ndarray:
    """The fixtures' net-only input tensor (1, 3, H, W) float32."""
    c = np.arange(3).reshape(3, 1, 1)
    i = np.arange(height).reshape(1, height, 1)
    j = np.arange(width).reshape(1, 1, width)
    p = (i * (c + 3) + j * (2 * c + 5) + 7 * c) % 61
    q = ((i // 16) * 5 + (j // 16) * 3 + c) % 7
    values = (p - 30) / 20.0 + (q - 3) / 4.0
    return values.astype(np.float32)[None]


def synthetic_image(height: int, width: int) -> np.ndarray:
    """The fixtures' synthetic uint8 RGB image (H, W, 3) for end-to-end checks."""
    y = np.arange(height).reshape(height, 1)
    x = np.arange(width).reshape(1, width)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = (255 * y) // (height - 1)
    image[..., 1] = (255 * x) // (width - 1)
    image[..., 2] = np.where(((x // 16) + (y // 16)) % 2 == 0, 200, 55)
    disk = (y - height // 2) ** 2 + (x - width // 3) ** 2 <= (min(height, width) // 4) ** 2
    image[disk] = (230, 40, 40)
    rect_rows = slice(height // 5, height // 5 + height // 3)
    rect_cols = slice(width // 2, width // 2 + width // 3)
    image[rect_rows, rect_cols] = (30, 200, 90)
    return image


def structural_keys(model: str) -> tuple[str, ...]:
    """Official keys of the structural buffers of `model`, as listed by its key layout."""
    data = json.loads((CATALOGUE_DIR / f"keys_{model}.json").read_text())
    return tuple(data["structural_buffers"]["keys"])


def det_rule_state_dict(model: str) -> dict:
    """Every rule-filled entry of the official layout (structural buffers left out), as torch tensors."""
    import torch

    skip = set(structural_keys(model))
    return {
        key: torch.from_numpy(det_array(key, shape, dtype))
        for key, shape, dtype in official_layout(model)
        if key not in skip
    }
