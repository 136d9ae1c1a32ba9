"""Resizing position tables as matrix products, so an exported graph resizes them for any input size.

The encoders resize a learned table (a ViT's position grid, BEiT's relative-distance table) to the token
grid of each input. F.interpolate does that in eager PyTorch, but the ONNX exporter records its output size as
a constant of the export size, so the graph only runs at that size. Here each axis is resampled by a
(out, in) weight matrix built from `arange(out)` with tensor arithmetic; `out` may be a traced size, so the
exported graph computes the matrix for whatever input it gets. Same taps and weights as F.interpolate
(half-pixel centres, no antialiasing): bilinear as PyTorch clamps it, bicubic with A = -0.75 and border
replication; they agree with it to float32 rounding (measured: 4e-7 bilinear, 4e-6 bicubic on unit values).
"""
from __future__ import annotations

import torch

CUBIC_A = -0.75


def _as_tensor(value, device) -> torch.Tensor:
    # A traced size is already a 0-dim tensor; a plain int becomes one.
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, device=device)


def _matrix(taps: torch.Tensor, weights: torch.Tensor, in_len: int) -> torch.Tensor:
    """(out, in) matrix from per-output tap indices and weights (out, k); taps clamped onto one column add up."""
    taps = taps.clamp(0, in_len - 1)
    columns = torch.arange(in_len, device=taps.device)
    onehot = (taps.unsqueeze(-1) == columns).to(weights.dtype)
    return (weights.unsqueeze(-1) * onehot).sum(dim=1)


def _source(out_len, ratio: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """Half-pixel source coordinate of each output index, ratio * (i + 0.5) - 0.5 (the ratio is rounded to
    float32 first, as PyTorch's kernels hold it); float32 result."""
    index = torch.arange(_as_tensor(out_len, device), device=device).to(dtype)
    return (ratio.to(torch.float32).to(dtype) * (index + 0.5) - 0.5).to(torch.float32)


def linear_matrix(out_len, in_len: int, *, device=None) -> torch.Tensor:
    """Bilinear (align_corners=False) resampling of `in_len` samples to `out_len`, size-driven."""
    ratio = in_len / _as_tensor(out_len, device).to(torch.float32)
    source = _source(out_len, ratio, device, torch.float64).clamp(min=0)
    low = source.floor()
    frac = source - low
    low = low.to(torch.int64)
    taps = torch.stack((low, low + 1), dim=1)
    weights = torch.stack((1 - frac, frac), dim=1)
    return _matrix(taps, weights, in_len)


def _cubic_near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
    return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
    return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def cubic_matrix(out_len, in_len: int, *, scale, device=None) -> torch.Tensor:
    """Bicubic (align_corners=False, no antialias) resampling driven by a scale factor, as F.interpolate does
    when given `scale_factor`: source = (i + 0.5) / scale - 0.5, taps clamped to the border."""
    ratio = 1.0 / _as_tensor(scale, device).to(torch.float64)
    source = _source(out_len, ratio, device, torch.float64)
    low = source.floor()
    t = source - low
    low = low.to(torch.int64)
    taps = torch.stack((low - 1, low, low + 1, low + 2), dim=1)
    weights = torch.stack((_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)), dim=1)
    return _matrix(taps, weights, in_len)


def resample_2d(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, out_h, out_w) with per-axis matrices rows (out_h, H) and cols (out_w, W)."""
    return rows.to(grid.dtype) @ grid @ cols.to(grid.dtype).transpose(0, 1)
