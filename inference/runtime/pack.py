"""The artifact file: an ONNX graph whose weights lie in the same file, as ONNX external data (no torch, no Django).

An ONNX file with its weights inside the graph makes ONNX Runtime parse and copy every weight byte before it
can start: 5-8 s and a 2.4 GB peak for DPT_Large's 1.37 GB here. With the weights as external data, ORT maps
them from the file and frees what it repacks: about 3 s and 1.58 GB, or 0.5 s without repacking
(docs/performance.md). The usual external-data layout is two files, which the cache would have to keep,
hash, verify and delete as a pair. Here they are one file:

    [header, HEADER_BYTES]  MAGIC, graph offset, graph length, the file name the graph's weights point at
    [weights]               each tensor's raw little-endian bytes at an ALIGN-aligned offset
    [graph]                 the ONNX model, its large initializers marked external: location = that file
                            name, offset and length inside this same file

ORT is handed the graph's bytes and this file's folder, and reads the weights from the file by name, so a
packed artifact opens only under the name it was written for (`PackError` says so). A file without MAGIC is
a plain ONNX file (artifacts built before packing), opened as before.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"DSONNXP1"
HEADER_BYTES = 4096
ALIGN = 4096  # a page: ORT maps each tensor without copying it
INLINE_BELOW = 1024  # bytes: smaller tensors stay in the graph, as ONNX's own external-data writer does
_FIXED = struct.Struct("<8sQQH")


class PackError(ValueError):
    """The file is not a packed artifact that can be opened where it is."""


@dataclass(frozen=True)
class PackedGraph:
    graph: bytes
    folder: Path  # where ORT finds the weights file the graph names: this file's own folder


def pack_read(path: Path | str) -> PackedGraph | None:
    """The graph of a packed artifact and where its weights are; None for a plain ONNX file."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(HEADER_BYTES)
        if not head.startswith(MAGIC):
            return None
        if len(head) < _FIXED.size:
            raise PackError(f"{path.name}: the packed artifact's header is cut short")
        _, offset, length, name_length = _FIXED.unpack_from(head)
        name = head[_FIXED.size:_FIXED.size + name_length].decode("utf-8", "replace")
        size = os.fstat(handle.fileno()).st_size
        if offset < HEADER_BYTES or offset + length != size:
            raise PackError(f"{path.name}: the packed artifact's graph ({length} bytes at {offset}) does not end "
                            f"the file ({size} bytes)")
        if name != path.name:
            raise PackError(f"the packed artifact {path.name} was written as {name!r}; its graph finds its "
                            "weights by that name")
        handle.seek(offset)
        graph = handle.read(length)
    return PackedGraph(graph=graph, folder=path.parent)


def _raw_bytes(tensor) -> bytes | None:
    """A tensor's bytes as ONNX external data stores them (raw, little-endian); None for strings."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def pack_write(source: Path | str, dest: Path | str, *, name: str) -> None:
    """Write the ONNX model at `source` to `dest` as a packed artifact that will be opened as `name`.

    `dest` may have another name while it is written and checked, in a folder of its own: see
    inference.runtime.artifacts (the check opens it under `name`)."""
    import onnx

    model = onnx.load(str(source), load_external_data=True)
    encoded = name.encode("utf-8")
    if _FIXED.size + len(encoded) > HEADER_BYTES:
        raise PackError(f"the artifact name {name!r} is too long")
    with open(dest, "wb") as out:
        out.seek(HEADER_BYTES)
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor)
            if raw is None or len(raw) < INLINE_BELOW:
                continue
            offset = -(-out.tell() // ALIGN) * ALIGN
            out.seek(offset)
            out.write(raw)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            for key, value in (("location", name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
        graph = model.SerializeToString()
        graph_offset = out.tell()
        out.write(graph)
        out.seek(0)
        out.write(_FIXED.pack(MAGIC, graph_offset, len(graph), len(encoded)) + encoded)
