"""timm's "same" padding fixed at export where that is exact, and zero Pads folded into the Conv after them."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference.runtime.graph import fold_pads_into_convs

RNG = np.random.default_rng(3)
WEIGHT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def run(model, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def pad_conv_model(*, pads_from_input: bool = False, fill: float = 0.0, pads=(0, 0, 0, 1, 0, 0, 1, 2),
                   second_user: bool = False):
    """x -> Pad(pads, fill) -> Conv(3x3, stride 2) -> y, the pads made by a Constant + Cast chain as torch writes
    them (or read from a graph input)."""
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])]
    if pads_from_input:
        inputs.append(helper.make_tensor_value_info("pads", TensorProto.INT64, [8]))
    else:
        nodes += [helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(np.array(pads, np.int32))),
                  helper.make_node("Cast", ["raw"], ["pads"], to=TensorProto.INT64)]
    nodes += [helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(np.array(fill, np.float32))),
              helper.make_node("Pad", ["x", "pads", "fill"], ["padded"], mode="constant"),
              helper.make_node("Conv", ["padded", "w"], ["y"], strides=[2, 2], pads=[1, 0, 1, 0])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None, None])]
    if second_user:
        nodes.append(helper.make_node("Relu", ["padded"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, None, None]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(WEIGHT, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_zero_pad_of_fixed_amounts_moves_into_the_conv():
    model = pad_conv_model()
    x = RNG.standard_normal((1, 3, 11, 14)).astype(np.float32)
    before = run(model, x)
    assert fold_pads_into_convs(model) == 1
    assert [node.op_type for node in model.graph.node if node.op_type in ("Pad", "Conv")] == ["Conv"]
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert list(helper.get_attribute_value(next(a for a in conv.attribute if a.name == "pads"))) == [1 + 0, 0 + 1,
                                                                                                   1 + 1, 0 + 2]
    onnx.checker.check_model(model)
    assert np.array_equal(run(model, x), before)  # the same sums over the same zeros


@pytest.mark.parametrize("variant", [
    {"pads_from_input": True},  # amounts a graph input sets: not fixed
    {"fill": 1.0},  # padding with ones is not a Conv's padding
    {"pads": (0, 1, 0, 0, 0, 0, 0, 0)},  # a channel padded
    {"second_user": True},  # the padded tensor is used elsewhere too
])
def test_pads_that_are_not_a_convs_padding_stay(variant):
    model = pad_conv_model(**variant)
    assert fold_pads_into_convs(model) == 0
    assert any(node.op_type == "Pad" for node in model.graph.node)


class SameNet:
    """A stride-2 "same" conv (asymmetric padding at even sizes) in a network the exporter can take."""

    @staticmethod
    def build():
        import torch
        from timm.layers.conv2d_same import Conv2dSame

        torch.manual_seed(0)
        return torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), torch.nn.ReLU(),
                                   Conv2dSame(4, 2, 5, stride=2)).eval()


def exported(tmp_path, multiple: int):
    from inference.runtime.export import network_export

    network = SameNet.build()
    config = SimpleNamespace(net_size=(32, 32), ensure_multiple_of=multiple, fixed_input_size=False)
    path = tmp_path / "same.onnx"
    network_export(network, config, path)
    return network, onnx.load(str(path))


def test_same_padding_is_fixed_and_folded_when_every_input_size_allows_it(tmp_path):
    import torch

    network, model = exported(tmp_path, multiple=32)
    assert not any(node.op_type == "Pad" for node in model.graph.node)
    assert all("forward" not in vars(module) for module in network.modules())  # the export patch is undone
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for height, width in ((32, 32), (64, 96), (96, 32)):
        x = RNG.standard_normal((1, 3, height, width)).astype(np.float32)
        with torch.no_grad():
            eager = network(torch.from_numpy(x)).numpy()
        assert np.allclose(session.run(None, {"image": x})[0], eager, rtol=0, atol=1e-5)


def test_same_padding_stays_worked_out_when_an_input_size_could_change_it(tmp_path):
    # Inputs of any multiple of 2: the first conv always sees an even size (fixed), the second may see an odd one,
    # where its padding differs (left to the graph).
    network, model = exported(tmp_path, multiple=2)
    assert sum(node.op_type == "Pad" for node in model.graph.node) == 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    import torch

    for height, width in ((34, 30), (32, 32)):  # 17x15 at the second conv: odd
        x = RNG.standard_normal((1, 3, height, width)).astype(np.float32)
        with torch.no_grad():
            eager = network(torch.from_numpy(x)).numpy()
        assert np.allclose(session.run(None, {"image": x})[0], eager, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_midas_small_is_exported_without_a_pad_and_holds_against_eager(tmp_path):
    from inference.nets import create_model, get_config
    from inference.runtime import artifacts
    from inference.runtime.export import network_export
    from models_registry.detweights import det_state_dict

    network = create_model("MiDaS_small", state_dict=det_state_dict("MiDaS_small")).eval()
    config = get_config("MiDaS_small")
    path = tmp_path / "a.onnx"
    network_export(network, config, path)
    assert not any(node.op_type == "Pad" for node in onnx.load(str(path)).graph.node)  # 5 before
    assert artifacts.artifact_compare(network, config, path).worst <= artifacts.TOLERANCE
