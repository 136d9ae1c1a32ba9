"""Exporting a network to ONNX (torch, no Django): the one export recipe the cache and bench/forward.py share."""
from __future__ import annotations

import warnings
from pathlib import Path

OPSET = 17
# The TorchScript exporter: the torch.export-based one (dynamo=True) took minutes for MiDaS_small here
# against seconds, for the same graph (docs/performance.md).
EXPORTER = f"torch.onnx.export (TorchScript exporter, opset {OPSET})"


# Families whose exported graph is right at every input size they take: the CNNs (dynamic height and width)
# and the encoders that take their native square only (one size). The ViT (DPT), BEiT and DINOv2 encoders
# resize their position embeddings or relative-position tables by shape arithmetic that the TorchScript
# exporter records as constants of the export size, so the graph fails at any other input size (measured:
# DPT_Large, DPT_Hybrid, DPT_BEiT_B_384 and Depth_Anything_V2_Small all fail the non-square check): those run
# eager PyTorch, without an export being tried.
ONNX_FAMILIES = frozenset({"midas_v21", "swin", "swin2", "levit"})


def onnx_supported(architecture: str) -> bool:
    from depthsite.netspecs import net_spec

    return net_spec(architecture).family in ONNX_FAMILIES


def check_shapes(config) -> list[tuple[int, int]]:
    """The native input, and for networks that take any multiple a second, non-square one (proves dynamic axes)."""
    height, width = config.net_size
    if config.fixed_input_size:
        return [(height, width)]
    return [(height, width), (height - 2 * config.ensure_multiple_of, width)]


def network_export(network, config, path: Path) -> None:
    """Write the network's ONNX graph to `path`: dynamic height and width unless it takes its native square only."""
    import torch

    from inference.health import probe_input

    height, width = config.net_size
    example = torch.from_numpy(probe_input(height, width))
    dynamic = None if config.fixed_input_size else {"image": {2: "height", 3: "width"}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings say nothing about the result
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["depth"], dynamic_axes=dynamic,
                          do_constant_folding=True)


