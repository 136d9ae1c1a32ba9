"""Registry of the official network variants: each variant's spec (from depthsite.netspecs) plus its build recipe."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from depthsite.netspecs import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, NET_SPECS, RESIZE_METHODS, NetSpec

# The config callers pass around IS the torch-free spec: one definition for the nets and the catalogue.
NetConfig = NetSpec

__all__ = ["NetConfig", "Variant", "register_variant", "get_variant", "get_config", "registered_names",
           "IMAGENET_MEAN", "IMAGENET_STD", "HALF_MEAN", "HALF_STD", "RESIZE_METHODS", "CheckpointConversion"]

# convert_checkpoint(state_dict) -> (state_dict in the model's layout, dropped keys).
CheckpointConversion = Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[str]]]


@dataclass(frozen=True)
class Variant:
    """A registered variant: public config, architecture config and the family's build function."""

    config: NetConfig
    arch: Any
    build: Callable[..., nn.Module]  # build(arch, *, init_weights=True)
    # A family's conversion of an official-layout checkpoint (renamed or moved timm modules, structural
    # buffers the model recomputes); None: the official layout is the model's layout.
    convert_checkpoint: Optional[CheckpointConversion] = None


_VARIANTS: dict[str, Variant] = {}


def _canonical(config: Union[NetConfig, str]) -> NetConfig:
    """The spec of depthsite.netspecs for `config`: a net file may restate it, never contradict it."""
    name = config if isinstance(config, str) else config.name
    spec = NET_SPECS.get(name)
    if spec is None:
        raise ValueError(f"variant {name!r} has no NetSpec: add it to depthsite/netspecs.py first")
    if not isinstance(config, str):
        differing = spec.fact_differences(config)
        if differing:
            details = "; ".join(f"{field}: {getattr(config, field)!r} here, {getattr(spec, field)!r} in the spec"
                                for field in differing)
            raise ValueError(f"variant {name!r} contradicts depthsite/netspecs.py ({details})")
    return spec


def register_variant(config: Union[NetConfig, str], arch: Any, build: Callable[..., nn.Module], *,
                     convert_checkpoint: Optional[CheckpointConversion] = None) -> None:
    """Register a build recipe under a spec (or its name); the stored config is always the spec itself."""
    spec = _canonical(config)
    if spec.name in _VARIANTS:
        raise ValueError(f"variant {spec.name!r} is already registered")
    _VARIANTS[spec.name] = Variant(config=spec, arch=arch, build=build, convert_checkpoint=convert_checkpoint)


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
