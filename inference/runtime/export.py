"""Exporting a network to ONNX (torch, no Django): the one export recipe the cache and bench/forward.py share."""
from __future__ import annotations

import logging
import os
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

OPSET = 17
# The TorchScript exporter: the torch.export-based one (dynamo=True) took minutes for MiDaS_small here
# against seconds, for the same graph (docs/performance.md).
EXPORTER = f"torch.onnx.export (TorchScript exporter, opset {OPSET})"
# The versions of this file's recipe (the export, the padding fixed, the attention fused, SwinV2's scores), each
# with the network families whose graphs it changed (None: every family). An artifact records its family's latest
# (WeightFile.export_recipe, export_recipe below): one of another recipe is rebuilt on its next use (one of an
# earlier recipe is still used where the rebuild fails). Add a version with any change after which an artifact
# built before it would run slower or compute otherwise than a rebuild, naming only the families whose graph it
# changes, so that the others' artifacts are kept; a change to what the graph takes or gives is another format.
# 1: the first recorded, with BEiT's attention fused (artifacts from before it record 0).
# 2: SwinV2's per-head score scale moved onto the queries, its normalising Expands dropped (2026-12-07, Zen 5).
COSINE_ATTENTION_FAMILIES = frozenset({"swin2"})  # the families recipe 2's rewrites run on (network_export)
RECIPES: tuple[tuple[int, frozenset[str] | None], ...] = ((1, None), (2, COSINE_ATTENTION_FAMILIES))


def export_recipe(architecture: str) -> int:
    """The recipe an artifact of this network is built by, and must have been built by to be served: the latest
    version that changed its family's graph (no torch: read from depthsite.netspecs)."""
    from depthsite.netspecs import net_spec

    family = net_spec(architecture).family
    return max((number for number, families in RECIPES if families is None or family in families), default=0)


def check_shapes(config) -> list[tuple[int, int]]:
    """The native input, and for networks that take any multiple a portrait and a landscape one: they prove the
    dynamic axes, and that the position tables resized inside the graph shrink and grow as eager resizes them."""
    height, width = config.net_size
    if config.fixed_input_size:
        return [(height, width)]
    # The portrait is one multiple shorter, the landscape two wider: with the native size an even multiple (every
    # catalogue network's), both parities of a multiple are checked: fixed_same_padding's exactness follows from
    # divisibility alone, and these sizes are where a wrong fixed padding would show against eager.
    step = config.ensure_multiple_of
    return [(height, width), (height - step, width), (height, width + 2 * step)]


def network_export(network, config, path: Path, *, fix_padding: bool = True, fuse_attention: bool = True,
                   cosine_attention: bool = True) -> None:
    """Write the network's ONNX graph to `path`: dynamic height and width unless it takes its native square only.

    `fix_padding=False` keeps timm's "same" padding worked out at run time, `fuse_attention=False` the ViT, DINOv2
    and BEiT blocks' attention as separate MatMul, Softmax and MatMul nodes, `cosine_attention=False` SwinV2's
    score scale and normalisation as exported (bench/forward_candidates.py's comparisons); artifacts are always
    built with the padding fixed where that is exact (fixed_same_padding), the attention fused where the graph has
    the pattern (inference.runtime.graph.fuse_attention), and SwinV2's scale on its queries and its norms not
    expanded (graph.scale_queries, graph.unexpand_divisors; COSINE_ATTENTION_FAMILIES only)."""
    import torch

    from inference.health import probe_input

    height, width = config.net_size
    example = torch.from_numpy(probe_input(height, width))
    dynamic = None if config.fixed_input_size else {"image": {2: "height", 3: "width"}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
            fixed_same_padding(network, config, enabled=fix_padding) as fixed:
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings say nothing about the result
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["depth"], dynamic_axes=dynamic,
                          do_constant_folding=True)
    from inference.runtime import graph

    name = type(network).__name__
    rewrites = [(graph.fold_pads_into_convs, f"folding the fixed padding of {name} into its convolutions")] if fixed \
        else []
    if fuse_attention:
        rewrites.append((graph.fuse_attention, f"fusing the self-attention of {name}"))
    if cosine_attention and getattr(config, "family", None) in COSINE_ATTENTION_FAMILIES:
        # Only where recipe 2 says it changed the graph: another family's recipe-1 artifacts are kept as they are.
        rewrites.append((graph.scale_queries, f"moving the score scales of {name} onto its queries"))
        rewrites.append((graph.unexpand_divisors, f"dividing by the unexpanded norms of {name}"))
    if rewrites:
        _graph_rewrite(path, rewrites)


def _graph_rewrite(path: Path, rewrites) -> int:
    """Apply rewrites of inference.runtime.graph, each (function, what it does), to the ONNX file at `path`: one
    load and one save for all of them (a large network's graph is over a GB); how many places they changed.

    A rewrite that fails leaves the file as the ones before it left it (the graph as exported is right, only
    slower), said in the log; nothing half-written ever stands under `path`."""
    import onnx

    model = onnx.load(str(path))
    staged = path.with_name(f"{path.name}.rewrite")
    changed = 0
    done = []
    for rewrite, what in rewrites:
        try:
            changed += rewrite(model)
            done.append(rewrite)
        except Exception:  # noqa: BLE001 - see above
            logger.warning("%s failed; the graph stays as it was", what, exc_info=True)
            # `path` is untouched until the end: start again from it, with the rewrites that worked.
            model = onnx.load(str(path))
            changed = sum(earlier(model) for earlier in done)
    if not changed:
        return 0
    try:
        onnx.save(model, str(staged))
        os.replace(staged, path)
    except Exception:  # noqa: BLE001 - e.g. over protobuf's 2 GB: the exported file stands
        logger.warning("saving the rewritten graph of %s failed; the graph stays as exported", path.name,
                       exc_info=True)
        staged.unlink(missing_ok=True)
        return 0
    return changed


@contextmanager
def fixed_same_padding(network, config, *, enabled: bool = True) -> Iterator[int]:
    """While exporting, timm's "same" convolutions pad by fixed amounts wherever every input the network is given
    makes those amounts the same; yields how many were fixed.

    Such a convolution works its padding out from its input's size at run time, and the graph then carries that
    arithmetic and a Pad that ONNX Runtime does not fold into the Conv. With a stride s, the padding of an axis
    does not depend on the size when the size is a multiple of s. A network input is always a multiple of
    `ensure_multiple_of` (or the native square), so a layer that sees the input shrunk by r gets a multiple of s
    whenever r * s divides it. That is checked for each layer at two input sizes (the ratio r is measured, not
    assumed) before any is fixed; the artifact's check against eager at three sizes (an odd and an even multiple
    among them) then tests the graph."""
    import torch
    import torch.nn.functional as F

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg  # the amounts timm's own pad_same computes
    except ImportError:  # an older timm: nothing to fix
        yield 0
        return
    convs = {name: module for name, module in network.named_modules() if isinstance(module, Conv2dSame)}
    if not convs or not enabled:
        yield 0
        return
    height, width = config.net_size
    step = config.ensure_multiple_of
    sizes = [(height, width)] if config.fixed_input_size else [(height, width), (height + step, width + 2 * step)]
    seen: dict[str, list[tuple[int, int]]] = {name: [] for name in convs}
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(tuple(args[0].shape[-2:])))
             for name, module in convs.items()]
    training = network.training
    try:
        network.eval()  # zeros through a network in training mode would move its batch-norm statistics
        with torch.no_grad():
            for size in sizes:
                network(torch.zeros(1, 3, *size))
    finally:
        network.train(training)
        for hook in hooks:
            hook.remove()
    fixed: dict[str, tuple[int, ...]] = {}
    for name, module in convs.items():
        if len(seen[name]) != len(sizes):
            continue  # called more or less than once a forward: not a layer this can reason about
        if not config.fixed_input_size and any(net % got or step % (net // got * stride)
                                               for size, got_size in zip(sizes, seen[name])
                                               for net, got, stride in zip(size, got_size, module.stride)):
            continue  # this layer's input size is not always a multiple of its stride
        amounts = {tuple(pad_same_arg(list(got), module.kernel_size, module.stride, module.dilation))
                   for got in seen[name]}
        if len(amounts) == 1:
            fixed[name] = amounts.pop()

    def padded_then_convolved(module, x):
        return F.conv2d(F.pad(x, module.fixed_padding), module.weight, module.bias, module.stride, (0, 0),
                        module.dilation, module.groups)

    before = {name: vars(convs[name]).get("forward") for name in fixed}  # a forward set on the instance, if any
    try:
        for name, amounts in fixed.items():
            module = convs[name]
            module.fixed_padding = amounts
            module.forward = types.MethodType(padded_then_convolved, module)
        yield len(fixed)
    finally:
        for name, forward in before.items():
            del convs[name].forward, convs[name].fixed_padding
            if forward is not None:
                convs[name].forward = forward


