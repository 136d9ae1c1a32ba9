"""MiDaS v3 DPT networks: DPT_Large (ViT-L/16) and DPT_Hybrid (ResNet-50 + ViT-B/16), both at 384 px."""
from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DecoderConfig, DepthDecoder, dpt_decoder
from .registry import register_variant
from .resample import linear_matrix, resample_2d

PATCH_SIZE = 16


# --- blocks -------------------------------------------------------------------------------------


class ProjectReadout(nn.Module):
    """Concatenate the class token to every patch token (patch first) and project back to the token width."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat((patches, readout), dim=-1))


class Reassemble(nn.Sequential):
    """Token sequence -> feature map: readout, reshape to the patch grid, 1x1 conv, resample."""

    def __init__(self, dim: int, features: int, resample: float):
        layers: list[nn.Module] = [
            ProjectReadout(dim),
            # Parameter-free placeholders where the official code has its Transpose and Unflatten
            # modules, so that the conv weights sit at the checkpoint's indices 3 and 4.
            nn.Identity(),
            nn.Identity(),
            nn.Conv2d(dim, features, kernel_size=1),
        ]
        if resample > 1:
            factor = int(resample)
            layers.append(nn.ConvTranspose2d(features, features, kernel_size=factor, stride=factor))
        elif resample < 1:
            layers.append(nn.Conv2d(features, features, kernel_size=3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self[0](tokens)
        x = x.transpose(1, 2).unflatten(2, grid)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample the square patch position grid to `grid` (bilinear, half-pixel) and keep the class position."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[0, 1:]
    side = int(math.sqrt(grid_pos.shape[0]))
    if torch.onnx.is_in_onnx_export():
        # The grid is traced: resample with matrices built for it (exact identity at the native grid).
        grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid_pos = resample_2d(grid_pos, linear_matrix(grid[0], side), linear_matrix(grid[1], side))
        return torch.cat((cls_pos, grid_pos.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)
    if (side, side) == tuple(grid):
        return pos_embed
    grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat((cls_pos, grid_pos), dim=1)


@dataclass(frozen=True)
class ViTEncoderConfig:
    """Which timm ViT to wrap and where the four decoder inputs are taken."""

    timm_name: str
    # Levels < cnn_levels come straight from the hybrid's ResNet stages; the others from ViT blocks.
    cnn_levels: int
    block_taps: tuple[int, ...]
    features: tuple[int, int, int, int]
    # Per-level resampling of the 1/16 token grid: 4 and 2 transpose conv, 1 none, 0.5 strided conv.
    resample: tuple[float, float, float, float]


class ViTEncoder(nn.Module):
    """The official `pretrained` module of DPT: a timm ViT plus four reassemble heads, returning 4 feature maps.

    The ViT runs on any input whose sides are multiples of 16; the position grid is resized per call.
    """

    def __init__(self, cfg: ViTEncoderConfig, *, init_weights: bool = True):
        super().__init__()
        if len(cfg.block_taps) + cfg.cnn_levels != 4:
            raise ValueError("need exactly four feature taps")
        self.cfg = cfg
        # exportable=False: the hybrid's "same" convs and pool must pad for each call's input size.
        # The ViT's final norm and classifier head are kept because the checkpoints carry them, but
        # never run: DPT taps block outputs before the final norm.
        # weight_init="skip" when a checkpoint will replace every tensor: on the meta device timm's
        # truncated-normal init still costs ~0.1 s of Python for ViT-L, most of a meta-device load.
        self.model = timm.create_model(cfg.timm_name, pretrained=False, exportable=False,
                                       weight_init="" if init_weights else "skip")
        dim = self.model.embed_dim
        for level in range(4):
            if level < cfg.cnn_levels:
                head: nn.Module = nn.Identity()
            else:
                head = Reassemble(dim, cfg.features[level], cfg.resample[level])
            self.add_module(f"act_postprocess{level + 1}", head)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        vit = self.model
        batch, _, height, width = x.shape
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        features: list[torch.Tensor] = []

        embed = vit.patch_embed
        if self.cfg.cnn_levels:
            cnn = embed.backbone
            x = cnn.stem(x)
            for index, stage in enumerate(cnn.stages):
                x = stage(x)
                if index < self.cfg.cnn_levels:
                    features.append(x)
            x = cnn.norm(x)
        tokens = embed.proj(x).flatten(2).transpose(1, 2)

        cls = vit.cls_token.expand(batch, -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + resize_pos_embed(vit.pos_embed, grid)
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))

        taps = self.cfg.block_taps
        for index, block in enumerate(vit.blocks[: max(taps) + 1]):
            tokens = block(tokens)
            if index in taps:
                features.append(tokens)

        outputs = []
        for level, feature in enumerate(features):
            head = getattr(self, f"act_postprocess{level + 1}")
            outputs.append(head(feature) if level < self.cfg.cnn_levels else head(feature, grid))
        return outputs


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPTArch:
    """Architecture of a DPT variant."""

    encoder: ViTEncoderConfig
    decoder: DecoderConfig


class DPT(nn.Module):
    """ViT encoder + reassemble + RefineNet decoder; maps (B, 3, H, W) to (B, H, W) relative inverse depth."""

    def __init__(self, arch: DPTArch, *, init_weights: bool = True):
        super().__init__()
        self.pretrained = ViTEncoder(arch.encoder, init_weights=init_weights)
        self.scratch = DepthDecoder(arch.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE)
        return self.scratch(self.pretrained(x), grid).squeeze(1)


# --- configs ------------------------------------------------------------------------------------


DPT_LARGE = DPTArch(
    encoder=ViTEncoderConfig(
        timm_name="vit_large_patch16_384",
        cnn_levels=0,
        block_taps=(5, 11, 17, 23),
        features=(256, 512, 1024, 1024),
        resample=(4, 2, 1, 0.5),
    ),
    decoder=dpt_decoder((256, 512, 1024, 1024)),
)

DPT_HYBRID = DPTArch(
    encoder=ViTEncoderConfig(
        timm_name="vit_base_r50_s16_384",
        cnn_levels=2,
        block_taps=(8, 11),
        features=(256, 512, 768, 768),
        resample=(4, 2, 1, 0.5),
    ),
    decoder=dpt_decoder((256, 512, 768, 768)),
)


# --- registered variants ------------------------------------------------------------------------
# Names, sizes and preprocessing live in depthsite/netspecs.py (read by the catalogue without torch).

register_variant("DPT_Large", DPT_LARGE, DPT)
register_variant("DPT_Hybrid", DPT_HYBRID, DPT)
