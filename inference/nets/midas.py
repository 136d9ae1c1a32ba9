"""MiDaS v2.1 convolutional networks: MidasNet (ResNeXt-101 32x8d) and MidasNet_small (EfficientNet-Lite3)."""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from .blocks import DecoderConfig, DepthDecoder
from .registry import register_variant


# --- blocks -------------------------------------------------------------------------------------


class StagedEncoder(nn.Module):
    """Four sequential CNN stages; the forward returns every stage's output (strides 4, 8, 16, 32)."""

    def __init__(self, layer1: nn.Module, layer2: nn.Module, layer3: nn.Module, layer4: nn.Module):
        super().__init__()
        self.layer1 = layer1
        self.layer2 = layer2
        self.layer3 = layer3
        self.layer4 = layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return f1, f2, f3, f4


def _timm_backbone(timm_name: str) -> nn.Module:
    # exportable=False: timm's exportable "same" convs freeze their padding at the first input size.
    return timm.create_model(timm_name, pretrained=False, num_classes=0, exportable=False)


def resnet_encoder(timm_name: str) -> StagedEncoder:
    """Regroup a timm ResNet as the official `pretrained` module (stem + layer1 in one Sequential)."""
    net = _timm_backbone(timm_name)
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool, net.layer1)
    return StagedEncoder(stem, net.layer2, net.layer3, net.layer4)


def efficientnet_encoder(timm_name: str) -> StagedEncoder:
    """Regroup a timm EfficientNet's stem and 7 block stages as the official `pretrained` module."""
    net = _timm_backbone(timm_name)
    blocks = net.blocks
    # timm folds the stem activation into bn1; the Identity keeps the official indices layer1.3/layer1.4.
    stem = nn.Sequential(net.conv_stem, net.bn1, nn.Identity(), blocks[0], blocks[1])
    return StagedEncoder(
        stem,
        nn.Sequential(blocks[2]),
        nn.Sequential(blocks[3], blocks[4]),
        nn.Sequential(*blocks[5:]),
    )


_ENCODERS = {"resnet": resnet_encoder, "efficientnet": efficientnet_encoder}


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MidasArch:
    """Architecture of a MidasNet variant."""

    encoder: str
    timm_name: str
    decoder: DecoderConfig


class MidasNet(nn.Module):
    """CNN encoder + RefineNet decoder; maps (B, 3, H, W) to (B, H, W) relative inverse depth."""

    def __init__(self, arch: MidasArch, *, init_weights: bool = True):
        # init_weights is accepted for the common build signature; timm's CNN init is cheap on meta.
        super().__init__()
        self.pretrained = _ENCODERS[arch.encoder](arch.timm_name)
        self.scratch = DepthDecoder(arch.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(self.pretrained(x)).squeeze(1)


# --- configs ------------------------------------------------------------------------------------

MIDAS_V21 = MidasArch(
    encoder="resnet",
    timm_name="resnext101_32x8d",
    decoder=DecoderConfig(
        in_channels=(256, 512, 1024, 2048),
        widths=(256, 256, 256, 256),
        fusion_out_conv=False,
        skip_after_activation=True,
        fusion_align_corners=True,
        head_align_corners=False,
        coarse_first=True,
    ),
)

MIDAS_V21_SMALL = MidasArch(
    encoder="efficientnet",
    timm_name="tf_efficientnet_lite3",
    decoder=DecoderConfig(
        in_channels=(32, 48, 136, 384),
        widths=(64, 128, 256, 512),
        fusion_out_conv=True,
        skip_after_activation=False,
        fusion_align_corners=True,
        head_align_corners=False,
        coarse_first=True,
    ),
)


# --- registered variants ------------------------------------------------------------------------
# Names, sizes and preprocessing live in depthsite/netspecs.py (read by the catalogue without torch).

register_variant("MiDaS", MIDAS_V21, MidasNet)
register_variant("MiDaS_small", MIDAS_V21_SMALL, MidasNet)
