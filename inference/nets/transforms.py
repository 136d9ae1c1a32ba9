"""Official MiDaS / Depth Anything preprocessing (resize to a multiple, keeping the aspect ratio or not; normalise) and output resizing."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from depthsite.netspecs import target_size as _target_size

from .registry import NetConfig, get_config

ConfigOrName = Union[NetConfig, str]


def _resolve(config_or_name: ConfigOrName) -> NetConfig:
    return config_or_name if isinstance(config_or_name, NetConfig) else get_config(config_or_name)


def target_size(height: int, width: int, config_or_name: ConfigOrName) -> tuple[int, int]:
    """The (h, w) network input size that the official Resize picks for an image of (height, width).

    One definition (depthsite.netspecs), shared with the numpy twin the ONNX path uses."""
    return _target_size(height, width, _resolve(config_or_name))


def preprocess(image: np.ndarray, config_or_name: ConfigOrName) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> normalised float32 tensor (1, 3, h, w) at the network input size."""
    cfg = _resolve(config_or_name)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array of shape (H, W, 3), got {array.dtype} {array.shape}")
    size = target_size(array.shape[0], array.shape[1], cfg)

    # float64 throughout, like the official OpenCV pipeline; torch bicubic (a=-0.75, half-pixel,
    # no antialiasing) is OpenCV's INTER_CUBIC up to ~1e-5.
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0).to(torch.float64) / 255.0
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(torch.float32).contiguous()


def postprocess(
    prediction: torch.Tensor, size: tuple[int, int], config_or_name: Optional[ConfigOrName] = None
) -> np.ndarray:
    """Network output (1, h, w) or (h, w) -> float32 (H, W) at the image size.

    The resize is the variant's official one (`output_interpolation`, `output_align_corners`); without a
    config it is MiDaS run.py's bicubic.
    """
    pred = prediction.detach()
    if pred.ndim == 2:
        pred = pred.unsqueeze(0)
    if pred.ndim != 3 or pred.shape[0] != 1:
        raise ValueError(f"expected a prediction of shape (1, h, w) or (h, w), got {tuple(prediction.shape)}")
    if pred.dtype != torch.float32:
        pred = pred.float()
    height, width = int(size[0]), int(size[1])
    mode, align_corners = "bicubic", False
    if config_or_name is not None:
        cfg = _resolve(config_or_name)
        mode, align_corners = cfg.output_interpolation, cfg.output_align_corners
    out = F.interpolate(pred.unsqueeze(1), size=(height, width), mode=mode, align_corners=align_corners)
    return out.reshape(height, width).cpu().numpy()
