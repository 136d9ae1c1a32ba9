"""What the fidelity tests of every family share: the fixtures' metric and tolerance, the checks against a
golden output, and the network a module builds once."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from inference.nets import create_model, postprocess, preprocess
from models_registry.detweights import net_input, synthetic_image

# Recommended by the fixtures for net-only and for end-to-end with a non-antialiased bicubic resize.
TOLERANCE = 2e-5
IMAGE_SIZES = [(240, 320), (500, 375)]
# Why a larger member of a family skips a golden whose code path its family's smallest member's golden proves.
SAME_PATH = "same code path as the smaller model of its family; too slow to repeat on two cores"


def relative_error(candidate: np.ndarray, golden: np.ndarray) -> float:
    """max |candidate - golden| / (golden.max() - golden.min()), the fixtures' metric."""
    assert candidate.shape == golden.shape, (candidate.shape, golden.shape)
    return float(np.abs(candidate.astype(np.float64) - golden).max() / (golden.max() - golden.min()))


def loaded_network(name: str, state_dict_for: Callable[[str], dict]) -> Iterator[tuple[str, torch.nn.Module, dict]]:
    """(name, network, state_dict) for a module-scoped fixture: the network adopts the checkpoint tensors (no
    second copy); both are dropped when the module is done with them."""
    state_dict = state_dict_for(name)
    model = create_model(name, state_dict=state_dict)
    yield name, model, state_dict
    del model, state_dict
    gc.collect()


def assert_net_matches(model: torch.nn.Module, height: int, width: int, golden_path: Path, label: str) -> None:
    """The network on the fixtures' net-only input of (height, width) is within TOLERANCE of the golden."""
    with torch.inference_mode():
        out = model(torch.from_numpy(net_input(height, width)))
    assert out.shape == (1, height, width) and out.dtype == torch.float32
    error = relative_error(out[0].numpy(), np.load(golden_path))
    assert error <= TOLERANCE, f"{label} {height}x{width}: relative error {error:.2e}"


def assert_end_to_end_matches(model: torch.nn.Module, config, height: int, width: int, golden_path: Path,
                              label: str, *, output_config=None) -> None:
    """Preprocess the synthetic image with `config`, run, resize the output to (height, width) as
    `output_config` says (None: MiDaS run.py's bicubic): within TOLERANCE of the golden."""
    with torch.inference_mode():
        depth = postprocess(model(preprocess(synthetic_image(height, width), config)), (height, width), output_config)
    assert depth.shape == (height, width) and depth.dtype == np.float32
    error = relative_error(depth, np.load(golden_path))
    assert error <= TOLERANCE, f"{label} {height}x{width}: relative error {error:.2e}"
