"""Rewrites of an exported ONNX graph (onnx only, no torch, no Django): zero padding folded into the convolution,
the self-attention of ViT, DINOv2 and BEiT blocks run by ONNX Runtime's fused MultiHeadAttention (fuse_attention),
and two passes over SwinV2's (N, N) scores and its normalised queries and keys saved (scale_queries,
unexpand_divisors).

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
                 "Unsqueeze", "Identity", "Clip", "Exp"}  # SwinV2's logit scale: exp(min(parameter, log 100))


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


def _graph_index(graph) -> tuple[dict, dict, dict, set]:
    """{tensor: the node making it}, {tensor: the nodes reading it}, {name: constant initializer}, output names."""
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # An initializer that is also a graph input is only a default: a caller may feed another value.
    inputs = {value.name for value in graph.input}
    initializers = {tensor.name: tensor for tensor in graph.initializer if tensor.name not in inputs}
    return producers, consumers, initializers, {output.name for output in graph.output}


def _ranks(model) -> dict[str, int]:
    """{tensor: its rank} where ONNX's shape inference proves it, read from a copy of the graph whose initializers
    are declared (type and shape) rather than carried: the weights' bytes are neither copied nor read."""
    from onnx import helper, shape_inference

    graph = model.graph
    given = {value.name for value in graph.input}
    declared = [helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                for tensor in graph.initializer if tensor.name not in given]
    skeleton = helper.make_model(helper.make_graph(graph.node, "ranks", list(graph.input) + declared,
                                                   list(graph.output)), opset_imports=model.opset_import)
    inferred = shape_inference.infer_shapes(skeleton).graph
    return {value.name: len(value.type.tensor_type.shape.dim)
            for value in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")}


def fold_pads_into_convs(model) -> int:
    """Fold each zero Pad of fixed amounts that feeds one Conv alone into that Conv's `pads`; how many were folded.

    Only 4-D tensors padded in their two spatial axes, by amounts no graph input changes; the Conv must not set
    auto_pad. `model` (an onnx ModelProto) is changed in place."""
    from onnx import helper

    graph = model.graph
    producers, consumers, initializers, outputs = _graph_index(graph)
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


def _scalar_constant(model, name: str, producers: dict, initializers: dict) -> float | None:
    value = _constant_value(model, name, producers, initializers)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _made_by(producers: dict, tensor: str, op_type: str):
    """The node of type `op_type` that makes `tensor`; None when another kind of node (or none) makes it."""
    node = producers.get(tensor)
    return node if node is not None and node.op_type == op_type else None


def _is_default_scale_root(tensor: str, query: str, producers: dict, model, initializers: dict) -> bool:
    """Whether `tensor` is torch's export of scaled_dot_product_attention's default scale for `query`,
    1 / sqrt(its last dimension) (q and k are each multiplied by the square root of it):
    Cast(Div(1, Sqrt(Cast(Slice(Shape(query), -1)))))."""
    cast = _made_by(producers, tensor, "Cast")
    divide = _made_by(producers, cast.input[0], "Div") if cast is not None else None
    root = _made_by(producers, divide.input[1], "Sqrt") if divide is not None else None
    size = _made_by(producers, root.input[0], "Cast") if root is not None else None
    last = _made_by(producers, size.input[0], "Slice") if size is not None else None
    shape = _made_by(producers, last.input[0], "Shape") if last is not None else None
    if shape is None or shape.input[0] != query or len(last.input) < 3:
        return False
    starts = _constant_value(model, last.input[1], producers, initializers)
    return (starts is not None and list(starts.reshape(-1)) == [-1]
            and _scalar_constant(model, divide.input[0], producers, initializers) == 1.0)


def _scaled_query_key(model, scores, producers: dict, initializers: dict) -> tuple[str, str, float | None] | None:
    """(q, k, scale) of a score MatMul of one of the two forms exported for q @ k^T scaled; None for any other.

    - scaled_dot_product_attention with its default scale: q and k^T each multiplied by the square root of
      1/sqrt(D); the scale is then MultiHeadAttention's own default (None).
    - the explicit `(q * scale) @ k.transpose(-2, -1)` (BEiT): q times one positive constant, k^T as it is.
      Positive, because the node reads a scale of 0 as unset (and then uses 1/sqrt(D)); no softmax scale is
      negative in practice."""
    q_scaled = _made_by(producers, scores.input[0], "Mul")
    if q_scaled is None:
        return None
    k_scaled = _made_by(producers, scores.input[1], "Mul")
    if k_scaled is not None:
        q_root, k_root = _made_by(producers, q_scaled.input[1], "Sqrt"), _made_by(producers, k_scaled.input[1], "Sqrt")
        k_turned = _made_by(producers, k_scaled.input[0], "Transpose")
        if (q_root is None or k_root is None or k_turned is None or q_root.input[0] != k_root.input[0]
                or list(_attribute(k_turned, "perm", [])) != [0, 1, 3, 2]
                or not _is_default_scale_root(q_root.input[0], q_scaled.input[0], producers, model, initializers)):
            return None
        return q_scaled.input[0], k_turned.input[0], None
    k_turned = _made_by(producers, scores.input[1], "Transpose")
    if k_turned is None or list(_attribute(k_turned, "perm", [])) != [0, 1, 3, 2]:
        return None
    for query, factor in ((0, 1), (1, 0)):  # q * scale or scale * q; the caller checks that q is the split's
        scale = _scalar_constant(model, q_scaled.input[factor], producers, initializers)
        if scale is not None and scale > 0:
            return q_scaled.input[query], k_turned.input[0], scale
    return None


def _is_head_bias(model, tensor: str, producers: dict, initializers: dict) -> bool:
    """Whether `tensor`, added to the (B, H, N, N) scores, is provably of rank 4, as MultiHeadAttention's
    attention_bias must be: a rank-3 tensor with its axes moved (a Transpose of three) and an axis of one put in
    front (Unsqueeze at 0), as BEiT's relative position bias (H, N, N) -> (1, H, N, N) is exported. The sizes
    themselves are checked by the runtime and, for an artifact, by its comparison with eager."""
    unsqueeze = _made_by(producers, tensor, "Unsqueeze")
    if unsqueeze is None:
        return False
    axes = (_constant_value(model, unsqueeze.input[1], producers, initializers) if len(unsqueeze.input) > 1
            else _attribute(unsqueeze, "axes"))
    turned = _made_by(producers, unsqueeze.input[0], "Transpose")
    return (axes is not None and list(np.asarray(axes).reshape(-1)) == [0] and turned is not None
            and len(_attribute(turned, "perm", [])) == 3)


def fuse_attention(model) -> int:
    """Replace each self-attention of a ViT, DINOv2 or BEiT block, as torch exports it, by one
    com.microsoft.MultiHeadAttention node; how many were replaced.

    The exported pattern takes the packed projection (B, N, 3E), reshapes it to (B, N, 3, H, D), moves the axes,
    splits q, k and v, scales q and k by the square root of 1/sqrt(D), and runs MatMul, Softmax and MatMul, then
    merges the heads back to (B, N, E). ONNX Runtime fuses none of it, and materialises every (N, N) score matrix;
    its MultiHeadAttention computes the same from q, k and v as (B, N, E) slices of the projection. BEiT's explicit
    form is matched too: q times a positive constant (the node's `scale`), and a relative position bias of rank 4
    added to the scores (its `attention_bias`; _is_head_bias). Anything else (a mask of unproven rank, another
    scale, another layout) is left as it is. `model` is changed in place; nodes only the replaced attention used
    are removed."""
    from onnx import TensorProto, helper

    graph = model.graph
    producers, consumers, initializers, outputs = _graph_index(graph)

    def made_by(tensor: str, op_type: str):
        return _made_by(producers, tensor, op_type)

    def only_user(tensor: str, op_type: str):
        users = consumers.get(tensor, [])
        if tensor in outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        return users[0]

    def constants(tensors) -> list[int] | None:
        values = [_constant_value(model, name, producers, initializers) for name in tensors]
        if any(value is None or value.size != 1 for value in values):
            return None
        return [int(value.reshape(-1)[0]) for value in values]

    replacements = []
    for softmax in [node for node in graph.node if node.op_type == "Softmax"]:
        if _attribute(softmax, "axis", -1) not in (-1, 3):
            continue
        context = only_user(softmax.output[0], "MatMul")
        if context is None or context.input[0] != softmax.output[0]:
            continue
        scores, bias = made_by(softmax.input[0], "MatMul"), None
        added = made_by(softmax.input[0], "Add") if scores is None else None
        for mine, other in ((0, 1), (1, 0)) if added is not None else ():  # scores + bias, either way round
            scores = made_by(added.input[mine], "MatMul")
            if scores is not None:
                bias = added.input[other]
                break
        if scores is None or (bias is not None and not _is_head_bias(model, bias, producers, initializers)):
            continue
        matched = _scaled_query_key(model, scores, producers, initializers)
        if matched is None:
            continue
        q_tensor, k_tensor, scale = matched
        q, k, v = (made_by(name, "Squeeze") for name in (q_tensor, k_tensor, context.input[1]))
        if q is None or k is None or v is None:
            continue
        split = made_by(q.input[0], "Split")
        if (split is None or list(split.output) != [q.input[0], k.input[0], v.input[0]]
                or _attribute(split, "axis", 0) != 0
                or constants([squeeze.input[1] for squeeze in (q, k, v) if len(squeeze.input) > 1]) != [0, 0, 0]):
            continue
        if len(split.input) > 1 and split.input[1]:
            sizes = _constant_value(model, split.input[1], producers, initializers)
            if sizes is None or list(sizes.reshape(-1)) != [1, 1, 1]:
                continue
        heads_apart = made_by(split.input[0], "Transpose")
        unpacked = made_by(heads_apart.input[0], "Reshape") if heads_apart is not None else None
        if unpacked is None or list(_attribute(heads_apart, "perm", [])) != [2, 0, 3, 1, 4]:
            continue
        shape = made_by(unpacked.input[1], "Concat")
        heads_together = only_user(context.output[0], "Transpose")
        merged = only_user(heads_together.output[0], "Reshape") if heads_together is not None else None
        if shape is None or len(shape.input) != 5 or merged is None:
            continue
        three, heads, size = constants(shape.input[2:]) or (0, 0, 0)
        merged_shape = made_by(merged.input[1], "Concat")
        if (three != 3 or heads < 1 or size < 1 or list(_attribute(heads_together, "perm", [])) != [0, 2, 1, 3]
                or merged_shape is None or len(merged_shape.input) != 3
                or constants(merged_shape.input[2:]) != [heads * size]):
            continue
        # The projection is reshaped to (d0, d1, 3E) with the same two leading sizes the exported Reshape used,
        # split into q, k and v, and attended; the exported merge Reshape then reads the result. Exact whatever
        # those sizes are: (d0, d1, 3, H, D) and (d0, d1, 3E) hold the same numbers in the same order.
        packed, out, width = unpacked.input[0], merged.output[0], heads * size
        label = merged.name or out
        allowzero = _attribute(unpacked, "allowzero")  # only where the exported Reshape had it (opset 14 and on)
        names = {part: f"{out}/{part}" for part in ("width", "shape", "packed", "sizes", "query", "key", "value",
                                                       "attended")}
        replacements.append((merged, names["attended"], [
            helper.make_node("Constant", [], [names["width"]], name=f"{label}/width",
                             value=helper.make_tensor(names["width"], TensorProto.INT64, [1], [3 * width])),
            helper.make_node("Concat", [shape.input[0], shape.input[1], names["width"]], [names["shape"]],
                             name=f"{label}/packed_shape", axis=0),
            helper.make_node("Reshape", [packed, names["shape"]], [names["packed"]], name=f"{label}/packed",
                             **({} if allowzero is None else {"allowzero": allowzero})),
            helper.make_node("Constant", [], [names["sizes"]], name=f"{label}/sizes",
                             value=helper.make_tensor(names["sizes"], TensorProto.INT64, [3], [width] * 3)),
            helper.make_node("Split", [names["packed"], names["sizes"]],
                             [names["query"], names["key"], names["value"]], name=f"{label}/split_qkv", axis=-1),
            helper.make_node("MultiHeadAttention",
                             [names["query"], names["key"], names["value"]] + ([] if bias is None else ["", "", bias]),
                             [names["attended"]], name=f"{label}/attention", domain="com.microsoft", num_heads=heads,
                             **({} if scale is None else {"scale": scale})),
        ]))
    for merged, attended, new_nodes in replacements:
        at = list(graph.node).index(merged)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(at + offset, node)
        merged.input[0] = attended
    if replacements:
        _remove_unused_nodes(graph)
        if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def scale_queries(model) -> int:
    """Move each per-head scale of attention scores onto the queries: Mul(MatMul(q, k^T), s) becomes
    MatMul(Mul(q, s), k^T); how many were moved.

    SwinV2 multiplies its cosine scores, a (windows, H, N, N) tensor, by a learnt scale per head of shape (H, 1, 1);
    ONNX Runtime runs that as a pass over every score (N is 576 in SwinV2-L's windows at 384), while the queries
    are (windows, H, N, D) with D = 32. Only a constant scale whose last two axes are 1 is moved (it is then the
    same for every element of each (N, D) and (N, N) matrix, so (q * s) @ k^T = s * (q @ k^T) up to the rounding of
    one product), onto a MatMul whose right operand is a Transpose of the last two axes (attention scores), whose
    left operand is proven a matrix or a stack of them (a vector would take the scale's axes as its rows), and
    whose result nothing else reads. A one-element scale is left: ONNX Runtime already folds it into its
    FusedMatMul. `model` is changed in place."""
    from onnx import helper

    graph = model.graph
    producers, consumers, initializers, outputs = _graph_index(graph)
    ranks = None  # shape inference over the whole graph, only once a candidate is found
    moved = 0
    for scaled in [node for node in graph.node if node.op_type == "Mul"]:
        for mine, other in ((0, 1), (1, 0)):
            scores = _made_by(producers, scaled.input[mine], "MatMul")
            if scores is None or scores.output[0] in outputs or len(consumers.get(scores.output[0], [])) != 1:
                continue
            keys = _made_by(producers, scores.input[1], "Transpose")
            perm = list(_attribute(keys, "perm", [])) if keys is not None else []
            if len(perm) < 2 or perm[-2:] != [len(perm) - 1, len(perm) - 2] or perm[:-2] != list(range(len(perm) - 2)):
                continue
            scale = _constant_value(model, scaled.input[other], producers, initializers)
            if scale is None or scale.size < 2 or scale.ndim < 2 or scale.shape[-2:] != (1, 1):
                continue
            ranks = _ranks(model) if ranks is None else ranks
            if ranks.get(scores.input[0], 0) < 2:
                continue
            query = f"{scaled.output[0]}/scaled_query"
            # The MatMul now makes the Mul's output (its readers are unchanged) and runs where the Mul ran, after
            # every tensor it and the scale read; the old score tensor had no other reader.
            graph.node.remove(scores)
            at = list(graph.node).index(scaled)
            graph.node.insert(at, helper.make_node("Mul", [scores.input[0], scaled.input[other]], [query],
                                                   name=f"{scaled.name or scaled.output[0]}/on_query"))
            scores.input[0], scores.output[0] = query, scaled.output[0]
            graph.node.insert(at + 1, scores)
            graph.node.remove(scaled)
            moved += 1
            break
    return moved


def unexpand_divisors(model) -> int:
    """Divide by a tensor as it is where the graph first expands it to the dividend's shape: Div(x, Expand(n,
    Shape(x))) becomes Div(x, n); how many were changed.

    torch exports F.normalize (SwinV2's queries and keys) as x / expand(max(||x||, eps), x.shape). The Expand
    writes the norms out in full before the Div reads them; Div broadcasts them itself, to the same shape (Expand
    and Div broadcast alike), so the values are exactly the same. `model` is changed in place; an Expand nothing
    else reads is removed."""
    graph = model.graph
    producers, _, _, _ = _graph_index(graph)
    changed = 0
    for divide in [node for node in graph.node if node.op_type == "Div"]:
        expanded = _made_by(producers, divide.input[1], "Expand")
        shape = _made_by(producers, expanded.input[1], "Shape") if expanded is not None else None
        if shape is None or shape.input[0] != divide.input[0] or len(shape.attribute):  # all of x's shape
            continue
        divide.input[1] = expanded.input[0]
        changed += 1
    if changed:
        _remove_unused_nodes(graph)
    return changed


def _names_read(graph) -> set[str]:
    """Every tensor name a node of `graph` reads, in its subgraphs too (an If or Loop body reads outer names
    without listing them as the node's inputs)."""
    from onnx import AttributeProto

    read = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else \
                list(attribute.graphs) if attribute.type == AttributeProto.GRAPHS else []
            for subgraph in subgraphs:  # a body may also hand an outer tensor straight out as its output
                read |= _names_read(subgraph) | {output.name for output in subgraph.output}
    return read


def _remove_unused_nodes(graph) -> None:
    """Drop nodes whose outputs nothing reads (repeatedly: a removed node may leave its producers unused)."""
    while True:
        read = _names_read(graph) | {output.name for output in graph.output}
        unused = [node for node in graph.node if not any(output in read for output in node.output)]
        if not unused:
            return
        for node in unused:
            graph.node.remove(node)
