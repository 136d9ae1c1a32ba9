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
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.digest import c_order
from models_registry.formats.guards import (
    check_dtype,
    element_count,
    pickle_scan,
    tensor_budget,
    too_large,
)
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


def _plain_mapping(obj: Any) -> Any:
    """A plain dict of a dict (subclass): an unpickled OrderedDict may carry instance attributes (torch
    BUILDs them for `_metadata`) that shadow its methods, so its items are read through dict itself."""
    return dict(dict.items(obj)) if isinstance(obj, dict) else obj


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[Mapping[str, Any], bool]:
    obj = _plain_mapping(obj)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            return _plain_mapping(obj[wrapper]), True
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path.name} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)",
            extra={"kind": "not_state_dict"}, file=path.name,
        )
    return obj, False


# --- pt ------------------------------------------------------------------------------------------


# torch unpickles data.pkl in Python; a state_dict's is a few hundred KB, DPT_Large's included.
PT_MAX_PICKLE = 16 * 1024 * 1024


def _pt_zip_check(path: Path, size: int, budget: int) -> None:
    """Every member of a torch zip stored uncompressed and inside the file, its pickle small and sound:
    torch then maps the tensors' records and never inflates or allocates what the file does not hold."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = 0
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise WeightFileError(
                        f"{path.name}: member {info.filename} is compressed; torch checkpoints store every record "
                        "uncompressed, and a compressed one could expand far beyond the file",
                        extra={"kind": "unreadable"}, file=path.name,
                    )
                if info.header_offset + info.file_size > size:
                    raise WeightFileError(f"{path.name}: member {info.filename} extends past the end of the file",
                                          extra={"kind": "truncated_zip"}, file=path.name)
                if info.filename.endswith(".pkl"):
                    if info.file_size > PT_MAX_PICKLE:
                        raise WeightFileError(
                            f"{path.name}: its {info.filename} has {info.file_size} bytes (a state_dict's is a few "
                            f"hundred KB; at most {PT_MAX_PICKLE})", extra={"kind": "too_large"}, file=path.name)
                    pickle_scan(archive.read(info), f"{path.name}/{info.filename}")
                declared += info.file_size
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightFileError(f"{path.name}: damaged zip archive: {exc}", extra={"kind": "truncated_zip"},
                              file=path.name) from None
    if declared > size:
        raise WeightFileError(f"{path.name}: its members declare {declared} bytes but the file has {size}",
                              extra={"kind": "truncated_zip"}, file=path.name)
    if declared > budget:
        raise too_large(path, declared, budget)


def _pt_legacy_check(path: Path, size: int, budget: int) -> None:
    """The storages a legacy (pre-1.6) checkpoint declares, checked against its records before torch
    allocates them: torch's legacy loader allocates each declared storage before reading its bytes."""
    import torch
    from torch import _weights_only_unpickler

    with open(path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    declared: dict[str, tuple[int, int]] = {}  # root key -> (elements, element size)

    def persistent_load(saved_id):
        if not isinstance(saved_id, tuple) or len(saved_id) != 6:
            raise pickle.UnpicklingError("unexpected persistent id")
        _, storage_type, root_key, _, numel, _ = saved_id
        dtype = storage_type.dtype
        itemsize = torch._utils._element_size(dtype)
        if not isinstance(numel, int) or numel < 0 or numel * itemsize > size:
            raise WeightFileError(f"{path.name}: a storage declares {numel} elements, more than the file holds",
                                  extra={"kind": "truncated"}, file=path.name)
        declared[str(root_key)] = (numel, itemsize)
        storage = torch.UntypedStorage(numel * itemsize, device="meta")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    try:
        with data:
            pos = 0
            for _ in range(3):  # magic number, protocol version, system info
                pos = pickle_scan(data, path.name, pos)
            main_start = pos
            pos = pickle_scan(data, path.name, pos)
            keys_start = pos
            pos = pickle_scan(data, path.name, pos)
            unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data[main_start:keys_start]), encoding="utf-8")
            unpickler.persistent_load = persistent_load
            unpickler.load()
            keys = _weights_only_unpickler.Unpickler(io.BytesIO(data[keys_start:pos]), encoding="utf-8").load()
            total = 0
            for key in keys:
                numel, itemsize = declared[str(key)]
                if pos + 8 > size or int.from_bytes(data[pos:pos + 8], "little") != numel:
                    raise WeightFileError(f"{path.name}: storage {key} does not have the size its header declares",
                                          extra={"kind": "truncated"}, file=path.name)
                pos += 8 + numel * itemsize
                total += numel * itemsize
                if pos > size:
                    raise WeightFileError(f"{path.name}: storage {key} extends past the end of the file",
                                          extra={"kind": "truncated"}, file=path.name)
    except WeightFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, struct.error) as exc:
        raise WeightFileError(f"{path.name}: not a loadable PyTorch checkpoint: {type(exc).__name__}: {exc}",
                              extra={"kind": "unreadable"}, file=path.name) from None
    if total > budget:
        raise too_large(path, total, budget)


def read_pt_state_dict(path: Path, budget: int | None = None) -> tuple[dict, bool]:
    """{key: torch.Tensor} from a torch file (zip or legacy), weights-only; tensors are mmap'd when possible.

    What torch would allocate is checked first: a zip's records must be stored and inside the file,
    a legacy file's declared storages must be present, and neither may exceed `budget` bytes.
    """
    import torch

    size = path.stat().st_size
    budget = tensor_budget() if budget is None else budget
    with open(path, "rb") as handle:
        legacy = handle.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
    if legacy:
        _pt_legacy_check(path, size, budget)
    else:
        _pt_zip_check(path, size, budget)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(
            f"{path.name}: refused to load: the checkpoint holds objects other than tensors and plain "
            f"containers, and depthsite never unpickles arbitrary code ({first_line})",
            extra={"kind": "unsafe_pickle"}, file=path.name,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, MemoryError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(f"{path.name}: not a loadable PyTorch checkpoint: {first_line}",
                              extra={"kind": "unreadable"}, file=path.name) from None
    state_dict, unwrapped = _unwrap_state_dict(obj, path)
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightFileError(
                f"{path.name}: entry {key!r} is a {type(value).__name__}, not a tensor",
                extra={"kind": "not_state_dict"}, file=path.name,
            )
        tensors[str(key)] = value
    return tensors, unwrapped


def _read_pt(path: Path, budget: int) -> LoadedWeights:
    import torch

    tensors, unwrapped = read_pt_state_dict(path, budget)
    arrays = {}
    for key, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise WeightFileError(f"{path.name}: bfloat16 tensors are not supported ({key})",
                                  extra={"kind": "unsupported_dtype"}, file=path.name)
        if tensor.is_complex() or tensor.layout != torch.strided or tensor.is_quantized:
            raise WeightFileError(f"{path.name}: tensor {key!r} is not a plain dense real tensor",
                                  extra={"kind": "unsupported_dtype", "key": key}, file=path.name)
        arrays[key] = tensor.detach().cpu().numpy()
        check_dtype(path, key, arrays[key].dtype)
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


# --- h5 ------------------------------------------------------------------------------------------


H5_MAX_ATTRIBUTE = 1024 * 1024
H5_MAX_COMPACT = 64 * 1024


def _h5_refused(path: Path, key: str, why: str, kind: str = "h5_not_in_file") -> WeightFileError:
    return WeightFileError(
        f"{path.name}: {key!r} {why}; only datasets stored inside the file (contiguous or chunked) are "
        "weights, and nothing is read from anywhere else",
        extra={"kind": kind, "key": key}, file=path.name,
    )


def _h5_hard_link(path: Path, group, name: str) -> None:
    """Refuse a soft or external link by its link record alone: following it could open another file."""
    import h5py

    info = group.id.links.get_info(name.encode("utf-8"))
    if info.type != h5py.h5l.TYPE_HARD:
        what = {h5py.h5l.TYPE_SOFT: "is a soft link", h5py.h5l.TYPE_EXTERNAL: "is an external link"}
        raise _h5_refused(path, name, what.get(info.type, "is a user-defined link"))


@dataclass
class _H5Entry:
    key: str
    dataset: Any
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None  # contiguous data: where it starts in this file (memory-mapped)


def _h5_entry(path: Path, key: str, dataset, size: int) -> _H5Entry:
    """Where a dataset's bytes live, proven to be inside this file and written, before reading any of them."""
    import h5py

    dcpl = dataset.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise _h5_refused(path, key, "is a virtual dataset (its data lives in other datasets or files)")
    if dcpl.get_external_count() > 0:
        raise _h5_refused(path, key, "uses external raw storage (its bytes live in another file)")
    dtype = check_dtype(path, key, dataset.dtype)
    if dataset.shape is None:
        raise _h5_refused(path, key, "has no dataspace", kind="unreadable")
    shape = tuple(int(dim) for dim in dataset.shape)
    nbytes = element_count(path, key, shape) * dtype.itemsize
    if nbytes == 0:
        return _H5Entry(key, dataset, dtype, shape, 0, None)
    if layout == h5py.h5d.CONTIGUOUS:
        if dcpl.get_nfilters():
            raise _h5_refused(path, key, "is contiguous with filters", kind="unreadable")
        offset = dataset.id.get_offset()
        if offset is None:
            raise _h5_refused(path, key, "is declared but its data was never written", kind="unwritten")
        if offset + nbytes > size:
            raise WeightFileError(f"{path.name}: dataset {key} extends past the end of the file",
                                  extra={"kind": "truncated"}, file=path.name)
        return _H5Entry(key, dataset, dtype, shape, nbytes, offset)
    if layout == h5py.h5d.COMPACT:
        # Compact data sits in the dataset's own header inside this file, at most 64 KiB.
        if nbytes > H5_MAX_COMPACT:
            raise _h5_refused(path, key, f"is a compact dataset of {nbytes} bytes", kind="unreadable")
        return _H5Entry(key, dataset, dtype, shape, nbytes, None)
    if layout != h5py.h5d.CHUNKED:
        raise _h5_refused(path, key, f"has an unknown storage layout ({layout})", kind="unreadable")
    filters = [dcpl.get_filter(index)[0] for index in range(dcpl.get_nfilters())]
    allowed = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32}
    if any(code not in allowed for code in filters):
        raise _h5_refused(path, key, f"uses filters {filters} (only deflate, shuffle and fletcher32 are read)",
                          kind="unreadable")
    chunks = dataset.chunks or ()
    expected = 1
    for dim, chunk in zip(shape, chunks):
        expected *= math.ceil(dim / chunk)
    if dataset.id.get_num_chunks() < expected:
        raise _h5_refused(path, key, "is declared but some of its chunks were never written", kind="unwritten")
    stored = dataset.id.get_storage_size()
    if stored > size or (not filters and stored < nbytes):
        raise WeightFileError(f"{path.name}: dataset {key} declares more stored bytes than the file holds",
                              extra={"kind": "truncated"}, file=path.name)
    return _H5Entry(key, dataset, dtype, shape, nbytes, None)


def _h5_metadata(path: Path, handle) -> dict[str, str]:
    import h5py

    metadata = {}
    for name in list(handle.attrs.keys())[:256]:
        attribute = h5py.h5a.open(handle.id, name.encode("utf-8"))
        if attribute.get_storage_size() > H5_MAX_ATTRIBUTE:
            raise WeightFileError(f"{path.name}: attribute {name!r} is larger than {H5_MAX_ATTRIBUTE} bytes",
                                  extra={"kind": "too_large"}, file=path.name)
        value = handle.attrs[name]
        metadata[name] = value.decode() if isinstance(value, bytes) else str(value)
    return metadata


def _read_h5(path: Path, budget: int) -> LoadedWeights:
    """Every tensor is a hard-linked dataset of this file; contiguous ones are memory-mapped."""
    import h5py

    size = path.stat().st_size
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise WeightFileError(f"{path.name}: not a readable HDF5 file (truncated or damaged): {exc}",
                              extra={"kind": "unreadable"}, file=path.name) from None
    arrays: dict[str, np.ndarray] = {}
    with handle:
        try:
            metadata = _h5_metadata(path, handle)
            group = handle
            if handle.id.links.exists(b"tensors"):
                _h5_hard_link(path, handle, "tensors")
                group = handle["tensors"]
                if not isinstance(group, h5py.Group):
                    raise _h5_refused(path, "tensors", "is not a group", kind="unreadable")
            entries = []
            for key in group.keys():
                _h5_hard_link(path, group, key)
                obj = group[key]
                if not isinstance(obj, h5py.Dataset):
                    if group is handle:
                        continue  # a flat file's other groups are not tensors
                    raise _h5_refused(path, key, "is not a dataset", kind="unreadable")
                entries.append(_h5_entry(path, key, obj, size))
            declared = sum(entry.nbytes for entry in entries)
            if declared > budget:
                raise too_large(path, declared, budget)
            for entry in entries:
                if entry.offset is not None:
                    count = entry.nbytes // entry.dtype.itemsize
                    mapped = np.memmap(path, dtype=entry.dtype, mode="c", offset=entry.offset, shape=(count,))
                    arrays[entry.key] = mapped.reshape(entry.shape)
                elif entry.nbytes == 0:
                    arrays[entry.key] = np.zeros(entry.shape, entry.dtype)
                else:
                    arrays[entry.key] = np.asarray(entry.dataset[()]).reshape(entry.shape)
        except (OSError, KeyError, RuntimeError, ValueError, TypeError, MemoryError) as exc:
            raise WeightFileError(f"{path.name}: damaged HDF5 file: {type(exc).__name__}: {exc}",
                                  extra={"kind": "unreadable"}, file=path.name) from None
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


# --- dispatch ------------------------------------------------------------------------------------

# Bytes a file needs beyond its tensors (headers, names, metadata, HDF5's object headers), for the room check.
WRITE_OVERHEAD = 1024 * 1024

_READERS = {"pt": _read_pt, "safetensors": _read_safetensors, "h5": _read_h5, "pkl": _read_pkl}
_WRITERS = {"pt": _write_pt, "safetensors": _write_safetensors, "h5": _write_h5, "pkl": _write_pkl}


def _checked_format(path: Path, expected: str | None) -> str:
    """Sniff before every read (a few KB), so a damaged file is named for what it is, not for how a loader fails."""
    found = sniff_format(path)
    if expected and found != expected:
        raise WeightFileError(f"{path.name} holds {found} content, not {expected}",
                              extra={"kind": "format_mismatch", "found": found, "expected": expected}, file=path.name)
    return found


def read_weights(path: Path | str, fmt: str | None = None, *, architecture: str | None = None) -> LoadedWeights:
    """Load every tensor of a weight file as numpy arrays; the format is sniffed unless given.

    What a reader allocates is bounded, before it allocates, by the bytes present in the file and by the
    tensor bytes of `architecture` (of the largest architecture when it is not known).
    """
    path = Path(path)
    fmt = _checked_format(path, fmt)
    if fmt == BUNDLE:
        raise WeightFileError(f"{path.name} is a bundle (.tar); import it instead of reading it as weights",
                              extra={"kind": "bundle"}, file=path.name)
    return _READERS[fmt](path, tensor_budget(architecture))


def write_weights(arrays: Mapping[str, np.ndarray], path: Path | str, fmt: str,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write arrays in `fmt` to `path` (a temporary path: the caller renames it) and flush it to disk."""
    from models_registry import cachefs

    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **(metadata or {})}
    # Room first: HDF5 can crash the process (not just raise) when a write fails on a full disk midway.
    cachefs.ensure_room(path, sum(np.asarray(value).nbytes for value in arrays.values()) + WRITE_OVERHEAD)
    try:
        with cachefs.disk_full_as_error(path):
            _WRITERS[fmt](arrays, path, meta)
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written file is never left, whatever stopped the writer
        raise
