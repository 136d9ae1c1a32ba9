"""Building a registered network, with or without an official checkpoint (meta-device build + assign load)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .registry import get_variant

logger = logging.getLogger(__name__)

_BN_COUNTER = "num_batches_tracked"
_REPORT_LIMIT = 5


def _unwrap(checkpoint: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """Return the bare state_dict of a checkpoint and the wrapper entries that were set aside."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        # Official training checkpoints are {"model": state_dict, "optimizer": ...}.
        return checkpoint["model"], [k for k in checkpoint if k != "model"]
    return checkpoint, []


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    *,
    convert: Optional[Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[str]]]] = None,
) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`'s state_dict layout; logs what was dropped or filled in.

    Unwraps {"model": ..., "optimizer": ...}, strips a DataParallel "module." prefix, applies the
    family's `convert` (official key names -> the timm modules of the model), fills absent
    BatchNorm `num_batches_tracked` counters with zeros, drops counters the model does not have and
    turns 1-element vectors into the scalars the model expects.
    Any other mismatch is left for `create_model` to report.
    """
    checkpoint, wrapper_keys = _unwrap(state_dict)
    expected = model.state_dict()

    prefix = "module."
    if checkpoint and all(k.startswith(prefix) for k in checkpoint) and not any(k.startswith(prefix) for k in expected):
        checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
        logger.info("checkpoint: stripped the %r prefix from every key", prefix)

    converted_away: list[str] = []
    if convert is not None:
        checkpoint, converted_away = convert(checkpoint)

    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in checkpoint.items():
        if key.endswith(_BN_COUNTER) and key not in expected:
            dropped.append(key)
            continue
        ref = expected.get(key)
        if ref is not None and ref.ndim == 0 and isinstance(value, torch.Tensor) and tuple(value.shape) == (1,):
            # Scalars saved as 1-element vectors (old torch, np.ascontiguousarray); torch's loader accepts them too.
            value = value.reshape(())
        out[key] = value

    filled = [k for k in expected if k.endswith(_BN_COUNTER) and k not in out]
    for key in filled:
        # Unused at inference; BatchNorm's own loader would fill them the same way.
        out[key] = torch.zeros((), dtype=torch.int64)

    if wrapper_keys:
        logger.info("checkpoint: unwrapped 'model', dropped wrapper entries %s", wrapper_keys)
    if converted_away:
        logger.info("checkpoint: dropped %d structural buffers or training-only entries the model does not load: %s",
                    len(converted_away), _preview(converted_away))
    if dropped:
        logger.info("checkpoint: dropped %d entries the model lacks: %s", len(dropped), _preview(dropped))
    if filled:
        logger.debug("checkpoint: filled %d absent %s counters with 0", len(filled), _BN_COUNTER)
    return out


def _preview(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _REPORT_LIMIT} more)" if len(keys) > _REPORT_LIMIT else ""
    return ", ".join(keys[:_REPORT_LIMIT]) + more


def _check_layout(name: str, state_dict: Mapping[str, Any], model: nn.Module) -> None:
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, ref in expected.items():
        value = state_dict.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(ref.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ref.shape)}")
        elif value.is_floating_point() != ref.is_floating_point():
            mismatched.append(f"{key}: checkpoint dtype {value.dtype} vs model {ref.dtype}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape/dtype mismatches ({len(mismatched)}): {_preview(mismatched)}")
    if problems:
        raise ValueError(f"checkpoint does not match the official {name} layout: " + "; ".join(problems))


def _materialise_non_persistent_buffers(
    model: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None
) -> None:
    """Recompute buffers that no checkpoint carries (they stay on the meta device after an assign-load).

    Floating buffers take `dtype`, the checkpoint's floating dtype, as `model.to(dtype)` would have given them:
    a float32 zero bias or mask next to bfloat16 weights would make the forward fail.
    """
    for module_name, module in model.named_modules():
        pending = [
            n for n, b in module._buffers.items()
            if b is not None and b.is_meta and n in module._non_persistent_buffers_set
        ]
        if not pending:
            continue
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is None:
            raise RuntimeError(f"{module_name or type(module).__name__}: cannot rebuild buffers {pending}")
        # timm 1.0 fills some buffers in place (BEiT's zero k_bias, index tables): give them storage first.
        for buffer_name in pending:
            module._buffers[buffer_name] = torch.empty_like(module._buffers[buffer_name], device=device)
        with device:
            init()
        if dtype is not None:
            for buffer_name in pending:
                buffer = module._buffers.get(buffer_name)
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                    module._buffers[buffer_name] = buffer.to(dtype)


def _first_meta_tensor(model: nn.Module) -> Union[str, None]:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            return name
    return None


def create_model(
    name: str,
    *,
    state_dict: Union[Mapping[str, Any], None] = None,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Build the official network `name` in eval mode.

    Without `state_dict` the network is initialised normally on `device`. With one, it is built on the
    meta device (no random init), the checkpoint is filtered and its tensors are adopted as-is
    (`assign=True`: mmap'd or safetensors storage is not copied), then the model is moved to `device`.
    A family whose timm modules differ from the official layout converts the official keys with its
    registered `convert_checkpoint`, run inside the generic filter.
    Raises ValueError when the checkpoint does not have the official layout.
    """
    variant = get_variant(name)
    device = torch.device(device)
    if state_dict is None:
        with device:
            model = variant.build(variant.arch)
        return model.eval()

    with torch.device("meta"):
        model = variant.build(variant.arch, init_weights=False)
    filtered = checkpoint_filter_fn(state_dict, model, convert=variant.convert_checkpoint)
    _check_layout(name, filtered, model)
    model.load_state_dict(filtered, strict=True, assign=True)

    loaded_on = next(iter(filtered.values())).device if filtered else torch.device("cpu")
    float_dtypes = {v.dtype for v in filtered.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    _materialise_non_persistent_buffers(model, loaded_on, float_dtypes.pop() if len(float_dtypes) == 1 else None)
    leftover = _first_meta_tensor(model)
    if leftover is not None:
        raise RuntimeError(f"{name}: tensor {leftover!r} was not materialised by the checkpoint")
    return model.to(device).eval()
