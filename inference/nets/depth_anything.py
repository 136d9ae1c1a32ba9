"""Depth Anything V2 (relative depth): a DINOv2 ViT-S/B/L/14 on timm 1.0 with the official DPT head, at 518 px."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .blocks import FeatureFusionBlock, lateral_sizes
from .registry import IMAGENET_MEAN, IMAGENET_STD, NetConfig, register_variant
from .resample import cubic_matrix, resample_2d


PATCH_SIZE = 14
NATIVE_SIZE = 518  # 37 x 37 patches: the grid the position embeddings were trained on
# DINOv2 (and so Depth Anything V2) offsets the interpolation target by 0.1 of a patch to dodge a
# floating-point rounding of the output size; the offset also moves every sample point.
POS_EMBED_OFFSET = 0.1
# The longest network side accepted (4:1 images): "lower_bound" resizing has no upper clamp.
MAX_NET_SIDE = 4 * NATIVE_SIZE


# --- blocks -------------------------------------------------------------------------------------


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], *, offset: float = POS_EMBED_OFFSET
) -> torch.Tensor:
    """Resample a (1, 1 + n*n, C) class+patch position embedding to a `grid` of (rows, cols) patches.

    Bit-for-bit the official DINOv2 rule: bicubic without antialiasing, driven by the scale factor
    (rows + offset) / n, (cols + offset) / n rather than by the output size, computed in float32.
    timm's own resampling (size-driven, antialiased) moves the depth by ~2.5e-3 of its range.
    """
    num_patches = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"position embedding of {num_patches} patches is not a square grid")
    dtype = pos_embed.dtype
    embed = pos_embed.float()
    dim = embed.shape[-1]
    patch_pos = embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if torch.onnx.is_in_onnx_export():
        # The grid is traced: the same bicubic rule as matrices built for it, at every grid size.
        rows, cols = grid
        # At the native grid the embedding is used as it is (scale 1 makes both matrices the identity).
        native = torch.as_tensor((rows == side) & (cols == side))
        scales = [torch.where(native, torch.ones((), dtype=torch.float64),
                              (torch.as_tensor(size, dtype=torch.float64) + offset) / math.sqrt(num_patches)) for size in (rows, cols)]
        patch_pos = resample_2d(patch_pos, cubic_matrix(rows, side, scale=scales[0]),
                                cubic_matrix(cols, side, scale=scales[1]))
        return torch.cat((embed[:, :1], patch_pos.permute(0, 2, 3, 1).flatten(1, 2)), dim=1).to(dtype)
    rows, cols = int(grid[0]), int(grid[1])
    if (rows, cols) == (side, side):
        return pos_embed
    scale = ((rows + offset) / math.sqrt(num_patches), (cols + offset) / math.sqrt(num_patches))
    patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch_pos.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"position embedding resampled to {tuple(patch_pos.shape[-2:])}, expected {(rows, cols)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((embed[:, :1], patch_pos), dim=1).to(dtype)


class DinoV2(VisionTransformer):
    """timm's ViT (class token, LayerScale, no registers) with the official DINOv2 position interpolation.

    Built with `dynamic_img_size=True`, so the patch embedding hands `_pos_embed` an NHWC grid of any
    size; `forward_intermediates` then runs unchanged.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)), dim=1)
        return self.pos_drop(tokens + interpolate_pos_embed(self.pos_embed, (rows, cols)))


class DPTScratch(nn.Module):
    """The official `depth_head.scratch`: lateral convs, four fusion blocks and the two-part output head."""

    def __init__(self, in_channels: Sequence[int], features: int, hidden: int = 32):
        super().__init__()
        for level, cin in enumerate(in_channels, start=1):
            self.add_module(f"layer{level}_rn", nn.Conv2d(cin, features, kernel_size=3, padding=1, bias=False))
        # Registered finest first, as the official head does; refinenet4 never uses its resConfUnit1
        # (it has no lateral input), but the checkpoints carry it.
        for level in range(1, 5):
            self.add_module(
                f"refinenet{level}",
                FeatureFusionBlock(features, out_features=features, align_corners=True, skip_after_activation=False),
            )
        self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Identity(),
        )

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        l1, l2, l3, l4 = (getattr(self, f"layer{i}_rn")(f) for i, f in enumerate(features, start=1))
        to_l1, to_l2, to_l3 = lateral_sizes((size[0] // PATCH_SIZE, size[1] // PATCH_SIZE))
        path = self.refinenet4(l4, size=to_l3)
        path = self.refinenet3(path, l3, size=to_l2)
        path = self.refinenet2(path, l2, size=to_l1)
        path = self.refinenet1(path, l1)
        out = self.output_conv1(path)
        # To the input size (x1.75 from the 1/8 grid), not a x2 upsample as in MiDaS's DPT.
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return self.output_conv2(out)


class DPTHead(nn.Module):
    """Reassemble four normed token grids (1x1 projection, resample to 1/4..1/32) and decode them to depth."""

    def __init__(self, embed_dim: int, features: int, out_channels: tuple[int, int, int, int]):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(embed_dim, c, kernel_size=1) for c in out_channels)
        c1, c2, _, c4 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
            nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = DPTScratch(out_channels, features)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        # The class token is not used (the official use_clstoken=False): no readout projection.
        maps = [resize(project(f)) for f, project, resize in zip(features, self.projects, self.resize_layers)]
        return self.scratch(maps, size)


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthAnythingArch:
    """A Depth Anything V2 variant: its DINOv2 encoder, the blocks it taps, and the head widths."""

    embed_dim: int
    depth: int
    num_heads: int
    taps: tuple[int, int, int, int]
    features: int
    out_channels: tuple[int, int, int, int]


class DepthAnythingV2(nn.Module):
    """DINOv2 encoder + DPT head; maps (B, 3, H, W), H and W multiples of 14, to (B, H, W) relative inverse depth."""

    def __init__(self, arch: DepthAnythingArch, *, init_weights: bool = True):
        super().__init__()
        self.taps = arch.taps
        self.pretrained = DinoV2(
            img_size=NATIVE_SIZE,
            patch_size=PATCH_SIZE,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=4.0,
            init_values=1.0,  # LayerScale present; the checkpoint sets every gamma
            num_classes=0,
            dynamic_img_size=True,
            # weight_init="skip" when a checkpoint will replace every tensor (see dpt.py).
            weight_init="" if init_weights else "skip",
        )
        self.depth_head = DPTHead(arch.embed_dim, arch.features, arch.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(f"input {height}x{width}: both sides must be multiples of {PATCH_SIZE}")
        # Each tap goes through the final LayerNorm (the official get_intermediate_layers(norm=True)).
        features = self.pretrained.forward_intermediates(
            x, indices=list(self.taps), norm=True, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )
        depth = self.depth_head(features, (height, width))
        return F.relu(depth).squeeze(1)


# --- checkpoint conversion ----------------------------------------------------------------------

# DINOv2's masked-image-modelling token: trained, saved, never used by a forward without masks.
_TRAINING_ONLY = ("pretrained.mask_token",)


def convert_checkpoint(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official Depth Anything V2 layout -> this model's: (state_dict, dropped keys).

    timm's ViT holds the backbone under the official names (`pretrained.blocks.N.ls1.gamma`, ...), so
    the only change is dropping the training-only mask token; the factory reports what was dropped.
    """
    out = {key: value for key, value in state_dict.items() if key not in _TRAINING_ONLY}
    return out, [key for key in state_dict if key in _TRAINING_ONLY]


# --- configs ------------------------------------------------------------------------------------

DEPTH_ANYTHING_V2_SMALL = DepthAnythingArch(
    embed_dim=384, depth=12, num_heads=6, taps=(2, 5, 8, 11), features=64, out_channels=(48, 96, 192, 384)
)
DEPTH_ANYTHING_V2_BASE = DepthAnythingArch(
    embed_dim=768, depth=12, num_heads=12, taps=(2, 5, 8, 11), features=128, out_channels=(96, 192, 384, 768)
)
DEPTH_ANYTHING_V2_LARGE = DepthAnythingArch(
    embed_dim=1024, depth=24, num_heads=16, taps=(4, 11, 17, 23), features=256, out_channels=(256, 512, 1024, 1024)
)


def _config(name: str, description: str) -> NetConfig:
    return NetConfig(
        name=name,
        family="depth_anything_v2",
        net_size=(NATIVE_SIZE, NATIVE_SIZE),
        resize_method="lower_bound",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ensure_multiple_of=PATCH_SIZE,
        description=description,
        output_interpolation="bilinear",
        output_align_corners=True,
        max_net_side=MAX_NET_SIDE,
    )


# --- registered variants ------------------------------------------------------------------------

register_variant(
    _config("Depth_Anything_V2_Small", "Depth Anything V2 Small (DINOv2 ViT-S/14 encoder, 518 px, 25M parameters)."),
    DEPTH_ANYTHING_V2_SMALL,
    DepthAnythingV2,
    convert_checkpoint=convert_checkpoint,
)

register_variant(
    _config("Depth_Anything_V2_Base", "Depth Anything V2 Base (DINOv2 ViT-B/14 encoder, 518 px, 97M parameters)."),
    DEPTH_ANYTHING_V2_BASE,
    DepthAnythingV2,
    convert_checkpoint=convert_checkpoint,
)

register_variant(
    _config("Depth_Anything_V2_Large", "Depth Anything V2 Large (DINOv2 ViT-L/14 encoder, 518 px, 335M parameters)."),
    DEPTH_ANYTHING_V2_LARGE,
    DepthAnythingV2,
    convert_checkpoint=convert_checkpoint,
)
