"""Functional health of cached weights: build the network, load strictly, run a fixed tiny input, hash the output."""
from __future__ import annotations

import hashlib

import numpy as np

PROBE_SIZE = (64, 64)
# (architecture, content digest) -> output hash, proven in this process: the same tensors give the same hash,
# so the copies of one checkpoint in several formats (and re-imports of it) build and run the network once.
_PROVEN: dict[tuple[str, str], str] = {}
_PROVEN_MAX = 64


def probe_size(architecture: str) -> tuple[int, int]:
    """PROBE_SIZE rounded up to the sizes the network accepts: 64x64 for MiDaS (x32), 70x70 for patch-14 ViTs."""
    from inference.nets import get_config

    multiple = get_config(architecture).ensure_multiple_of
    height, width = (-(-side // multiple) * multiple for side in PROBE_SIZE)
    return height, width


def probe_input(height: int = PROBE_SIZE[0], width: int = PROBE_SIZE[1]) -> np.ndarray:
    """A fixed, smooth (1, 3, H, W) float32 input in the normalised range networks see."""
    rows = np.linspace(-1.5, 1.5, height, dtype=np.float64).reshape(1, height, 1)
    cols = np.linspace(-1.0, 1.0, width, dtype=np.float64).reshape(1, 1, width)
    channels = np.array([0.5, -0.25, 1.0]).reshape(3, 1, 1)
    return (np.sin(3 * rows + channels) * np.cos(2 * cols - channels)).astype(np.float32)[None]


def output_hash(output: np.ndarray) -> str:
    """sha256 of the output rounded to 1e-3 of its range: equal for equal weights, blind to float noise."""
    output = np.asarray(output, dtype=np.float64)
    scale = float(np.max(np.abs(output))) or 1.0
    quantised = np.round(output / scale * 1000.0).astype(np.int32)
    return hashlib.sha256(quantised.tobytes()).hexdigest()


def weights_functional_hash(model, arrays: dict, *, digest: str | None = None) -> str:
    """The registry's functional check for one model's tensors (numpy arrays in the official layout);
    `digest`: their content digest when the caller has it (else it is computed here)."""
    from models_registry.formats.digest import content_digest

    key = (model.architecture, digest or content_digest(arrays))
    if key not in _PROVEN:
        if len(_PROVEN) >= _PROVEN_MAX:
            _PROVEN.pop(next(iter(_PROVEN)))
        _PROVEN[key] = _run_probe(model, arrays)
    return _PROVEN[key]


def _run_probe(model, arrays: dict) -> str:
    import torch

    from inference.nets import create_model, get_config
    from depthsite.exceptions import WeightFileError

    state_dict = {key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()}
    try:
        network = create_model(model.architecture, state_dict=state_dict, device="cpu")
    except ValueError as exc:
        raise WeightFileError(f"the network refused these weights: {exc}", extra={"kind": "functional"}) from None
    # Swin/SwinV2/LeViT accept their native square only; the others take the cheap probe.
    config = get_config(model.architecture)
    height, width = config.net_size if config.fixed_input_size else probe_size(model.architecture)
    with torch.inference_mode():
        output = network(torch.from_numpy(probe_input(height, width))).float().numpy()
    if not np.isfinite(output).all():
        raise WeightFileError("the network's output on the probe input is not finite (NaN or infinity): "
                              "the weights are damaged", extra={"kind": "functional"})
    return output_hash(output)
