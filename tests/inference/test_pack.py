"""The packed artifact file: one file holding an ONNX graph and its weights as external data (inference.runtime.pack)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.runtime import pack
from inference.runtime.onnx import session_open

RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((96, 64)).astype(np.float32)  # 24 KB: stored outside the graph
SCALE = RNG.standard_normal((48, 32)).astype(np.float32)  # 6 KB, written as float_data rather than raw bytes
BIAS = RNG.standard_normal(48).astype(np.float32)  # 192 bytes: small enough to stay in the graph


def plain_model(path: Path) -> None:
    """A plain ONNX file with its weights inside: y = (x @ weight) @ scale.T + bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scale = helper.make_tensor("scale", TensorProto.FLOAT, SCALE.shape, SCALE.ravel().tolist())  # float_data
    assert not scale.HasField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["h"]),
         helper.make_node("Transpose", ["scale"], ["scale_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "scale_t"], ["s"]),
         helper.make_node("Add", ["s", "bias"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
        initializer=[numpy_helper.from_array(WEIGHT[:, :32], "weight"), scale, numpy_helper.from_array(BIAS, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def expected(x: np.ndarray) -> np.ndarray:
    return (x @ WEIGHT[:, :32]) @ SCALE.T + BIAS


@pytest.fixture
def plain(tmp_path) -> Path:
    path = tmp_path / "plain.onnx"
    plain_model(path)
    return path


@pytest.fixture
def packed(tmp_path, plain) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    path = folder / "model.onnx"
    pack.pack_write(plain, path, name="model.onnx")
    return path


def run(path: Path, **options) -> np.ndarray:
    session = session_open(path, threads=1, **options)
    x = np.linspace(-1, 1, 3 * 96, dtype=np.float32).reshape(3, 96)
    return session.run(None, {"x": x})[0], x


def test_a_packed_file_keeps_its_weights_outside_the_graph_and_runs_as_the_plain_one(plain, packed):
    import onnx

    head = packed.read_bytes()[:pack.HEADER_BYTES]
    assert head.startswith(pack.MAGIC)
    graph = pack.pack_read(packed)
    assert graph is not None and graph.folder == packed.parent
    model = onnx.load_from_string(graph.graph)
    stored = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    assert stored["weight"]["location"] == stored["scale"]["location"] == "model.onnx"
    assert all(int(stored[name]["offset"]) % pack.ALIGN == 0 for name in ("weight", "scale"))
    assert stored["bias"] == {}  # small: inside the graph
    assert len(graph.graph) < WEIGHT[:, :32].nbytes  # the weights are not in the graph's bytes
    data = packed.read_bytes()
    offset, length = int(stored["scale"]["offset"]), int(stored["scale"]["length"])
    assert np.array_equal(np.frombuffer(data[offset:offset + length], "<f4").reshape(SCALE.shape), SCALE)

    plain_out, x = run(plain)
    packed_out, _ = run(packed)
    assert np.array_equal(plain_out, packed_out)
    assert np.allclose(packed_out, expected(x), atol=1e-4)


def test_without_prepacking_the_output_is_the_same(packed):
    with_prepack, _ = run(packed)
    without, _ = run(packed, prepack=False)
    assert np.allclose(with_prepack, without, rtol=0, atol=1e-5)


def test_a_plain_onnx_file_still_opens(plain):
    # Artifacts built before packing are plain ONNX files with their weights inside the graph.
    assert pack.pack_read(plain) is None
    out, x = run(plain)
    assert np.allclose(out, expected(x), atol=1e-4)


def test_a_packed_file_under_another_name_is_refused_by_name(packed):
    renamed = packed.with_name("other.onnx")
    shutil.copyfile(packed, renamed)
    with pytest.raises(pack.PackError, match="was written as 'model.onnx'"):
        session_open(renamed)


@pytest.mark.parametrize("damage", ["cut", "appended"])
def test_a_packed_file_whose_graph_does_not_end_it_is_refused(packed, damage):
    data = packed.read_bytes()
    packed.write_bytes(data[:-10] if damage == "cut" else data + b"\0" * 10)
    with pytest.raises(pack.PackError, match="does not end the file"):
        pack.pack_read(packed)


def test_a_header_cut_short_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(pack.MAGIC + b"\1\2")
    with pytest.raises(pack.PackError, match="cut short"):
        pack.pack_read(path)
