"""safetensors files: the header parsed as bounded data and every entry checked, tensors as views of one
copy-on-write map of the file; written with the safetensors library."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.digest import c_order
from models_registry.formats.guards import element_count, too_large
from models_registry.formats.loaded import LoadedWeights

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


# The safetensors library allows headers up to 100 MB, which json.loads would turn into gigabytes of
# objects; the header of the largest MiDaS checkpoint (DPT_Large, ~600 tensors) is about 100 KB.
ST_MAX_HEADER = 8 * 1024 * 1024


def _st_malformed(path: Path, why: str) -> WeightFileError:
    return WeightFileError(f"{path.name}: malformed safetensors header: {why}", extra={"kind": "malformed_safetensors"},
                           file=path.name)


def _st_unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("a tensor name appears twice")
    return dict(pairs)


def _st_header(path: Path, size: int) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file, each entry checked for shape and type."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightFileError(f"{path.name}: too short for a safetensors file", extra={"kind": "truncated_safetensors"},
                                  file=path.name)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise WeightFileError(f"{path.name}: its header claims {header_len} bytes but the file has {size}",
                                  extra={"kind": "truncated_safetensors"}, file=path.name)
        if header_len > ST_MAX_HEADER:
            raise _st_malformed(path, f"a header of {header_len} bytes (at most {ST_MAX_HEADER})")
        try:
            header = json.loads(handle.read(header_len), object_pairs_hook=_st_unique_keys)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise _st_malformed(path, str(exc)) from None
    if not isinstance(header, dict):
        raise _st_malformed(path, f"the header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _st_malformed(path, "__metadata__ must map names to strings")
    entries = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _st_malformed(path, f"entry {key!r} is a {type(info).__name__}, not an object")
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        if missing:
            raise _st_malformed(path, f"entry {key!r} has no {', '.join(sorted(missing))}")
        dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise WeightFileError(f"{path.name}: unsupported safetensors dtype {info['dtype']!r} ({key})",
                                  extra={"kind": "unsupported_dtype"}, file=path.name)
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise _st_malformed(path, f"entry {key!r} has data_offsets {offsets!r} (two ascending byte offsets)")
        if not isinstance(info["shape"], list):
            raise _st_malformed(path, f"entry {key!r} has shape {info['shape']!r}")
        try:
            count = element_count(path, key, info["shape"])
        except WeightFileError as exc:
            raise _st_malformed(path, exc.message.split(": ", 1)[-1]) from None
        entries[key] = (np.dtype(dtype), tuple(info["shape"]), count, offsets[0], offsets[1])
    return entries, metadata, 8 + header_len


def _read_safetensors(path: Path, budget: int) -> LoadedWeights:
    """Tensors are views of one copy-on-write map of the file: nothing is allocated per tensor."""
    size = path.stat().st_size
    entries, metadata, data_start = _st_header(path, size)
    data_size = size - data_start
    spans = sorted((begin, end, key) for key, (_, _, _, begin, end) in entries.items())
    previous_end, previous_key = 0, None
    for begin, end, key in spans:
        if begin < previous_end:
            raise _st_malformed(path, f"tensors {previous_key!r} and {key!r} overlap")
        previous_end, previous_key = end, key
    declared = 0
    for key, (dtype, shape, count, begin, end) in entries.items():
        if end - begin != count * dtype.itemsize or end > data_size:
            raise WeightFileError(
                f"{path.name}: tensor {key} lies outside the file or has the wrong length "
                "(a truncated or damaged safetensors file)",
                extra={"kind": "truncated_safetensors"}, file=path.name,
            )
        declared += end - begin
    if declared > budget:
        raise too_large(path, declared, budget)
    whole = np.memmap(path, dtype=np.uint8, mode="c") if size > data_start else np.zeros(0, np.uint8)
    arrays = {}
    for key, (dtype, shape, count, begin, end) in entries.items():
        arrays[key] = whole[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return LoadedWeights("safetensors", arrays, metadata=dict(metadata))


def _write_safetensors(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file({key: c_order(value) for key, value in arrays.items()}, str(path),
              metadata={key: str(value) for key, value in metadata.items()})
