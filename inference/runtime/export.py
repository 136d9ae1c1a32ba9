"""Exporting a network to ONNX (torch, no Django): the one export recipe the cache and bench/forward.py share."""
from __future__ import annotations

import warnings
from pathlib import Path

OPSET = 17
# The TorchScript exporter: the torch.export-based one (dynamo=True) took minutes for MiDaS_small here
# against seconds, for the same graph (docs/performance.md).
EXPORTER = f"torch.onnx.export (TorchScript exporter, opset {OPSET})"


def check_shapes(config) -> list[tuple[int, int]]:
    """The native input, and for networks that take any multiple a portrait and a landscape one: they prove the
    dynamic axes, and that the position tables resized inside the graph shrink and grow as eager resizes them."""
    height, width = config.net_size
    if config.fixed_input_size:
        return [(height, width)]
    step = 2 * config.ensure_multiple_of
    return [(height, width), (height - step, width), (height, width + step)]


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


