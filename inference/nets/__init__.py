"""Public API of the official MiDaS (v2.1, v3, v3.1) and Depth Anything V2 networks: configs, model factory, pre- and postprocessing."""
from __future__ import annotations

# Import order fixes the registration order, which NET_NAMES mirrors.
from . import dpt as _dpt  # noqa: F401
from . import midas as _midas  # noqa: F401
from . import beit as _beit  # noqa: F401
from . import swin as _swin  # noqa: F401
from . import levit as _levit  # noqa: F401
from . import depth_anything as _depth_anything  # noqa: F401
from .factory import checkpoint_filter_fn, create_model
from .registry import NetConfig, get_config, registered_names
from .transforms import postprocess, preprocess, target_size

NET_NAMES: tuple[str, ...] = (
    "DPT_Large",
    "DPT_Hybrid",
    "MiDaS",
    "MiDaS_small",
    # MiDaS v3.1
    "DPT_BEiT_L_512",
    "DPT_BEiT_L_384",
    "DPT_BEiT_B_384",
    "DPT_SwinV2_L_384",
    "DPT_SwinV2_B_384",
    "DPT_SwinV2_T_256",
    "DPT_Swin_L_384",
    "DPT_LeViT_224",
    # Depth Anything V2
    "Depth_Anything_V2_Small",
    "Depth_Anything_V2_Base",
    "Depth_Anything_V2_Large",
)
if registered_names() != NET_NAMES:
    raise RuntimeError(f"registry out of sync with NET_NAMES: {registered_names()}")

__all__ = [
    "NET_NAMES",
    "NetConfig",
    "get_config",
    "create_model",
    "checkpoint_filter_fn",
    "preprocess",
    "target_size",
    "postprocess",
]
