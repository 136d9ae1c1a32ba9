"""One rewrite of an exported ONNX graph (onnx only, no torch, no Django): zero padding folded into the convolution.

timm's TensorFlow-style "same" convolutions (MiDaS_small's EfficientNet-Lite3) pad their input on one side more
than the other before each stride-2 convolution. Exported with a fixed padding (inference.runtime.export), each
is a Pad node feeding a Conv. ONNX Runtime keeps the Pad (its own fusion did not fire on these graphs): a copy of
the feature map, and a change of memory layout before and after it. A Conv takes asymmetric padding itself, so
the Pad's amounts move into the Conv's `pads` and the Pad goes: the same sums over the same zeros. MiDaS_small's
forward took 0.94x the time, with outputs bit-identical (docs/performance.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np

# What a constant subgraph may be made of: torch writes a fixed padding as a small chain of these.
_CONSTANT_OPS = {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Squeeze",
                 "Unsqueeze", "Identity"}


def _attribute(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _constant_value(model, name: str, producers: dict, initializers: dict) -> np.ndarray | None:
    """The value of tensor `name` when it depends on no graph input (only constants and initializers); else None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    needed, used, stack = [], set(), [name]
    while stack:
        tensor = stack.pop()
        if tensor in initializers:
            used.add(tensor)
            continue
        node = producers.get(tensor)
        if node is None or node.op_type not in _CONSTANT_OPS:
            return None  # a graph input, or an operation this pass does not evaluate
        if node not in needed:
            needed.append(node)
            stack.extend(i for i in node.input if i)
    order = [node for node in model.graph.node if node in needed]  # the graph's own (topological) order
    probe = helper.make_model(
        helper.make_graph(order, "constant", [], [helper.make_tensor_value_info(name, 0, None)],
                          [initializers[t] for t in used]),
        opset_imports=model.opset_import)
    return np.asarray(ReferenceEvaluator(probe).run(None, {})[0])


def fold_pads_into_convs(model) -> int:
    """Fold each zero Pad of fixed amounts that feeds one Conv alone into that Conv's `pads`; how many were folded.

    Only 4-D tensors padded in their two spatial axes, by amounts no graph input changes; the Conv must not set
    auto_pad. `model` (an onnx ModelProto) is changed in place."""
    from onnx import helper

    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # An initializer that is also a graph input is only a default: a caller may feed another value.
    inputs = {value.name for value in graph.input}
    initializers = {tensor.name: tensor for tensor in graph.initializer if tensor.name not in inputs}
    outputs = {output.name for output in graph.output}
    folded = []
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        mode = _attribute(pad, "mode", b"constant")
        users = consumers.get(pad.output[0], [])
        if (mode not in (b"constant", "constant") or len(pad.input) < 2 or len(pad.input) > 3
                or pad.output[0] in outputs or len(users) != 1 or users[0].op_type != "Conv"):
            continue
        conv = users[0]
        if _attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or conv.input[0] != pad.output[0]:
            continue
        if len(pad.input) == 3 and pad.input[2]:
            fill = _constant_value(model, pad.input[2], producers, initializers)
            if fill is None or np.any(fill != 0):
                continue
        amounts = _constant_value(model, pad.input[1], producers, initializers)
        if amounts is None or amounts.shape != (8,):
            continue
        n_begin, c_begin, h_begin, w_begin, n_end, c_end, h_end, w_end = (int(v) for v in amounts)
        if n_begin or c_begin or n_end or c_end or min(h_begin, w_begin, h_end, w_end) < 0:
            continue
        top, left, bottom, right = _attribute(conv, "pads", [0, 0, 0, 0])
        for attribute in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute(
            "pads", [top + h_begin, left + w_begin, bottom + h_end, right + w_end]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    # The constants that only fed the folded Pads are left: ONNX Runtime drops unused nodes when it loads.
    return len(folded)
