"""Pickled numpy weights: a restricted unpickler that admits numeric arrays carrying all their bytes and plain
containers, nothing else; written as depthsite's own marked payload."""
from __future__ import annotations

import io
import math
import mmap
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.digest import c_order
from models_registry.formats.guards import check_dtype, pickle_scan, too_large
from models_registry.formats.loaded import LoadedWeights, _unwrap_state_dict

PKL_MARKER = "depthsite-weights"
_DTYPE_CODE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248])$")


def _pickle_refused(why: str) -> WeightFileError:
    return WeightFileError(f"refused to unpickle: {why}", extra={"kind": "bad_pickle_array"})


class _NdarrayMark:
    """Stands for numpy.ndarray in a pickle: a type to name, never a constructor to call (ndarray(shape)
    would hand back uninitialised memory)."""

    def __reduce__(self):  # pragma: no cover - never pickled
        raise TypeError("not picklable")


_NDARRAY = _NdarrayMark()


def _safe_dtype(obj, align=False, copy=False):
    # Always a fresh descriptor: a BUILD on a shared builtin dtype must not change it for the process.
    if not isinstance(obj, str) or not _DTYPE_CODE.match(obj):
        raise _pickle_refused(f"dtype {obj!r} is not a plain numeric dtype")
    return np.dtype(obj, align=bool(align), copy=True)


def _checked_dtype(dtype) -> np.dtype:
    if (not isinstance(dtype, np.dtype) or dtype.kind not in "fiub" or dtype.fields is not None
            or dtype.subdtype is not None or dtype.hasobject or dtype.itemsize not in (1, 2, 4, 8)):
        raise _pickle_refused(f"dtype {dtype!r} is not a plain numeric dtype")
    return dtype


def _checked_count(shape) -> int:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(
            isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise _pickle_refused(f"an array has an invalid shape {shape!r}")
    return math.prod(shape)


class _PickledArray(np.ndarray):
    """What `_reconstruct` hands a pickle: an empty array whose state must carry all of its bytes."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _pickle_refused("an array's state is not (version, shape, dtype, fortran, data)")
        shape, dtype, _, raw = state[-4:]
        dtype = _checked_dtype(dtype)
        if not isinstance(raw, (bytes, bytearray)):
            raise _pickle_refused(f"an array's data is a {type(raw).__name__}, not its bytes")
        if len(raw) != _checked_count(shape) * dtype.itemsize:
            raise _pickle_refused(f"an array of shape {shape} declares more elements than the "
                                  f"{len(raw)} bytes it carries")
        super().__setstate__(state)


def _safe_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise _pickle_refused("only numpy.ndarray may be reconstructed")
    if shape != (0,):
        raise _pickle_refused("an array is reconstructed with a shape before its data")
    return _PickledArray((0,), np.uint8)


def _safe_frombuffer(buffer, dtype, shape, order):
    dtype = _checked_dtype(dtype)
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = buffer.raw()
    if not isinstance(buffer, (bytes, bytearray, memoryview)):
        raise _pickle_refused(f"an array's data is a {type(buffer).__name__}, not its bytes")
    if memoryview(buffer).nbytes != _checked_count(shape) * dtype.itemsize:
        raise _pickle_refused(f"an array of shape {shape} does not carry exactly its bytes")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order="F" if order == "F" else "C")


def _safe_scalar(dtype, data=None):
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _pickle_refused("a numpy scalar does not carry exactly its bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _safe_encode(text, encoding="utf-8"):
    # How protocol 2 spells bytes: _codecs.encode(str, "latin1"); no other codec is admitted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _pickle_refused("only latin-1 text may be encoded")
    return text.encode("latin-1")


def _safe_ordered_dict(*args):
    # A plain dict (insertion-ordered): a BUILD on an OrderedDict instance could set attributes that
    # shadow its methods (`items`), and a plain dict takes no BUILD at all.
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise _pickle_refused("OrderedDict() is admitted only empty or from a list of pairs")
    return dict(*args)


def _safe_empty_bytes(*args):
    # How protocol 2 spells b"" (the data of an empty array): bytes() with no arguments, nothing else.
    if args:
        raise _pickle_refused("bytes() is admitted only without arguments")
    return b""


_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("__builtin__", "bytes"): _safe_empty_bytes,
    ("builtins", "bytes"): _safe_empty_bytes,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("_codecs", "encode"): _safe_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits numeric numpy arrays that carry all their bytes, and plain containers; nothing else.

    Each admitted global is a checking stand-in, not numpy's own function: an array is made only from
    bytes that are in the pickle, with a plain numeric dtype. Callers scan the opcodes first
    (`pickle_scan`), so no declared length makes it allocate more than the file holds.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            return _PICKLE_ALLOWED[(module, name)]
        raise WeightFileError(
            f"refused to unpickle: the file refers to {module}.{name}, and depthsite's pickle reader admits "
            "only numpy arrays and plain containers (a pickle can run code when loaded)",
            extra={"kind": "unsafe_pickle", "global": f"{module}.{name}"},
        )


class _MappedReader:
    """A file-like view of a read-only map for the unpickler: a read never returns more than remains."""

    def __init__(self, data: mmap.mmap):
        self._data = data

    def read(self, n: int = -1) -> bytes:
        return self._data.read(n)

    def readinto(self, buffer) -> int:
        chunk = self._data.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def readline(self) -> bytes:
        return self._data.readline()


def _restricted_load(data, name: str) -> Any:
    """Scan, then unpickle `data` (bytes or a read-only mmap) with the restricted unpickler."""
    pickle_scan(data, name)
    try:
        return RestrictedUnpickler(io.BytesIO(data) if isinstance(data, bytes) else _MappedReader(data)).load()
    except WeightFileError as exc:
        raise WeightFileError(f"{name}: {exc.message}", extra=exc.extra, file=name) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, RecursionError) as exc:
        raise WeightFileError(f"{name}: damaged pickle ({type(exc).__name__}: {exc})",
                              extra={"kind": "unreadable"}, file=name) from None


def restricted_loads(data: bytes) -> Any:
    return _restricted_load(bytes(data), "pickle")


def _read_pkl(path: Path, budget: int) -> LoadedWeights:
    size = path.stat().st_size
    # Arrays are copies of the file's bytes, so the file's size bounds what unpickling allocates.
    if size > budget:
        raise too_large(path, size, budget, what="pickle")
    with open(path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    with data:
        obj = _restricted_load(data, path.name)
    metadata: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("__depthsite__") == PKL_MARKER:
        raw_metadata = obj.get("metadata", {})
        metadata = {str(key): str(value) for key, value in raw_metadata.items()} if isinstance(raw_metadata, Mapping) else {}
        obj = obj.get("tensors", {})
    state_dict, unwrapped = _unwrap_state_dict(obj, path)
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise WeightFileError(f"{path.name}: entry {key!r} is a {type(value).__name__}, not an array",
                                  extra={"kind": "not_state_dict"}, file=path.name)
        check_dtype(path, str(key), value.dtype)
        arrays[str(key)] = value.view(np.ndarray) if type(value) is not np.ndarray else value
    return LoadedWeights("pkl", arrays, metadata=metadata, unwrapped=unwrapped)


def _write_pkl(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    payload = {
        "__depthsite__": PKL_MARKER,
        "metadata": {key: str(value) for key, value in metadata.items()},
        "tensors": {key: np.asarray(c_order(value)) for key, value in arrays.items()},
    }
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=5)
