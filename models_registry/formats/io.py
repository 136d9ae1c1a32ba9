"""Safe readers and writers of the four weight formats: the entry points that sniff, bound and dispatch.

Readers never execute code from a file: `pt` goes through torch's weights-only unpickler, `pkl`
through a restricted unpickler that admits numpy arrays and plain containers only, `safetensors`
and `h5` are parsed as data (one module per format: `pt.py`, `pkl.py`, `safetensors_file.py`, `h5.py`).
Large tensors are memory-mapped (copy-on-write) where the format allows it, so reading a checkpoint costs
little more than the page cache. Writers write to exactly the path they are given; callers pass a temporary
path and rename it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.guards import check_tensor_bytes, tensor_budget
from models_registry.formats.h5 import _read_h5, _write_h5
from models_registry.formats.loaded import LoadedWeights
from models_registry.formats.pkl import _read_pkl, _write_pkl
from models_registry.formats.pt import _read_pt, _write_pt
from models_registry.formats.safetensors_file import _read_safetensors, _write_safetensors
from models_registry.formats.sniff import BUNDLE, sniff_format

FORMAT_VERSION = "1"

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
    tensor bytes of `architecture` (of the largest architecture when it is not known). What the arrays it
    hands back stand for (their logical bytes, which a copy or a digest allocates) is bounded here, for every
    format alike: a reader's arrays may be views that name one stored byte many times.
    """
    path = Path(path)
    fmt = _checked_format(path, fmt)
    if fmt == BUNDLE:
        raise WeightFileError(f"{path.name} is a bundle (.tar); import it instead of reading it as weights",
                              extra={"kind": "bundle"}, file=path.name)
    budget = tensor_budget(architecture)
    loaded = _READERS[fmt](path, budget)
    check_tensor_bytes(path, loaded.arrays, path.stat().st_size, budget)
    return loaded


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
