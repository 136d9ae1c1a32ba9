"""SwinV2's cosine attention in an artifact: its per-head score scale multiplies the queries instead of the (N, N)
scores (inference.runtime.graph.scale_queries), and its normalisation divides by the norms without expanding them
first (graph.unexpand_divisors). Same outputs as eager and as the graph as exported; other scales are left."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from inference.runtime.export import network_export
from inference.runtime.graph import scale_queries
from tests.inference.test_export_attention import assert_fused_matches_eager, run

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

DIM, HEADS, PATCH, WINDOW = 32, 4, 4, 4
CONFIG = types.SimpleNamespace(net_size=(16, 16), fixed_input_size=True, ensure_multiple_of=PATCH, family="swin2")


class TinySwinV2(nn.Module):
    """Patches cut into windows and attended by timm's SwinV2 WindowAttention, the second block with a mask per
    window (as a shifted block has). `scale` replaces the learnt per-head logit scale by another constant."""

    def __init__(self, depth: int = 2, scale: torch.Tensor | None = None):
        super().__init__()
        from timm.models.swin_transformer_v2 import WindowAttention

        self.embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.blocks = nn.ModuleList(WindowAttention(DIM, (WINDOW, WINDOW), HEADS) for _ in range(depth))
        with torch.no_grad():
            for block in self.blocks:
                block.logit_scale.copy_(torch.log(torch.tensor([2.0, 5.0, 10.0, 40.0])).reshape(HEADS, 1, 1))
                for bias in (block.q_bias, block.v_bias):
                    bias.normal_(0, 0.5)
        self.scale = scale
        self.head = nn.Linear(DIM, 1)
        windows, tokens = (CONFIG.net_size[0] // PATCH // WINDOW) ** 2, WINDOW * WINDOW
        generator = torch.Generator().manual_seed(1)
        mask = torch.where(torch.rand(windows, tokens, tokens, generator=generator) < 0.2, -100.0, 0.0)
        self.register_buffer("mask", mask)

    def forward(self, image):
        x = self.embed(image)
        batch, channels, height, width = x.shape
        rows, cols = height // WINDOW, width // WINDOW
        x = x.reshape(batch, channels, rows, WINDOW, cols, WINDOW).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(batch * rows * cols, WINDOW * WINDOW, channels)
        for index, block in enumerate(self.blocks):
            x = x + (self.other_scale(block, x) if self.scale is not None else
                     block(x, mask=self.mask if index % 2 else None))
        return self.head(x).reshape(batch, 1, height, width)  # in window order: the same in every path

    def other_scale(self, block, x):
        # The same attention with another constant scale, written out (timm's forward reads its parameter).
        windows, tokens, _ = x.shape
        q, k, v = block.qkv(x).reshape(windows, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).transpose(-2, -1))
        scores = (scores * self.scale).softmax(-1)
        return block.proj((scores @ v).transpose(1, 2).reshape(windows, tokens, DIM))


def export(network, path, **options):
    network.eval()
    network_export(network, CONFIG, path, **options)
    return onnx.load(str(path))


def scales_on_scores(model) -> int:
    """Muls that read a MatMul's result: the score scale as exported."""
    made_by = {output: node for node in model.graph.node for output in node.output}
    return sum(node.op_type == "Mul" and any(getattr(made_by.get(name), "op_type", "") == "MatMul"
                                             for name in node.input) for node in model.graph.node)


def test_the_score_scale_moves_onto_the_queries_and_the_norms_are_not_expanded(tmp_path):
    torch.manual_seed(0)
    network = TinySwinV2()
    plain = export(network, tmp_path / "plain.onnx", cosine_attention=False)
    lean = export(network, tmp_path / "lean.onnx")
    plain_ops, lean_ops = [n.op_type for n in plain.graph.node], [n.op_type for n in lean.graph.node]
    # Two blocks: the scale of each on its scores, and the q and k norms expanded before each Div.
    assert scales_on_scores(plain) == 2 and plain_ops.count("Expand") >= 4
    assert scales_on_scores(lean) == 0 and "Expand" not in lean_ops
    assert sum(node.name.endswith("/on_query") for node in lean.graph.node) == 2
    onnx.checker.check_model(lean)
    # The scale multiplies before the sums instead of after: the rounding of one product, no more.
    assert_fused_matches_eager(network, tmp_path, [CONFIG.net_size], rewritten="lean.onnx", against_plain=1e-6)


def test_dividing_by_the_unexpanded_norms_is_exact(tmp_path):
    torch.manual_seed(0)
    network = TinySwinV2()
    export(network, tmp_path / "plain.onnx", cosine_attention=False)
    model = onnx.load(str(tmp_path / "plain.onnx"))
    from inference.runtime.graph import unexpand_divisors

    assert unexpand_divisors(model) == 4 and "Expand" not in [n.op_type for n in model.graph.node]
    onnx.save(model, str(tmp_path / "divided.onnx"))
    image = np.random.default_rng(4).random((1, 3, *CONFIG.net_size), dtype=np.float32)
    assert np.array_equal(run(tmp_path / "divided.onnx", image), run(tmp_path / "plain.onnx", image))


@pytest.mark.parametrize("scale, moved", [
    (torch.tensor([[[2.0]], [[5.0]], [[10.0]], [[40.0]]]), 2),  # per head: moved
    (torch.tensor(7.0), 0),  # one number: ONNX Runtime folds it into its FusedMatMul already
    (torch.linspace(1, 2, WINDOW * WINDOW), 0),  # one per key column: not a factor of each query row
    (torch.linspace(1, 2, WINDOW * WINDOW).reshape(-1, 1), 0),  # one per query row: left too (not proven (.., 1, 1))
], ids=["per-head", "scalar", "per-column", "per-row"])
def test_only_a_scale_constant_over_each_score_matrix_moves(tmp_path, scale, moved):
    torch.manual_seed(0)
    network = TinySwinV2(scale=scale)
    export(network, tmp_path / "plain.onnx", cosine_attention=False)
    model = onnx.load(str(tmp_path / "plain.onnx"))
    assert scale_queries(model) == moved
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    image = np.random.default_rng(5).random((1, 3, *CONFIG.net_size), dtype=np.float32)
    plain, scaled = run(tmp_path / "plain.onnx", image), run(tmp_path / "scaled.onnx", image)
    assert np.abs(scaled - plain).max() / (plain.max() - plain.min()) < 1e-6


def test_a_scale_whose_scores_are_read_elsewhere_stays(tmp_path):
    # The unscaled scores are an output too: moving the scale would change what that output holds.
    from onnx import TensorProto, helper

    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 3, 4])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 3, 4])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "s"], ["scaled"])]
    scale = helper.make_tensor("s", TensorProto.FLOAT, [2, 1, 1], [math.e, math.pi])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 3, 3]) for name in ("scaled", "scores")]
    model = helper.make_model(helper.make_graph(nodes, "g", [q, k], outputs, [scale]))
    assert scale_queries(model) == 0
    model.graph.output.pop()  # no longer an output: the scale moves
    assert scale_queries(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Transpose", "Mul", "MatMul"]


@pytest.mark.parametrize("query_shape, moved", [([3], 0), ([4, 3], 1), ([2, 4, 3], 1)], ids=["vector", "matrix", "stack"])
def test_a_query_that_is_a_vector_keeps_the_scale_on_the_scores(query_shape, moved):
    # MatMul takes a 1-D left operand as one row and drops that axis: a (2, 1, 1) scale on it would become a stack of
    # two rows, a different product. Only a query proven a matrix or a stack of them takes the scale.
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, query_shape)
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 4, 3])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "s"], ["scaled"])]
    scale = helper.make_tensor("s", TensorProto.FLOAT, [2, 1, 1], [math.e, math.pi])
    output = helper.make_tensor_value_info("scaled", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [q, k], [output], [scale]))
    feeds = {"q": np.random.default_rng(6).random(query_shape, dtype=np.float32),
             "k": np.random.default_rng(7).random((2, 4, 3), dtype=np.float32)}
    before = ReferenceEvaluator(model).run(None, feeds)[0]
    assert scale_queries(model) == moved
    after = ReferenceEvaluator(model).run(None, feeds)[0]
    assert after.shape == before.shape and np.allclose(after, before, rtol=1e-6)


def test_other_families_are_exported_as_before(tmp_path):
    # Recipe 2 names SwinV2 alone: the same graph exported for another family keeps its scale and its Expands, so
    # that family's artifacts of recipe 1 are still what a rebuild would give.
    torch.manual_seed(0)
    network = TinySwinV2().eval()
    config = types.SimpleNamespace(**{**vars(CONFIG), "family": "levit"})
    network_export(network, config, tmp_path / "other.onnx")
    network_export(network, CONFIG, tmp_path / "plain.onnx", cosine_attention=False)
    other, plain = (onnx.load(str(tmp_path / name)) for name in ("other.onnx", "plain.onnx"))
    assert [n.op_type for n in other.graph.node] == [n.op_type for n in plain.graph.node]
    assert scales_on_scores(other) == 2
