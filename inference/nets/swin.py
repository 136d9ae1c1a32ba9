"""MiDaS v3.1 DPT networks on Swin and SwinV2 encoders (DPT_SwinV2_L_384, _B_384, _T_256, DPT_Swin_L_384), native square only."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from .blocks import DecoderConfig, DepthDecoder, dpt_decoder, require_native_square
from .registry import HALF_MEAN, HALF_STD, NetConfig, register_variant

# --- blocks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwinEncoderConfig:
    """Which timm Swin/SwinV2 to wrap, at which (only) input size."""

    timm_name: str
    img_size: int
    # The decoder reads the last block of every stage (MiDaS's hooks [1, 1, 17, 1] / [1, 1, 5, 1]).


class SwinEncoder(nn.Module):
    """The official `pretrained` module of the Swin DPTs: a timm Swin/SwinV2 returning its four stage outputs.

    MiDaS's `act_postprocess` modules here are parameter-free (transpose + unflatten), so only the
    backbone is a submodule. Window sizes, shifted-window masks and SwinV2's continuous position bias
    are all tied to the native token grid: other input sizes are refused.
    """

    def __init__(self, cfg: SwinEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # The final norm and classifier head are kept because the checkpoints carry them; never run.
        self.model = timm.create_model(cfg.timm_name, pretrained=False, img_size=cfg.img_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = self.cfg.img_size
        require_native_square(x, size, self.cfg.timm_name)
        x = self.model.patch_embed(x)  # (B, H, W, C)
        features = []
        for stage in self.model.layers:
            x = stage(x)
            # (B, H, W, C) -> (B, C, H, W) through the (B, H*W, C) token view, as MiDaS does; a plain
            # permute gives other strides, and the decoder's convolutions then round differently.
            features.append(x.flatten(1, 2).transpose(1, 2).unflatten(2, x.shape[1:3]))
        return features


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwinDPTArch:
    encoder: SwinEncoderConfig
    decoder: DecoderConfig


class SwinDPT(nn.Module):
    """Swin/SwinV2 encoder + RefineNet decoder; maps (B, 3, S, S) to (B, S, S) relative inverse depth."""

    def __init__(self, arch: SwinDPTArch, *, init_weights: bool = True):
        super().__init__()
        self.pretrained = SwinEncoder(arch.encoder)
        self.scratch = DepthDecoder(arch.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(self.pretrained(x)).squeeze(1)


# --- checkpoint conversion ----------------------------------------------------------------------

STRUCTURAL_BUFFERS = ("attn_mask", "relative_position_index")
_BACKBONE = "pretrained.model."
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def official_to_timm_key(key: str) -> str:
    """Official (timm 0.6) key -> timm 1.0 key.

    timm 1.0 moved PatchMerging from the end of stage i to the start of stage i + 1 (same tensors,
    same 2x2 concatenation order) and put the classifier under `head.fc`.
    """
    if not key.startswith(_BACKBONE):
        return key
    name = key[len(_BACKBONE):]
    match = _DOWNSAMPLE.match(name)
    if match:
        name = f"layers.{int(match.group(1)) + 1}.downsample." + name[match.end():]
    elif name in ("head.weight", "head.bias"):
        name = "head.fc." + name.rsplit(".", 1)[1]
    return _BACKBONE + name


def convert_checkpoint(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official MiDaS v3.1 Swin/SwinV2 checkpoint -> this model's layout.

    The released files carry the shifted-window `attn_mask`s (and Swin's `relative_position_index`),
    persistent under timm 0.6; timm 1.0 recomputes the same values itself: dropped.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE) and key.endswith(STRUCTURAL_BUFFERS):
            dropped.append(key)
            continue
        out[official_to_timm_key(key)] = value
    return out, dropped


# --- configs ------------------------------------------------------------------------------------

_L = (192, 384, 768, 1536)
_B = (128, 256, 512, 1024)
_T = (96, 192, 384, 768)

SWINV2_L_384 = SwinDPTArch(SwinEncoderConfig("swinv2_large_window12to24_192to384", 384), dpt_decoder(_L))
SWINV2_B_384 = SwinDPTArch(SwinEncoderConfig("swinv2_base_window12to24_192to384", 384), dpt_decoder(_B))
SWINV2_T_256 = SwinDPTArch(SwinEncoderConfig("swinv2_tiny_window16_256", 256), dpt_decoder(_T))
SWIN_L_384 = SwinDPTArch(SwinEncoderConfig("swin_large_patch4_window12_384", 384), dpt_decoder(_L))


# --- registered variants ------------------------------------------------------------------------


def _register(name: str, family: str, arch: SwinDPTArch, description: str) -> None:
    size = arch.encoder.img_size
    config = NetConfig(
        name=name,
        family=family,
        net_size=(size, size),
        resize_method="minimal",
        mean=HALF_MEAN,
        std=HALF_STD,
        description=description,
        keep_aspect_ratio=False,
        fixed_input_size=True,
    )
    register_variant(config, arch, SwinDPT, convert_checkpoint=convert_checkpoint)


_register("DPT_SwinV2_L_384", "swin2", SWINV2_L_384, "MiDaS v3.1 DPT with a SwinV2-L encoder at 384x384 px.")
_register("DPT_SwinV2_B_384", "swin2", SWINV2_B_384, "MiDaS v3.1 DPT with a SwinV2-B encoder at 384x384 px.")
_register("DPT_SwinV2_T_256", "swin2", SWINV2_T_256,
          "MiDaS v3.1 DPT with a SwinV2-T encoder at 256x256 px: fast, for small devices.")
_register("DPT_Swin_L_384", "swin", SWIN_L_384, "MiDaS v3.1 DPT with a Swin-L encoder at 384x384 px.")
