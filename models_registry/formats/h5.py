"""HDF5 weight files: only hard-linked datasets stored inside the file and written are read (contiguous ones
memory-mapped); links, external or virtual storage are refused before a byte is read."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from depthsite.exceptions import WeightFileError
from models_registry.formats.digest import c_order
from models_registry.formats.guards import check_declared_total, check_dtype, element_count
from models_registry.formats.loaded import LoadedWeights

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
    """The root attributes as strings, each one a single string or number (what `_write_h5` writes).

    An attribute's stored size says little about what decoding it allocates: a variable-length string is
    stored as a 16-byte pointer into the global heap, and many pointers may name one large string. So only an
    attribute holding one value (a scalar dataspace of a string or numeric type, never an array type or a
    compound) is read, any other is left out undecoded, and the decoded values together may not pass
    H5_MAX_ATTRIBUTE characters: at worst one string no larger than the file is decoded past the limit.
    """
    import h5py

    metadata = {}
    decoded = 0
    single_values = {h5py.h5t.STRING, h5py.h5t.INTEGER, h5py.h5t.FLOAT}
    for name in list(handle.attrs.keys())[:256]:
        attribute = h5py.h5a.open(handle.id, name.encode("utf-8"))
        scalar = attribute.get_space().get_simple_extent_type() == h5py.h5s.SCALAR
        if not scalar or attribute.get_type().get_class() not in single_values:
            continue  # not metadata depthsite writes (a Keras file's layer lists): left out, never decoded
        if attribute.get_storage_size() > H5_MAX_ATTRIBUTE:
            raise WeightFileError(f"{path.name}: attribute {name!r} is larger than {H5_MAX_ATTRIBUTE} bytes",
                                  extra={"kind": "too_large"}, file=path.name)
        value = handle.attrs[name]
        text = value.decode() if isinstance(value, bytes) else str(value)
        decoded += len(text)
        if decoded > H5_MAX_ATTRIBUTE:
            raise WeightFileError(
                f"{path.name}: its metadata decodes to more than {H5_MAX_ATTRIBUTE} characters (at attribute "
                f"{name!r}); depthsite writes a few short strings", extra={"kind": "too_large"}, file=path.name)
        metadata[name] = text
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
            # Before a chunk is inflated: deflate turns a few KB of file into a gigabyte of zeros, and hard
            # links name one dataset under many keys.
            check_declared_total(path, sum(entry.nbytes for entry in entries), size, budget)
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
