"""The self-attention of a ViT block (as torch exports scaled_dot_product_attention) and of a BEiT block (q times a
constant scale, a relative position bias added to the scores) runs as one fused ONNX Runtime node
(inference.runtime.graph.fuse_attention); anything that is not exactly one of those patterns is left alone."""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference.runtime.export import network_export
from inference.runtime.graph import fuse_attention

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DIM, HEADS, PATCH = 32, 4, 8


class Attention(nn.Module):
    """timm's Attention, reduced: packed qkv, unbind, scaled_dot_product_attention, heads merged, projection."""

    def __init__(self, *, bias: bool = False, scale: float | None = None):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.bias, self.scale = bias, scale

    def forward(self, x):
        # The head count and size are Python ints, as in timm's blocks: the graph holds them as constants.
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        mask = torch.linspace(-1, 1, tokens * tokens).reshape(tokens, tokens) if self.bias else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, DIM))


class DynamicHeads(Attention):
    """The head size worked out from the input's shape at run time: the fusion cannot prove the layout, so it stays."""

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class FlatProjection(Attention):
    """The projection run on (B*N, C) rows, reshaped to (B, N, 3, H, D) only afterwards: other leading sizes."""

    def forward(self, x):
        batch, tokens, _ = x.shape
        packed = self.qkv(x.reshape(batch * tokens, DIM))
        q, k, v = packed.reshape(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, DIM))


class TinyViT(nn.Module):
    def __init__(self, depth: int = 2, block=Attention, **attention):
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.blocks = nn.ModuleList(block(**attention) for _ in range(depth))
        self.head = nn.Linear(DIM, 1)

    def forward(self, image):
        x = self.embed(image)
        batch, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).transpose(1, 2).reshape(batch, 1, height, width)


class BeitAttention(nn.Module):
    """A BEiT block's attention as depthsite's BEiT networks run it (inference.nets.beit.attention): q times a
    constant scale, and the relative position bias of the token grid added to the scores."""

    def __init__(self, *, bias_axis: int = 0):
        super().__init__()
        from timm.models.beit import Attention as TimmAttention

        self.attn = TimmAttention(DIM, num_heads=HEADS, qkv_bias=True, window_size=(4, 4))
        with torch.no_grad():
            for tensor in (self.attn.q_bias, self.attn.v_bias, self.attn.relative_position_bias_table):
                tensor.normal_(0, 0.5)
            self.attn.k_bias.zero_()
        self.bias_axis = bias_axis

    def forward(self, x, grid):
        from inference.nets import beit

        bias = beit.relative_position_bias(self.attn, grid, beit.relative_position_index(grid))
        if self.bias_axis:  # the same numbers, unsqueezed elsewhere: the rank is no longer proven by the layout
            bias = bias.squeeze(0).unsqueeze(self.bias_axis).transpose(0, self.bias_axis)
        return beit.attention(self.attn, x, bias)


class TinyBeit(nn.Module):
    def __init__(self, depth: int = 2, **attention):
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(BeitAttention(**attention) for _ in range(depth))
        self.head = nn.Linear(DIM, 1)

    def forward(self, image):
        x = self.embed(image)
        batch, _, height, width = x.shape
        x = torch.cat((self.cls.expand(batch, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
        for block in self.blocks:
            x = x + block(x, (height, width))
        return self.head(x[:, 1:]).transpose(1, 2).reshape(batch, 1, height, width)


CONFIG = types.SimpleNamespace(net_size=(32, 48), fixed_input_size=False, ensure_multiple_of=PATCH)


def export(network, path, **options):
    torch.manual_seed(0)
    network.eval()
    network_export(network, CONFIG, path, **options)
    return onnx.load(str(path))


def run(path, image):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]


def ops(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


def fused_and_plain(network, tmp_path, blocks: int):
    """The network exported with and without the fusion: one fused attention a block, the plain graph untouched."""
    fused = export(network, tmp_path / "fused.onnx")
    plain = export(network, tmp_path / "plain.onnx", fuse_attention=False)
    assert ops(fused).count("MultiHeadAttention") == blocks and "Softmax" not in ops(fused)
    assert ops(plain).count("Softmax") == blocks and "MultiHeadAttention" not in ops(plain)
    onnx.checker.check_model(fused)
    return fused


def assert_fused_matches_eager(network, tmp_path, sizes, *, rewritten: str = "fused.onnx",
                               against_plain: float = 1e-5) -> None:
    """The rewritten graph (in tmp_path) against eager within 1e-5 of the range, and against plain.onnx, the graph
    as exported, within `against_plain` (tests/inference/test_export_cosine_attention.py's rewrites too)."""
    for height, width in sizes:
        image = np.random.default_rng(height).random((1, 3, height, width), dtype=np.float32)
        with torch.inference_mode():
            eager = network(torch.from_numpy(image)).numpy()
        spread = eager.max() - eager.min()
        assert np.abs(run(tmp_path / rewritten, image) - eager).max() / spread < 1e-5
        assert np.abs(run(tmp_path / rewritten, image) - run(tmp_path / "plain.onnx", image)).max() / spread \
            < against_plain


def test_each_block_runs_as_one_fused_attention_and_matches_eager(tmp_path):
    torch.manual_seed(0)
    network = TinyViT(depth=3).eval()
    fused = fused_and_plain(network, tmp_path, 3)
    assert any(opset.domain == "com.microsoft" for opset in fused.opset_import)
    # The export size and another (the graph's axes are dynamic).
    assert_fused_matches_eager(network, tmp_path, ((32, 48), (40, 24)))

@pytest.mark.parametrize("attention", [{"bias": True}, {"scale": 0.5}, {"block": DynamicHeads}],
                         ids=["scores-bias", "other-scale", "dynamic-head-size"])
def test_attention_that_is_not_the_plain_pattern_is_left_alone(tmp_path, attention):
    model = export(TinyViT(**attention), tmp_path / "a.onnx")
    assert "MultiHeadAttention" not in ops(model) and ops(model).count("Softmax") == 2
    assert fuse_attention(model) == 0


def test_a_failing_rewrite_leaves_the_exported_graph(tmp_path, monkeypatch, caplog):
    from inference.runtime import graph

    def broken(model):
        model.graph.node.pop()  # half-done, then it fails: none of it may reach the file
        raise RuntimeError("boom")

    monkeypatch.setattr(graph, "fuse_attention", broken)
    model = export(TinyViT(), tmp_path / "a.onnx")
    assert ops(model).count("Softmax") == 2 and "fusing the self-attention of TinyViT failed" in caplog.text
    assert not list(tmp_path.glob("*.rewrite"))
    onnx.checker.check_model(model)


def test_other_leading_sizes_and_a_batch_of_two_stay_exact(tmp_path):
    """The fused graph reshapes the projection with the exported Reshape's own leading sizes: exact for a projection
    run on flattened rows, and for more than one image (the artifacts feed one; the rewrite must not depend on it)."""
    torch.manual_seed(0)
    network = TinyViT(block=FlatProjection).eval()
    image = np.random.default_rng(1).random((2, 3, 24, 40), dtype=np.float32)
    path = tmp_path / "batch.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, as in network_export
        torch.onnx.export(network, (torch.from_numpy(image),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["depth"], do_constant_folding=True,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
        eager = network(torch.from_numpy(image)).numpy()
    model = onnx.load(str(path))
    assert fuse_attention(model) == 2
    onnx.save(model, str(path))
    spread = eager.max() - eager.min()
    assert np.abs(run(path, image) - eager).max() / spread < 1e-5
    assert np.abs(run(path, image[:1]) - eager[:1]).max() / spread < 1e-5


def test_pruning_keeps_what_a_subgraph_reads():
    from onnx import TensorProto, helper

    from inference.runtime.graph import _remove_unused_nodes

    def branch(name):
        return helper.make_graph([helper.make_node("Identity", ["outer"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])])

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["outer"], name="read_by_branches"),
         helper.make_node("Identity", ["x"], ["unused"], name="dead"),
         helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    _remove_unused_nodes(graph)
    assert [node.name for node in graph.node] == ["read_by_branches", "if"]


def test_when_a_later_rewrite_fails_the_earlier_ones_still_land(tmp_path, caplog):
    from inference.runtime.export import _graph_rewrite

    path = tmp_path / "a.onnx"
    export(TinyViT(), path, fuse_attention=False)

    def rename(model):
        model.graph.name = "renamed"
        return 1

    def broken(model):
        model.graph.name = "half-done"
        model.graph.node.pop()
        raise RuntimeError("boom")

    assert _graph_rewrite(path, [(rename, "renaming"), (broken, "breaking")]) == 1
    kept = onnx.load(str(path))
    assert kept.graph.name == "renamed" and ops(kept).count("Softmax") == 2 and "breaking failed" in caplog.text
    assert not list(tmp_path.glob("*.rewrite"))


def test_beit_attention_with_its_relative_position_bias_runs_fused_and_matches_eager(tmp_path):
    # BEiT's explicit form: (q * scale) @ k^T + bias. The bias goes to MultiHeadAttention's attention_bias, the
    # scale to its `scale`; the exported grid and others give eager's output.
    torch.manual_seed(0)
    network = TinyBeit(depth=3).eval()
    fused = fused_and_plain(network, tmp_path, 3)
    attention = next(node for node in fused.graph.node if node.op_type == "MultiHeadAttention")
    assert len(attention.input) == 6 and attention.input[5]  # the bias, as attention_bias
    scale = next(a.f for a in attention.attribute if a.name == "scale")
    assert scale == pytest.approx((DIM // HEADS) ** -0.5)
    assert_fused_matches_eager(network, tmp_path, ((32, 48), (48, 24), (32, 32)))  # (32, 32): the table's 4 x 4

def test_a_bias_of_unproven_layout_is_left_alone(tmp_path):
    # The same numbers, their axes moved by a Transpose of four after the Unsqueeze: the rewrite cannot prove
    # (1, H, N, N).
    model = export(TinyBeit(bias_axis=1), tmp_path / "a.onnx")
    assert "MultiHeadAttention" not in ops(model) and ops(model).count("Softmax") == 2
    assert fuse_attention(model) == 0


def _hand_graph(nodes, inputs, initializers=()):
    from onnx import TensorProto, helper

    from inference.runtime.graph import _graph_index

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                           for name in inputs], [], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    producers, _, constants, _ = _graph_index(model.graph)
    return model, producers, constants


def _int64s(name, values):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


@pytest.mark.parametrize("perm, axes, proven", [
    ([2, 0, 1], [0], True),
    ([2, 0, 1], [1], False),  # (H, 1, N, N): rank 4, but not the layout the rewrite proves
    ([0, 2, 1, 3], [0], False),  # a Transpose of four: rank 5
    ([2, 0, 1], None, False),  # axes fed by the graph: unknown
], ids=["unsqueezed-in-front", "unsqueezed-at-1", "rank-4-transposed", "axes-from-an-input"])
def test_the_bias_rank_proof(perm, axes, proven):
    from onnx import helper

    from inference.runtime.graph import _is_head_bias

    nodes = [helper.make_node("Transpose", ["table"], ["turned"], perm=perm),
             helper.make_node("Unsqueeze", ["turned", "axes"], ["bias"])]
    model, producers, constants = _hand_graph(nodes, ["table"] + (["axes"] if axes is None else []),
                                              [] if axes is None else [_int64s("axes", axes)])
    assert _is_head_bias(model, "bias", producers, constants) is proven
    assert _is_head_bias(model, "turned", producers, constants) is False  # not made by an Unsqueeze at all


@pytest.mark.parametrize("scale, scale_first, expected", [
    (0.25, False, 0.25), (0.25, True, 0.25),  # q * scale and scale * q
    (0.0, False, None),  # ORT reads a scale of 0 as "unset" and would use 1/sqrt(D)
    (-0.5, False, None), ([0.5, 0.25], False, None),  # negative; not one number
], ids=["q-times-scale", "scale-times-q", "zero", "negative", "per-head"])
def test_the_explicit_scale_is_one_positive_constant(scale, scale_first, expected):
    from onnx import helper, numpy_helper

    from inference.runtime.graph import _scaled_query_key

    factor = numpy_helper.from_array(np.asarray(scale, dtype=np.float32), "scale")
    nodes = [helper.make_node("Squeeze", ["packed_q", "zero"], ["q"]),
             helper.make_node("Mul", ["scale", "q"] if scale_first else ["q", "scale"], ["q_scaled"]),
             helper.make_node("Transpose", ["k"], ["k_turned"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q_scaled", "k_turned"], ["scores"])]
    model, producers, constants = _hand_graph(nodes, ["packed_q", "k"], [factor, _int64s("zero", [0])])
    matched = _scaled_query_key(model, producers["scores"], producers, constants)
    assert (matched is None) if expected is None else (matched[:2] == ("q", "k") and matched[2] == expected)
