"""Safe readers and writers of the four weight formats.

Readers never execute code from a file: `pt` goes through torch's weights-only unpickler, `pkl`
through a restricted unpickler that admits numpy arrays and plain containers only, `safetensors`
and `h5` are parsed as data. Large tensors are memory-mapped (copy-on-write) where the format
allows it, so reading a checkpoint costs little more than the page cache.
Writers write to exactly the path they are given; callers pass a temporary path and rename it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models_registry.exceptions import WeightFileError
from models_registry.formats.digest import c_order
from models_registry.formats.sniff import BUNDLE, LEGACY_TORCH_MAGIC, sniff_format

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
PKL_MARKER = "depthsite-weights"


@dataclass
class LoadedWeights:
    format: str
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    unwrapped: bool = False  # the file held {"model": state_dict, ...}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(array.shape) for key, array in self.arrays.items()}

    @property
    def dtype(self) -> str:
        """The dtype of most floating-point elements ('float32' for the official checkpoints)."""
        counts: dict[str, int] = {}
        for array in self.arrays.values():
            if array.dtype.kind == "f":
                counts[array.dtype.name] = counts.get(array.dtype.name, 0) + array.size
        return max(counts, key=counts.get) if counts else ""


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[Mapping[str, Any], bool]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return obj["model"], True
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"], True
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path.name} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)",
            extra={"kind": "not_state_dict"},
        )
    return obj, False


# --- pt ------------------------------------------------------------------------------------------


def read_pt_state_dict(path: Path) -> tuple[dict, bool]:
    """{key: torch.Tensor} from a torch file (zip or legacy), weights-only; tensors are mmap'd when possible."""
    import torch

    with open(path, "rb") as handle:
        legacy = handle.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(
            f"{path.name}: refused to load: the checkpoint holds objects other than tensors and plain "
            f"containers, and depthsite never unpickles arbitrary code ({first_line})",
            extra={"kind": "unsafe_pickle"},
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(f"{path.name}: not a loadable PyTorch checkpoint: {first_line}",
                              extra={"kind": "unreadable"}) from None
    state_dict, unwrapped = _unwrap_state_dict(obj, path)
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightFileError(
                f"{path.name}: entry {key!r} is a {type(value).__name__}, not a tensor",
                extra={"kind": "not_state_dict"},
            )
        tensors[str(key)] = value
    return tensors, unwrapped


def _read_pt(path: Path) -> LoadedWeights:
    import torch

    tensors, unwrapped = read_pt_state_dict(path)
    arrays = {}
    for key, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise WeightFileError(f"{path.name}: bfloat16 tensors are not supported ({key})",
                                  extra={"kind": "unsupported_dtype"})
        arrays[key] = tensor.detach().cpu().numpy()
    return LoadedWeights("pt", arrays, unwrapped=unwrapped)


def _write_pt(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    import collections

    import torch

    # A bare state_dict in the official layout: the official MiDaS loaders read it unchanged.
    state_dict = collections.OrderedDict((key, torch.from_numpy(np.array(value, copy=True)))
                                         for key, value in arrays.items())
    torch.save(state_dict, path)


# --- safetensors ---------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: Path) -> LoadedWeights:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise WeightFileError(f"{path.name}: unreadable safetensors header: {exc}",
                                  extra={"kind": "unreadable"}) from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    whole = np.memmap(path, dtype=np.uint8, mode="c") if size > data_start else np.zeros(0, np.uint8)
    arrays = {}
    for key, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightFileError(f"{path.name}: unsupported safetensors dtype {info.get('dtype')} ({key})",
                                  extra={"kind": "unsupported_dtype"})
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize if shape else np.dtype(dtype).itemsize
        if end - begin != expected or data_start + end > size:
            raise WeightFileError(
                f"{path.name}: tensor {key} lies outside the file or has the wrong length "
                "(a truncated or damaged safetensors file)",
                extra={"kind": "truncated_safetensors"},
            )
        arrays[key] = whole[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return LoadedWeights("safetensors", arrays, metadata=dict(metadata))


def _write_safetensors(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file({key: c_order(value) for key, value in arrays.items()}, str(path),
              metadata={key: str(value) for key, value in metadata.items()})


# --- h5 ------------------------------------------------------------------------------------------


def _read_h5(path: Path) -> LoadedWeights:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise WeightFileError(f"{path.name}: not a readable HDF5 file (truncated or damaged): {exc}",
                              extra={"kind": "unreadable"}) from None
    arrays: dict[str, np.ndarray] = {}
    with handle:
        metadata = {key: (value.decode() if isinstance(value, bytes) else str(value))
                    for key, value in handle.attrs.items()}
        group = handle["tensors"] if "tensors" in handle else handle
        try:
            for key, dataset in group.items():
                if not isinstance(dataset, h5py.Dataset):
                    continue
                offset = dataset.id.get_offset()
                contiguous = dataset.chunks is None and not dataset.compression and offset is not None
                if contiguous and dataset.size > 0 and dataset.dtype.kind in "fiub":
                    count = int(np.prod(dataset.shape)) if dataset.shape else 1
                    if offset + count * dataset.dtype.itemsize > path.stat().st_size:
                        raise WeightFileError(f"{path.name}: dataset {key} extends past the end of the file",
                                              extra={"kind": "truncated"})
                    mapped = np.memmap(path, dtype=dataset.dtype, mode="c", offset=offset, shape=(count,))
                    arrays[key] = mapped.reshape(dataset.shape)
                else:
                    arrays[key] = dataset[()] if dataset.shape else np.array(dataset[()])
        except (OSError, KeyError, RuntimeError) as exc:
            raise WeightFileError(f"{path.name}: damaged HDF5 file: {exc}", extra={"kind": "unreadable"}) from None
    return LoadedWeights("h5", arrays, metadata=metadata)


def _write_h5(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    import h5py

    with h5py.File(path, "w", track_order=True) as handle:
        for key, value in metadata.items():
            handle.attrs[key] = str(value)
        group = handle.create_group("tensors", track_order=True)
        for key, value in arrays.items():
            if "/" in key:
                raise WeightFileError(f"tensor name {key!r} contains '/', which HDF5 reads as a group path")
            # No chunking or compression: one contiguous block per tensor, which readers memory-map.
            group.create_dataset(key, data=c_order(value))


# --- pkl -----------------------------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol 2 spells bytes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and plain containers; every other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise WeightFileError(
            f"refused to unpickle: the file refers to {module}.{name}, and depthsite's pickle reader admits "
            "only numpy arrays and plain containers (a pickle can run code when loaded)",
            extra={"kind": "unsafe_pickle", "global": f"{module}.{name}"},
        )


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _read_pkl(path: Path) -> LoadedWeights:
    try:
        with open(path, "rb") as handle:
            obj = RestrictedUnpickler(handle).load()
    except WeightFileError as exc:
        raise WeightFileError(f"{path.name}: {exc.message}", extra=exc.extra) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, MemoryError) as exc:
        raise WeightFileError(f"{path.name}: damaged pickle ({type(exc).__name__}: {exc})",
                              extra={"kind": "unreadable"}) from None
    metadata: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("__depthsite__") == PKL_MARKER:
        metadata = {key: str(value) for key, value in obj.get("metadata", {}).items()}
        obj = obj.get("tensors", {})
    state_dict, unwrapped = _unwrap_state_dict(obj, path)
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise WeightFileError(f"{path.name}: entry {key!r} is a {type(value).__name__}, not an array",
                                  extra={"kind": "not_state_dict"})
        arrays[str(key)] = value
    return LoadedWeights("pkl", arrays, metadata=metadata, unwrapped=unwrapped)


def _write_pkl(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    payload = {
        "__depthsite__": PKL_MARKER,
        "metadata": {key: str(value) for key, value in metadata.items()},
        "tensors": {key: np.asarray(c_order(value)) for key, value in arrays.items()},
    }
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=5)


# --- dispatch ------------------------------------------------------------------------------------

_READERS = {"pt": _read_pt, "safetensors": _read_safetensors, "h5": _read_h5, "pkl": _read_pkl}
_WRITERS = {"pt": _write_pt, "safetensors": _write_safetensors, "h5": _write_h5, "pkl": _write_pkl}


def _checked_format(path: Path, expected: str | None) -> str:
    """Sniff before every read (a few KB), so a damaged file is named for what it is, not for how a loader fails."""
    found = sniff_format(path)
    if expected and found != expected:
        raise WeightFileError(f"{path.name} holds {found} content, not {expected}",
                              extra={"kind": "format_mismatch", "found": found, "expected": expected})
    return found


def read_weights(path: Path | str, fmt: str | None = None) -> LoadedWeights:
    """Load every tensor of a weight file as numpy arrays; the format is sniffed unless given."""
    path = Path(path)
    fmt = _checked_format(path, fmt)
    if fmt == BUNDLE:
        raise WeightFileError(f"{path.name} is a bundle (.tar); import it instead of reading it as weights",
                              extra={"kind": "bundle"})
    return _READERS[fmt](path)


def read_state_dict(path: Path | str, fmt: str | None = None) -> dict:
    """{key: torch.Tensor} for loading into a network, without a second copy of the weights in memory."""
    import torch

    path = Path(path)
    fmt = _checked_format(path, fmt)
    if fmt == "pt":
        return read_pt_state_dict(path)[0]
    loaded = read_weights(path, fmt)
    return {key: torch.from_numpy(array) for key, array in loaded.arrays.items()}


def write_weights(arrays: Mapping[str, np.ndarray], path: Path | str, fmt: str,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write arrays in `fmt` to `path` (a temporary path: the caller renames it) and flush it to disk."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **(metadata or {})}
    _WRITERS[fmt](arrays, path, meta)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
