"""PyTorch checkpoints (zip and legacy): checked against what torch would allocate, then loaded weights-only
with tensors memory-mapped where the layout allows; written as a bare state_dict."""
from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.guards import check_dtype, pickle_scan, tensor_budget, too_large
from models_registry.formats.loaded import LoadedWeights, _unwrap_state_dict
from models_registry.formats.sniff import LEGACY_TORCH_MAGIC, zip_directory_check


# torch unpickles data.pkl in Python; a state_dict's is a few hundred KB, DPT_Large's included.
PT_MAX_PICKLE = 16 * 1024 * 1024


def _pt_zip_check(path: Path, size: int, budget: int) -> None:
    """Every member of a torch zip stored uncompressed and inside the file, its pickle small and sound:
    torch then maps the tensors' records and never inflates or allocates what the file does not hold.
    The directory is bounded first, from the end records alone: zipfile (and torch) read all of it."""
    zip_directory_check(path, size)
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
