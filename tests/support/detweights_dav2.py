"""Deterministic Depth Anything V2 checkpoints for tests, in the official key layout.

The fixtures fill every entry of the OFFICIAL state_dict (`pretrained.mask_token` included) by the
same SplitMix64 rule as the MiDaS fixtures, seeded by the official key string; a network that keeps
a tensor under another name must receive it from the official key, never regenerate it under its
own. numpy only; torch is imported lazily.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models_registry.detweights import array_digest16, det_array, official_layout

# Fixture file stem (the official encoder name) of each catalogue model.
ENCODERS = {
    "Depth_Anything_V2_Small": "vits",
    "Depth_Anything_V2_Base": "vitb",
    "Depth_Anything_V2_Large": "vitl",
}
MODELS = tuple(ENCODERS)


def det_numpy_state_dict(model: str) -> dict[str, np.ndarray]:
    """The official layout of a Depth Anything V2 model filled by the rule (numpy, no torch)."""
    return {key: det_array(key, shape, dtype) for key, shape, dtype in official_layout(model)}


def det_state_dict(model: str) -> dict:
    """The official layout of a Depth Anything V2 model filled by the rule, as torch tensors."""
    import torch

    return {key: torch.from_numpy(array) for key, array in det_numpy_state_dict(model).items()}


def per_key_digests(state_dict) -> list[tuple[str, str]]:
    """[(key, 16-hex sha256 of the float32 bytes)] in state_dict order: the fixtures' weights digest."""
    return [(key, array_digest16(np.asarray(value.cpu().numpy() if hasattr(value, "cpu") else value)))
            for key, value in state_dict.items()]


def whole_digest(digests: list[tuple[str, str]]) -> str:
    """sha256 over the concatenated per-key digests (`all_entries_sha256`)."""
    return hashlib.sha256("".join(digest for _, digest in digests).encode("ascii")).hexdigest()


def write_official_checkpoint(model: str, path: Path) -> Path:
    """A real `.pth` file as the official release ships it: a bare state_dict saved with torch.save."""
    import torch

    torch.save(det_state_dict(model), path)
    return path
