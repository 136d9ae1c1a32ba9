"""MiDaS v3.1 DPT network on a LeViT-384 encoder (DPT_LeViT_224): three levels, a transposed-conv stem, 224x224 only."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from .blocks import DepthHead, FeatureFusionBlock, require_native_square
from .registry import HALF_MEAN, HALF_STD, NetConfig, register_variant

# --- blocks -------------------------------------------------------------------------------------


class ConvTransposeNorm(nn.Sequential):
    """Transposed 3x3 conv (stride 2) + BatchNorm that exactly doubles the grid.

    The official module passes its `dilation=1` positionally into ConvTranspose2d's `output_padding`
    slot; that output padding of 1 is what makes 2H instead of 2H - 1, so it is spelled out here.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.add_module("c", nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1,
                                                output_padding=1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))


def stem_transpose(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two x2 transposed-conv stages that bring the finest decoder level back to half the input size."""
    return nn.Sequential(
        ConvTransposeNorm(in_channels, out_channels),
        nn.Hardswish(),
        ConvTransposeNorm(out_channels, out_channels // 2),
        nn.Hardswish(),
    )


@dataclass(frozen=True)
class LevitEncoderConfig:
    timm_name: str
    img_size: int
    # (stage, block) whose output feeds the decoder: MiDaS hooks the flat timm 0.6 blocks [3, 11, 21].
    taps: tuple[tuple[int, int], ...]
    features: tuple[int, ...]


class LevitEncoder(nn.Module):
    """The official `pretrained` module of DPT_LeViT_224: a timm LeViT returning three token grids (14, 7, 4).

    The attention biases are tied to the 14x14 token grid of a 224x224 input: other sizes are refused.
    """

    def __init__(self, cfg: LevitEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # The classifier heads are kept because the checkpoints carry them; never run.
        self.model = timm.create_model(cfg.timm_name, pretrained=False, img_size=cfg.img_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = self.cfg.img_size
        require_native_square(x, size, self.cfg.timm_name)
        tokens = self.model.stem(x).flatten(2).transpose(1, 2)
        grid = size // 16
        features = []
        last_stage = self.cfg.taps[-1][0]
        for stage_index, stage in enumerate(self.model.stages[: last_stage + 1]):
            tokens = stage.downsample(tokens)
            if stage_index:
                grid = (grid - 1) // 2 + 1  # stride-2 subsampling keeps every second token: 7 -> 4
            for block_index, block in enumerate(stage.blocks):
                tokens = block(tokens)
                if (stage_index, block_index) in self.cfg.taps:
                    features.append(tokens.transpose(1, 2).unflatten(2, (grid, grid)))
                    if len(features) == len(self.cfg.taps):
                        return features
        raise AssertionError("unreachable: the last tap ends the loop")


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevitDPTArch:
    encoder: LevitEncoderConfig
    width: int = 256
    head_features: int = 64
    head_hidden: int = 8


class LevitDecoder(nn.Module):
    """The official `scratch` of DPT_LeViT_224: three lateral convs, the transposed stem, three fusions, head."""

    def __init__(self, arch: LevitDPTArch):
        super().__init__()
        width = arch.width
        for level, channels in enumerate(arch.encoder.features, start=1):
            self.add_module(f"layer{level}_rn", nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False))
        self.stem_transpose = stem_transpose(width, arch.head_features * 2)
        for level in (1, 2, 3):
            self.add_module(f"refinenet{level}", FeatureFusionBlock(width, out_features=width, align_corners=True))
        self.output_conv = DepthHead(arch.head_features, align_corners=True, hidden=arch.head_hidden)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        l1, l2, l3 = self.layer1_rn(features[0]), self.layer2_rn(features[1]), self.layer3_rn(features[2])
        path = self.refinenet3(l3, size=l2.shape[-2:])  # 4 -> 7: an explicit size, not x2
        path = self.refinenet2(path, l2, size=l1.shape[-2:])
        path = self.refinenet1(path, l1)
        return self.output_conv(self.stem_transpose(path))


class LevitDPT(nn.Module):
    """LeViT encoder + RefineNet decoder; maps (B, 3, 224, 224) to (B, 224, 224) relative inverse depth."""

    def __init__(self, arch: LevitDPTArch, *, init_weights: bool = True):
        super().__init__()
        self.pretrained = LevitEncoder(arch.encoder)
        self.scratch = LevitDecoder(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(self.pretrained(x)).squeeze(1)


# --- checkpoint conversion ----------------------------------------------------------------------

STRUCTURAL_BUFFER = "attention_bias_idxs"
_BACKBONE = "pretrained.model."
_STEM = re.compile(r"^patch_embed\.(\d+)\.(c|bn)\.")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_HEAD = re.compile(r"^(head|head_dist)\.l\.")


def _flat_block_names(depths: tuple[int, ...]) -> list[tuple[str, bool]]:
    """timm 1.0 module name of each entry of timm 0.6's flat `blocks` Sequential, and whether 0.6 wrapped it
    in a Residual (`.m.`): per stage an (attention, MLP) pair per block; between stages an attention
    subsample followed by a residual MLP."""
    names: list[tuple[str, bool]] = []
    for stage, depth in enumerate(depths):
        if stage:
            names += [(f"stages.{stage}.downsample.attn_downsample", False), (f"stages.{stage}.downsample.mlp", True)]
        for block in range(depth):
            names += [(f"stages.{stage}.blocks.{block}.attn", True), (f"stages.{stage}.blocks.{block}.mlp", True)]
    return names


def _rename_linear_norm(rest: str, is_mlp: bool) -> str:
    # timm 0.6: `c` (linear) + `bn` in Sequential slots; timm 1.0: `linear` + `bn`, and `q.1`/`proj.1`
    # (after an activation or subsample at slot 0) became `q.ln`/`proj.ln`; MLP slots 0/2 are ln1/ln2.
    if is_mlp:
        rest = re.sub(r"^0\.", "ln1.", rest)
        rest = re.sub(r"^2\.", "ln2.", rest)
    rest = re.sub(r"^(q|proj)\.1\.", r"\1.ln.", rest)
    return re.sub(r"(^|\.)c\.", r"\1linear.", rest)


def official_to_timm_key(key: str, depths: tuple[int, ...] = (4, 4, 4)) -> str:
    """Official (timm 0.6 LeViT) key -> timm 1.0 key; timm 1.0 renamed every LeViT module."""
    if not key.startswith(_BACKBONE):
        return key
    name = key[len(_BACKBONE):]
    match = _STEM.match(name)
    if match:
        part = "linear" if match.group(2) == "c" else "bn"
        return f"{_BACKBONE}stem.conv{int(match.group(1)) // 2 + 1}.{part}." + name[match.end():]
    match = _FLAT_BLOCK.match(name)
    if match:
        target, residual = _flat_block_names(depths)[int(match.group(1))]
        rest = name[match.end():]
        if residual:
            rest = rest.removeprefix("m.")
        return f"{_BACKBONE}{target}." + _rename_linear_norm(rest, target.endswith(".mlp"))
    match = _HEAD.match(name)
    if match:
        return f"{_BACKBONE}{match.group(1)}.linear." + name[match.end():]
    return key


def convert_checkpoint(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official MiDaS v3.1 LeViT checkpoint -> this model's layout.

    Every backbone key is renamed; the released files also carry `attention_bias_idxs` (persistent
    under timm 0.6), which timm 1.0 recomputes with the same values: dropped.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE) and key.endswith(STRUCTURAL_BUFFER):
            dropped.append(key)
            continue
        out[official_to_timm_key(key)] = value
    return out, dropped


# --- configs ------------------------------------------------------------------------------------

LEVIT_224 = LevitDPTArch(
    encoder=LevitEncoderConfig(
        timm_name="levit_384", img_size=224, taps=((0, 1), (1, 0), (2, 0)), features=(384, 512, 768)
    ),
)


# --- registered variants ------------------------------------------------------------------------

register_variant(
    NetConfig(
        name="DPT_LeViT_224",
        family="levit",
        net_size=(224, 224),
        resize_method="minimal",
        mean=HALF_MEAN,
        std=HALF_STD,
        description="MiDaS v3.1 DPT with a LeViT-384 encoder at 224x224 px: the fastest v3.1 model.",
        keep_aspect_ratio=False,
        fixed_input_size=True,
    ),
    LEVIT_224,
    LevitDPT,
    convert_checkpoint=convert_checkpoint,
)
