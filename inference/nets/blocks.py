"""Decoder blocks shared by the MiDaS and DPT networks: lateral convs, residual fusion, depth head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Interpolate(nn.Module):
    """Parameter-free resize by a fixed factor, a module so it holds its official Sequential slot."""

    def __init__(self, scale_factor: float, mode: str = "bilinear", align_corners: bool = False):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}, align_corners={self.align_corners}"


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus a skip connection."""

    def __init__(self, features: int, *, skip_after_activation: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)
        # MiDaS v2.1 applies an in-place ReLU to the unit's input, so its trained skip adds relu(x), not x.
        self.skip_after_activation = skip_after_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(x)
        skip = activated if self.skip_after_activation else x
        out = F.relu(self.conv1(activated), inplace=True)
        return self.conv2(out) + skip

    def extra_repr(self) -> str:
        return f"skip_after_activation={self.skip_after_activation}"


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined lateral feature, refine again, upsample, optional 1x1 projection."""

    def __init__(
        self,
        features: int,
        *,
        out_features: Optional[int] = None,
        align_corners: bool = True,
        skip_after_activation: bool = False,
    ):
        super().__init__()
        # Registered first so the state_dict order matches the official checkpoints.
        self.out_conv = nn.Conv2d(features, out_features, kernel_size=1, bias=True) if out_features is not None else None
        self.resConfUnit1 = ResidualConvUnit(features, skip_after_activation=skip_after_activation)
        self.resConfUnit2 = ResidualConvUnit(features, skip_after_activation=skip_after_activation)
        self.align_corners = align_corners

    def forward(
        self,
        x: torch.Tensor,
        lateral: Optional[torch.Tensor] = None,
        size: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if lateral is not None:
            x = x + self.resConfUnit1(lateral)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self.align_corners)
        if self.out_conv is not None:
            x = self.out_conv(x)
        return x


class DepthHead(nn.Sequential):
    """conv3x3 (halve) -> x2 upsample -> conv3x3 -> relu -> conv1x1 to one channel -> relu."""

    def __init__(self, features: int, *, align_corners: bool, hidden: int = 32, non_negative: bool = True):
        super().__init__(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            Interpolate(2, mode="bilinear", align_corners=align_corners),
            nn.Conv2d(features // 2, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.ReLU(inplace=True) if non_negative else nn.Identity(),
        )


def lateral_sizes(grid: Sequence) -> list[tuple]:
    """Sizes of the three finer laterals of a DPT head over a (rows, cols) token grid: 4x, 2x and 1x the grid.

    Computed from the grid rather than read off the laterals: the ONNX exporter records a traced tensor's
    shape as a constant of the export size, while arithmetic on the input's own size stays symbolic, so a
    graph exported this way fuses at every input size."""
    rows, cols = grid
    return [(4 * rows, 4 * cols), (2 * rows, 2 * cols), (rows, cols)]


@dataclass(frozen=True)
class DecoderConfig:
    """The per-model decoder quirks of the official code, as options."""

    in_channels: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    # Fusion blocks end with a 1x1 conv to the next (finer) level's width (MidasNet_small, DPT).
    fusion_out_conv: bool
    skip_after_activation: bool = False
    fusion_align_corners: bool = True
    # DPT upsamples each fusion output to the exact size of the next lateral instead of x2.
    upsample_to_lateral_size: bool = False
    head_align_corners: bool = False
    non_negative: bool = True
    # MidasNet registers refinenet4 first, DPT refinenet1 first; the state_dict order follows.
    coarse_first: bool = True


class DepthDecoder(nn.Module):
    """The official `scratch` module: 4 lateral convs, 4 fusion blocks (coarse to fine) and the depth head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        for level, (cin, width) in enumerate(zip(cfg.in_channels, cfg.widths), start=1):
            self.add_module(f"layer{level}_rn", nn.Conv2d(cin, width, kernel_size=3, padding=1, bias=False))
        order = (3, 2, 1, 0) if cfg.coarse_first else (0, 1, 2, 3)
        for idx in order:
            out_features = cfg.widths[max(idx - 1, 0)] if cfg.fusion_out_conv else None
            block = FeatureFusionBlock(
                cfg.widths[idx],
                out_features=out_features,
                align_corners=cfg.fusion_align_corners,
                skip_after_activation=cfg.skip_after_activation,
            )
            self.add_module(f"refinenet{idx + 1}", block)
        self.output_conv = DepthHead(
            cfg.widths[0], align_corners=cfg.head_align_corners, non_negative=cfg.non_negative
        )

    def forward(self, features: Sequence[torch.Tensor], grid: Optional[Sequence] = None) -> torch.Tensor:
        """`grid`: the encoder's token grid, from which a ViT-style encoder's lateral sizes follow
        (lateral_sizes); without it they are read off the laterals."""
        f1, f2, f3, f4 = features
        l1, l2, l3, l4 = self.layer1_rn(f1), self.layer2_rn(f2), self.layer3_rn(f3), self.layer4_rn(f4)
        sizes: list = [None, None, None]
        if self.cfg.upsample_to_lateral_size:
            sizes = lateral_sizes(grid) if grid is not None else [l1.shape[-2:], l2.shape[-2:], l3.shape[-2:]]

        path = self.refinenet4(l4, size=sizes[2])
        path = self.refinenet3(path, l3, size=sizes[1])
        path = self.refinenet2(path, l2, size=sizes[0])
        path = self.refinenet1(path, l1)
        return self.output_conv(path)


def dpt_decoder(in_channels: tuple[int, int, int, int]) -> DecoderConfig:
    """The DPT decoder of MiDaS v3 and v3.1 (DPTDepthModel, features=256) over four encoder levels."""
    return DecoderConfig(
        in_channels=in_channels,
        widths=(256, 256, 256, 256),
        fusion_out_conv=True,
        skip_after_activation=False,
        fusion_align_corners=True,
        upsample_to_lateral_size=True,
        head_align_corners=True,
        coarse_first=False,
    )


def require_native_square(x: torch.Tensor, size: int, name: str) -> None:
    """Refuse any input but the size x size square a fixed-grid encoder (Swin, SwinV2, LeViT) was built for."""
    if tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name} accepts {size}x{size} inputs only, got {x.shape[-2]}x{x.shape[-1]}")
