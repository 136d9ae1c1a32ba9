"""MiDaS v3.1 DPT networks on a BEiT encoder (DPT_BEiT_L_512, DPT_BEiT_L_384, DPT_BEiT_B_384), any input multiple of 16."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DecoderConfig, DepthDecoder, dpt_decoder
from .dpt import Reassemble
from .registry import HALF_MEAN, HALF_STD, NetConfig, register_variant
from .resample import linear_matrix, resample_2d

PATCH_SIZE = 16

# --- blocks -------------------------------------------------------------------------------------


def relative_position_bias(attn: nn.Module, grid: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """(1, heads, N, N) bias of one attention layer for a (grid_h, grid_w) token grid plus the class token.

    MiDaS v3.1 stretches the pretrained (2Wh-1) x (2Ww-1) table of relative distances to the new grid
    with a half-pixel bilinear resize (the three class-token rows stay as they are); at the native grid
    this is the identity. timm's own table resizing interpolates differently and is not used.
    """
    table = attn.relative_position_bias_table
    old_h, old_w = 2 * attn.window_size[0] - 1, 2 * attn.window_size[1] - 1
    new_h, new_w = 2 * grid[0] - 1, 2 * grid[1] - 1
    distances, cls_rows = table[: old_h * old_w], table[old_h * old_w:]
    # The official code reshapes to (width, height), which only matters for non-square windows.
    if torch.onnx.is_in_onnx_export():
        # The grid is traced: resample with matrices built for it (exact identity at the native grid).
        grid_table = distances.reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
        grid_table = resample_2d(grid_table, linear_matrix(new_h, old_w), linear_matrix(new_w, old_h))
        distances = grid_table.permute(0, 2, 3, 1).flatten(0, 2)
    elif (new_h, new_w) != (old_h, old_w):
        grid_table = distances.reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
        grid_table = F.interpolate(grid_table, size=(new_h, new_w), mode="bilinear", align_corners=False)
        distances = grid_table.permute(0, 2, 3, 1).reshape(new_h * new_w, -1)
    table = torch.cat((distances, cls_rows))
    tokens = grid[0] * grid[1] + 1
    bias = table[index.view(-1)].view(tokens, tokens, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


def relative_position_index(grid: tuple, device=None) -> torch.Tensor:
    """(N + 1, N + 1) index into a BEiT relative-position table for a (rows, cols) grid of N tokens plus the
    class token, the layout timm's gen_relative_position_index builds: distance (dr, dc) of two patches at
    (dr + rows - 1) * (2 cols - 1) + dc + cols - 1; then class-to-patch, patch-to-class and class-to-class.

    Built with tensor arithmetic only, so an exported graph builds it for its own input's grid."""
    rows, cols = grid
    patches = torch.arange(rows * cols, device=device)
    row, col = patches // cols, patches % cols
    distance = ((row.unsqueeze(1) - row.unsqueeze(0) + rows - 1) * (2 * cols - 1)
                + col.unsqueeze(1) - col.unsqueeze(0) + cols - 1)
    first = (2 * rows - 1) * (2 * cols - 1)  # the three class-token entries follow the distances
    to_patches = torch.zeros_like(patches) + first
    corner = torch.zeros_like(patches[:1]) + first + 2
    top = torch.cat((corner, to_patches)).unsqueeze(0)
    below = torch.cat(((to_patches + 1).unsqueeze(1), distance), dim=1)
    return torch.cat((top, below), dim=0)


def attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BEiT self-attention in the explicit form of the official code: softmax(q * scale @ k^T + bias) @ v."""
    batch, tokens, _ = x.shape
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
    qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    # The head count and size as Python ints: an exported graph then holds them as constants, which is what lets
    # inference.runtime.graph.fuse_attention prove the layout and run this as one fused attention.
    heads = attn.num_heads
    size = attn.qkv.out_features // (3 * heads)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + bias
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, heads * size)
    return attn.proj(out)


def block_forward(block: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One timm BEiT block (pre-norm, layer scale) with the per-size relative position bias."""
    if block.gamma_1 is None:
        x = x + attention(block.attn, block.norm1(x), bias)
        return x + block.mlp(block.norm2(x))
    x = x + block.gamma_1 * attention(block.attn, block.norm1(x), bias)
    return x + block.gamma_2 * block.mlp(block.norm2(x))


@dataclass(frozen=True)
class BeitEncoderConfig:
    """Which timm BEiT to wrap and where the four decoder inputs are taken."""

    timm_name: str
    block_taps: tuple[int, int, int, int]
    features: tuple[int, int, int, int]
    resample: tuple[float, float, float, float] = (4, 2, 1, 0.5)


class BeitEncoder(nn.Module):
    """The official `pretrained` module of the BEiT DPTs: a timm BEiT plus four reassemble heads.

    Runs on any input whose sides are multiples of 16: every forward builds the relative position
    index of its own token grid (no state kept between calls, so one instance serves any sizes).
    """

    def __init__(self, cfg: BeitEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # The final norm and classifier head are kept because the checkpoints carry them; never run.
        self.model = timm.create_model(cfg.timm_name, pretrained=False)
        dim = self.model.embed_dim
        for level in range(4):
            self.add_module(f"act_postprocess{level + 1}", Reassemble(dim, cfg.features[level], cfg.resample[level]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        beit = self.model
        batch, _, height, width = x.shape
        if height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(f"BEiT input sides must be multiples of {PATCH_SIZE}, got {height}x{width}")
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        tokens = beit.patch_embed.norm(beit.patch_embed.proj(x).flatten(2).transpose(1, 2))
        tokens = torch.cat((beit.cls_token.expand(batch, -1, -1), tokens), dim=1)
        if beit.pos_embed is not None:
            tokens = tokens + beit.pos_embed
        tokens = beit.pos_drop(tokens)

        index = relative_position_index(grid, device=x.device)
        taps = self.cfg.block_taps
        features = []
        for number, block in enumerate(beit.blocks[: max(taps) + 1]):
            tokens = block_forward(block, tokens, relative_position_bias(block.attn, grid, index))
            if number in taps:
                features.append(tokens)
        return [getattr(self, f"act_postprocess{level + 1}")(feature, grid) for level, feature in enumerate(features)]


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeitDPTArch:
    encoder: BeitEncoderConfig
    decoder: DecoderConfig


class BeitDPT(nn.Module):
    """BEiT encoder + reassemble + RefineNet decoder; maps (B, 3, H, W) to (B, H, W) relative inverse depth."""

    def __init__(self, arch: BeitDPTArch, *, init_weights: bool = True):
        super().__init__()
        self.pretrained = BeitEncoder(arch.encoder)
        self.scratch = DepthDecoder(arch.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE)
        return self.scratch(self.pretrained(x), grid).squeeze(1)


# --- checkpoint conversion ----------------------------------------------------------------------

STRUCTURAL_BUFFER = "relative_position_index"


def official_to_timm_key(key: str) -> str:
    """timm 1.0 kept every BEiT name; only the index buffers became non-persistent."""
    return key


def convert_checkpoint(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official MiDaS v3.1 BEiT checkpoint -> this model's layout.

    The released files carry each block's `relative_position_index` (persistent under timm 0.6);
    timm 1.0 recomputes it and MiDaS's own attention never reads it: dropped.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("pretrained.model.") and key.endswith(STRUCTURAL_BUFFER):
            dropped.append(key)
            continue
        out[official_to_timm_key(key)] = value
    return out, dropped


# --- configs ------------------------------------------------------------------------------------

_LARGE = dict(block_taps=(5, 11, 17, 23), features=(256, 512, 1024, 1024))
_BASE = dict(block_taps=(2, 5, 8, 11), features=(96, 192, 384, 768))

BEIT_L_512 = BeitDPTArch(BeitEncoderConfig("beit_large_patch16_512", **_LARGE), dpt_decoder(_LARGE["features"]))
BEIT_L_384 = BeitDPTArch(BeitEncoderConfig("beit_large_patch16_384", **_LARGE), dpt_decoder(_LARGE["features"]))
BEIT_B_384 = BeitDPTArch(BeitEncoderConfig("beit_base_patch16_384", **_BASE), dpt_decoder(_BASE["features"]))


# --- registered variants ------------------------------------------------------------------------


def _register(name: str, arch: BeitDPTArch, size: int, description: str) -> None:
    config = NetConfig(
        name=name,
        family="beit",
        net_size=(size, size),
        resize_method="minimal",
        mean=HALF_MEAN,
        std=HALF_STD,
        description=description,
    )
    register_variant(config, arch, BeitDPT, convert_checkpoint=convert_checkpoint)


_register("DPT_BEiT_L_512", BEIT_L_512, 512,
          "MiDaS v3.1 DPT with a BEiT-L/16 encoder at 512 px: the most accurate MiDaS, the slowest.")
_register("DPT_BEiT_L_384", BEIT_L_384, 384, "MiDaS v3.1 DPT with a BEiT-L/16 encoder at 384 px.")
_register("DPT_BEiT_B_384", BEIT_B_384, 384, "MiDaS v3.1 DPT with a BEiT-B/16 encoder at 384 px.")
