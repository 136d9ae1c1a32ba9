"""The one definition of every network variant's facts: name, family, native input and preprocessing.

Plain Python (no torch, no Django), so the catalogue, the database records, the pages and the API read
the same frozen specs that `inference.nets` builds and preprocesses with (`NetConfig` is `NetSpec`).
Adding a model is one `NetSpec` here, one catalogue entry, and a net file when its family is new.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

# "minimal": the scale closest to 1 (MiDaS DPT); "upper_bound": fit inside the native size (MiDaS v2.1);
# "lower_bound": cover the native size, the short side becomes it (Depth Anything V2).
RESIZE_METHODS = ("minimal", "upper_bound", "lower_bound")

# Families in the order users are shown them (small and old first, then newer and larger).
FAMILIES: dict[str, str] = {
    "midas_v21": "MiDaS v2.1 (CNN)",
    "dpt": "MiDaS v3 DPT (ViT)",
    "beit": "MiDaS v3.1 BEiT",
    "swin2": "MiDaS v3.1 Swin V2",
    "swin": "MiDaS v3.1 Swin",
    "levit": "MiDaS v3.1 LeViT",
    "depth_anything_v2": "Depth Anything V2",
}

OUTPUT_INTERPOLATIONS = ("bicubic", "bilinear")

# The fields that change what a network computes; family, backbone and description are labels.
FACT_FIELDS = ("name", "net_size", "resize_method", "mean", "std", "ensure_multiple_of", "keep_aspect_ratio",
               "fixed_input_size", "output_interpolation", "output_align_corners", "max_net_side")


@dataclass(frozen=True)
class NetSpec:
    """A network variant: its official name, family and the preprocessing its official transform applies."""

    name: str
    family: str
    net_size: tuple[int, int]
    resize_method: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ensure_multiple_of: int = 32
    # False: each side is scaled on its own to the native square (Swin, SwinV2, LeViT accept nothing else).
    keep_aspect_ratio: bool = True
    # True: the network takes its native net_size only (window masks and attention biases are tied to the grid).
    fixed_input_size: bool = False
    # How the prediction goes back to the image size: MiDaS's run.py bicubic, Depth Anything V2 bilinear
    # with align_corners=True.
    output_interpolation: str = "bicubic"
    output_align_corners: bool = False
    # "lower_bound" has no upper clamp: a network side above this is refused instead of exhausting memory.
    max_net_side: int | None = None
    backbone: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method must be one of {', '.join(RESIZE_METHODS)}, not {self.resize_method!r}")
        if len(self.net_size) != 2 or min(self.net_size) <= 0:
            raise ValueError(f"net_size must be a positive (height, width), not {self.net_size!r}")
        if self.ensure_multiple_of <= 0:
            raise ValueError(f"ensure_multiple_of must be positive, not {self.ensure_multiple_of!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must hold 3 values, std positive")
        if self.output_interpolation not in OUTPUT_INTERPOLATIONS:
            raise ValueError(f"output_interpolation must be one of {', '.join(OUTPUT_INTERPOLATIONS)}, "
                             f"not {self.output_interpolation!r}")
        if self.max_net_side is not None and self.max_net_side < max(self.net_size):
            raise ValueError(f"max_net_side {self.max_net_side} is below the native size {self.net_size}")

    @property
    def input_size(self) -> int:
        """The native input side in pixels (every official variant is square)."""
        return self.net_size[0]

    @property
    def family_label(self) -> str:
        return FAMILIES.get(self.family, self.family)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The facts, as shown read-only by the admin, the API and `models list --json`."""
        return {
            "input_size": self.input_size,
            "net_size": list(self.net_size),
            "resize_method": self.resize_method,
            "ensure_multiple_of": self.ensure_multiple_of,
            "keep_aspect_ratio": self.keep_aspect_ratio,
            "fixed_input_size": self.fixed_input_size,
            "interpolation": "bicubic (no antialiasing) on float64 image/255",
            "mean": list(self.mean),
            "std": list(self.std),
            "output_resize": f"{self.output_interpolation}, align_corners={self.output_align_corners}",
            "max_net_side": self.max_net_side,
        }

    def fact_differences(self, other: "NetSpec") -> list[str]:
        """Names of the fields that change the computation and differ between this spec and `other`."""
        return [name for name in FACT_FIELDS if _normal(getattr(self, name)) != _normal(getattr(other, name))]


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _midas_v31(name: str, family: str, size: int, backbone: str, *, square_only: bool) -> NetSpec:
    # Every v3.1 transform: Resize(S, S, multiple of 32, "minimal", bicubic), then (x - 0.5) / 0.5; Swin,
    # SwinV2 and LeViT stretch every photo to their native square, the only input they accept.
    return NetSpec(name=name, family=family, net_size=(size, size), resize_method="minimal", mean=HALF_MEAN,
                   std=HALF_STD, keep_aspect_ratio=not square_only, fixed_input_size=square_only, backbone=backbone)


DEPTH_ANYTHING_NATIVE = 518


def _depth_anything_v2(name: str, backbone: str) -> NetSpec:
    return NetSpec(name=name, family="depth_anything_v2", net_size=(DEPTH_ANYTHING_NATIVE,) * 2,
                   resize_method="lower_bound", mean=IMAGENET_MEAN, std=IMAGENET_STD, ensure_multiple_of=14,
                   output_interpolation="bilinear", output_align_corners=True,
                   max_net_side=4 * DEPTH_ANYTHING_NATIVE, backbone=backbone)


_SPECS: tuple[NetSpec, ...] = (
    NetSpec(name="DPT_Large", family="dpt", net_size=(384, 384), resize_method="minimal", mean=HALF_MEAN,
            std=HALF_STD, backbone="ViT-L/16",
            description="MiDaS v3 DPT-Large (ViT-L/16 encoder, 384 px): highest quality, slowest."),
    NetSpec(name="DPT_Hybrid", family="dpt", net_size=(384, 384), resize_method="minimal", mean=HALF_MEAN,
            std=HALF_STD, backbone="ViT-B/16 + ResNet-50",
            description="MiDaS v3 DPT-Hybrid (ResNet-50 + ViT-B/16 encoder, 384 px): high quality, medium speed."),
    NetSpec(name="MiDaS", family="midas_v21", net_size=(384, 384), resize_method="upper_bound", mean=IMAGENET_MEAN,
            std=IMAGENET_STD, backbone="ResNeXt-101 32x8d",
            description="MiDaS v2.1 (ResNeXt-101 32x8d encoder, 384 px): balanced quality and speed."),
    NetSpec(name="MiDaS_small", family="midas_v21", net_size=(256, 256), resize_method="upper_bound",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, backbone="EfficientNet-Lite3",
            description="MiDaS v2.1 small (EfficientNet-Lite3 encoder, 256 px): fastest, lowest quality."),
    _midas_v31("DPT_BEiT_L_512", "beit", 512, "BEiT-L/16", square_only=False),
    _midas_v31("DPT_BEiT_L_384", "beit", 384, "BEiT-L/16", square_only=False),
    _midas_v31("DPT_BEiT_B_384", "beit", 384, "BEiT-B/16", square_only=False),
    _midas_v31("DPT_SwinV2_L_384", "swin2", 384, "SwinV2-L", square_only=True),
    _midas_v31("DPT_SwinV2_B_384", "swin2", 384, "SwinV2-B", square_only=True),
    _midas_v31("DPT_SwinV2_T_256", "swin2", 256, "SwinV2-T", square_only=True),
    _midas_v31("DPT_Swin_L_384", "swin", 384, "Swin-L", square_only=True),
    _midas_v31("DPT_LeViT_224", "levit", 224, "LeViT-384", square_only=True),
    _depth_anything_v2("Depth_Anything_V2_Small", "DINOv2 ViT-S/14"),
    _depth_anything_v2("Depth_Anything_V2_Base", "DINOv2 ViT-B/14"),
    _depth_anything_v2("Depth_Anything_V2_Large", "DINOv2 ViT-L/14"),
)

NET_SPECS: dict[str, NetSpec] = {spec.name: spec for spec in _SPECS}
NET_NAMES: tuple[str, ...] = tuple(NET_SPECS)


def net_spec(name: str) -> NetSpec:
    """The spec of an official variant name (exact spelling); KeyError otherwise."""
    try:
        return NET_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(NET_NAMES)}") from None


# --- geometry of the official Resize, shared by the torch and the numpy transforms --------------------


def _to_multiple(value: float, multiple: int, max_value: int | None = None, min_value: int | None = None) -> int:
    # round() is round-half-to-even, as numpy's in the official Resize; C/JS rounding would differ at x.5.
    size = int(round(value / multiple) * multiple)
    if max_value is not None and size > max_value:
        size = int(math.floor(value / multiple) * multiple)
    if min_value is not None and size < min_value:
        size = int(math.ceil(value / multiple) * multiple)
    return size


def target_size(height: int, width: int, spec_or_name: NetSpec | str) -> tuple[int, int]:
    """The (h, w) network input size that the official Resize picks for an image of (height, width)."""
    cfg = spec_or_name if isinstance(spec_or_name, NetSpec) else net_spec(spec_or_name)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    net_h, net_w = cfg.net_size
    scale_h = net_h / height
    scale_w = net_w / width
    floor_h = floor_w = None
    if cfg.resize_method == "upper_bound":
        # Fit inside the native size.
        if cfg.keep_aspect_ratio:
            if scale_w < scale_h:
                scale_h = scale_w
            else:
                scale_w = scale_h
        limit_h, limit_w = net_h, net_w
    elif cfg.resize_method == "lower_bound":
        # Cover the native size (Depth Anything): the larger scale, never below the native size, no upper limit.
        if scale_w > scale_h:
            scale_h = scale_w
        else:
            scale_w = scale_h
        limit_h = limit_w = None
        floor_h, floor_w = net_h, net_w
    else:
        # "minimal": the scale closest to 1; no limit, so a side may exceed the native size.
        if cfg.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        limit_h = limit_w = None
    # Without keep_aspect_ratio each side is scaled on its own: every image becomes net_size exactly.
    new_h = _to_multiple(scale_h * height, cfg.ensure_multiple_of, limit_h, floor_h)
    new_w = _to_multiple(scale_w * width, cfg.ensure_multiple_of, limit_w, floor_w)
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"{height}x{width} is too elongated for {cfg.name}: network size would be {new_h}x{new_w}")
    if cfg.max_net_side is not None and max(new_h, new_w) > cfg.max_net_side:
        ratio = cfg.max_net_side / min(net_h, net_w)
        raise ValueError(
            f"{height}x{width} is too elongated for {cfg.name}: network size would be {new_h}x{new_w}, above its "
            f"limit of {cfg.max_net_side} pixels a side; crop the image to an aspect ratio of at most {ratio:g}:1"
        )
    return new_h, new_w
