"""Registry of the official MiDaS network variants: public per-variant configuration plus its build recipe."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Optional

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
# "minimal": the scale closest to 1; "upper_bound": fit inside the native size; "lower_bound": cover it.
RESIZE_METHODS = ("minimal", "upper_bound", "lower_bound")


@dataclass(frozen=True)
class NetConfig:
    """What callers need to know about a variant: its official name and its preprocessing."""

    name: str
    family: str
    net_size: tuple[int, int]
    resize_method: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ensure_multiple_of: int = 32
    description: str = ""
    # How the prediction is resized back to the image: MiDaS's run.py uses bicubic without
    # align_corners, Depth Anything V2's infer_image bilinear with align_corners=True.
    output_interpolation: str = "bicubic"
    output_align_corners: bool = False
    # "lower_bound" has no upper clamp (a 100x1000 image becomes 518x5180): a network side above this
    # is refused instead of exhausting memory. None: no limit (the other methods are bounded anyway).
    max_net_side: Optional[int] = None
    # False: each side is scaled to the native size on its own (Swin, SwinV2, LeViT: the official
    # transforms stretch every image to the native square).
    keep_aspect_ratio: bool = True
    # True: the network accepts its native net_size only (window masks and attention biases are
    # tied to the token grid); any other input is refused with a ValueError.
    fixed_input_size: bool = False

    def __post_init__(self) -> None:
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method must be one of {', '.join(RESIZE_METHODS)}, not {self.resize_method!r}")
        if self.output_interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"output_interpolation must be 'bicubic' or 'bilinear', not {self.output_interpolation!r}")


@dataclass(frozen=True)
class Variant:
    """A registered variant: public config, architecture config and the family's build function."""

    config: NetConfig
    arch: Any
    build: Callable[..., nn.Module]  # build(arch, *, init_weights=True)
    # The family's conversion of an official-layout checkpoint to the model's own layout (renamed
    # or moved timm modules, structural buffers the model recomputes): (state_dict) -> (state_dict,
    # dropped keys). None: the official layout is the model's layout.
    convert_checkpoint: Optional[Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[str]]]] = None


_VARIANTS: dict[str, Variant] = {}


def register_variant(
    config: NetConfig,
    arch: Any,
    build: Callable[..., nn.Module],
    *,
    convert_checkpoint: Optional[Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[str]]]] = None,
) -> None:
    if config.name in _VARIANTS:
        raise ValueError(f"variant {config.name!r} is already registered")
    _VARIANTS[config.name] = Variant(config=config, arch=arch, build=build, convert_checkpoint=convert_checkpoint)


def get_variant(name: str) -> Variant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(_VARIANTS)}") from None


def get_config(name: str) -> NetConfig:
    """The NetConfig of an official variant name (exact spelling); KeyError otherwise."""
    return get_variant(name).config


def registered_names() -> tuple[str, ...]:
    return tuple(_VARIANTS)
