"""Hostile weight files and bundles, built with the real libraries (h5py, pickle, tarfile), for tests and benches.

Each maker writes one file at `path` and returns the path. None of them is valid weights: a reader must
refuse each with a clear WeightFileError before it reads a byte it should not or allocates what the
file does not hold. numpy and h5py only, except the torch makers, which import torch lazily.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Mapping

import numpy as np

# Big enough to show up in any memory measurement (512 MB), small enough for a test box to survive.
DECLARED_BYTES = 512 * 1024 * 1024


def _h5_plain(handle, arrays: Mapping[str, np.ndarray] | None, skip) -> object:
    group = handle.create_group("tensors")
    for key, value in (arrays or {}).items():
        if not skip(key):
            group.create_dataset(key, data=np.ascontiguousarray(value))
    return group


def make_h5_external(path: Path, target: Path, arrays: Mapping[str, np.ndarray] | None = None) -> Path:
    """An .h5 whose datasets use external raw storage in `target` (num_batches_tracked ones, or one 0-d int64)."""
    import h5py

    with h5py.File(path, "w") as handle:
        group = _h5_plain(handle, arrays, lambda key: key.endswith("num_batches_tracked"))
        keys = [key for key in (arrays or {}) if key.endswith("num_batches_tracked")] or ["num_batches_tracked"]
        for index, key in enumerate(keys):
            # The low-level API: h5py's create_dataset ignores `external` for a 0-d dataset.
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_external(str(target).encode(), 8 * index, 8)
            h5py.h5d.create(group.id, key.encode(), h5py.h5t.STD_I64LE, h5py.h5s.create(h5py.h5s.SCALAR), dcpl=dcpl)
    return Path(path)


def make_h5_external_devzero(path: Path, device: str = "/dev/zero") -> Path:
    """An .h5 with one dataset declared 512 MB of float32 whose external raw storage is a device (or FIFO)."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_group("tensors").create_dataset(
            "weight", shape=(DECLARED_BYTES // 4,), dtype="<f4", external=[(device, 0, DECLARED_BYTES)])
    return Path(path)


def make_h5_external_fifo(path: Path, fifo: Path) -> Path:
    """An .h5 whose dataset's external raw storage is a FIFO (created at `fifo`): reading it never ends."""
    import os

    os.mkfifo(fifo)
    return make_h5_external_devzero(path, device=str(fifo))


def make_h5_external_link(path: Path, target_h5: Path) -> Path:
    """An .h5 whose tensor is an external link to dataset /secret of another HDF5 file."""
    import h5py

    with h5py.File(target_h5, "w") as other:
        other.create_dataset("secret", data=np.frombuffer(b"SECRETSECRETSECR", dtype="<i8"))
    with h5py.File(path, "w") as handle:
        handle.create_group("tensors")["weight"] = h5py.ExternalLink(str(target_h5), "/secret")
    return Path(path)


def make_h5_soft_link(path: Path) -> Path:
    """An .h5 whose tensor is a soft link to a dataset outside the tensors group."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("elsewhere", data=np.arange(4, dtype="<f4"))
        handle.create_group("tensors")["weight"] = h5py.SoftLink("/elsewhere")
    return Path(path)


def make_h5_virtual(path: Path, source_h5: Path) -> Path:
    """An .h5 whose tensor is a virtual dataset mapping dataset /secret of another file."""
    import h5py

    with h5py.File(source_h5, "w") as other:
        other.create_dataset("secret", data=np.frombuffer(b"SECRETSECRETSECR", dtype="<i8"))
    layout = h5py.VirtualLayout(shape=(2,), dtype="<i8")
    layout[:] = h5py.VirtualSource(str(source_h5), "secret", shape=(2,))
    with h5py.File(path, "w") as handle:
        handle.create_group("tensors").create_virtual_dataset("weight", layout)
    return Path(path)


def make_h5_unwritten(path: Path) -> Path:
    """A ~2 KB .h5 with a contiguous dataset declared 512 MB of float32 and never written."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_group("tensors").create_dataset("weight", shape=(DECLARED_BYTES // 4,), dtype="<f4")
    return Path(path)


def make_h5_unwritten_chunks(path: Path) -> Path:
    """A small .h5 with a chunked dataset declared 512 MB of float32 of which one chunk was written."""
    import h5py

    with h5py.File(path, "w") as handle:
        dataset = handle.create_group("tensors").create_dataset(
            "weight", shape=(DECLARED_BYTES // 4,), dtype="<f4", chunks=(1024,))
        dataset[:1024] = 1.0
    return Path(path)


def make_h5_declared_larger(path: Path) -> Path:
    """An .h5 whose contiguous dataset is declared 512 MB but the file is cut after its first kilobytes."""
    import h5py

    with h5py.File(path, "w") as handle:
        dataset = handle.create_group("tensors").create_dataset(
            "weight", shape=(DECLARED_BYTES // 4,), dtype="<f4")
        dataset[:1024] = 1.0  # allocates the storage, so the file is 512 MB: cut it back below
        offset = dataset.id.get_offset()
    with open(path, "r+b") as handle:
        handle.truncate(offset + 4096)
    return Path(path)


def make_pkl_uninitialised(path: Path) -> Path:
    """A tiny pickle that calls numpy.ndarray((N,)): 512 MB of uninitialised memory from a few bytes."""
    count = DECLARED_BYTES // 8
    data = (b"\x80\x02}q\x00X\x06\x00\x00\x00weightq\x01cnumpy\nndarray\nq\x02J"
            + struct.pack("<i", count) + b"\x85q\x03\x85q\x04Rq\x05s.")
    Path(path).write_bytes(data)
    return Path(path)


class _Reconstructed:
    """Pickles as numpy's own array reduction, but with a state that carries fewer bytes than its shape."""

    def __init__(self, shape, dtype, raw):
        self.state = (1, shape, np.dtype(dtype), False, raw)

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


def make_pkl_reconstruct_without_data(path: Path) -> Path:
    """A pickle of {"weight": array} rebuilt by _reconstruct + BUILD with a 512 MB shape and 4 bytes of data."""
    payload = {"weight": _Reconstructed((DECLARED_BYTES // 4,), "<f4", b"\x00" * 4)}
    Path(path).write_bytes(pickle.dumps(payload, protocol=2))
    return Path(path)


def make_pkl_object_dtype(path: Path) -> Path:
    """A pickle of {"weight": an object-dtype array}."""
    payload = {"weight": np.array([1, "text", None], dtype=object)}
    Path(path).write_bytes(pickle.dumps(payload, protocol=2))
    return Path(path)


def make_pkl_shadowed_items(path: Path) -> Path:
    """A pickle of an OrderedDict whose BUILD sets an instance attribute `items` = 1 (shadowing the method)."""
    Path(path).write_bytes(pickle.dumps(_ShadowedItems(), protocol=2))
    return Path(path)


class _ShadowedItems:
    """Pickles as OrderedDict() + SETITEMS + BUILD({"items": 1}), as a tampered state_dict would."""

    def __init__(self, tensor=None):
        self.tensor = np.zeros(2, "<f4") if tensor is None else tensor

    def __reduce__(self):
        import collections

        return collections.OrderedDict, (), {"items": 1}, None, iter([("weight", self.tensor)])


def make_pt_shadowed_items(path: Path) -> Path:
    """A torch zip whose state_dict OrderedDict is BUILT with an attribute `items` = 1 (torch allows it)."""
    import torch

    torch.save(_ShadowedItems(tensor=torch.zeros(2)), path)
    return Path(path)


def make_pkl_huge_length(path: Path) -> Path:
    """A pickle whose BINBYTES8 declares 2**40 bytes (the C unpickler allocates a declared length first)."""
    Path(path).write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"x" * 16 + b".")
    return Path(path)


def make_pkl_memo_bomb(path: Path) -> Path:
    """A pickle whose LONG_BINPUT index 2**32-1 makes the C unpickler grow its memo to 32 GB."""
    Path(path).write_bytes(b"\x80\x02}r" + struct.pack("<I", 2**32 - 1) + b".")
    return Path(path)


def make_pkl_opcode_flood(path: Path, count: int = 1_000_001) -> Path:
    """A ~1 MB pickle of `count` NONE opcodes: each one a stack slot for the unpickler (8 GB at 1 G opcodes)."""
    Path(path).write_bytes(b"\x80\x02" + b"N" * count + b".")
    return Path(path)


def _safetensors(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return Path(path)


SAFETENSORS_MALFORMED = {
    "missing_data_offsets": ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "entry_not_a_dict": ({"w": [1, 2, 3]}, b""),
    "negative_dim": ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative_offset": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
    "list_metadata": ({"__metadata__": ["a"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                      b"\0" * 4),
    "overlapping": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "out_of_file": ({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\0" * 4),
    "header_not_a_dict": ([1, 2], b""),
    "shape_not_a_list": ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, b"\0" * 16),
    "offsets_reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
}


def make_safetensors_malformed(path: Path, variant: str) -> Path:
    """A safetensors file with one malformed header of SAFETENSORS_MALFORMED (by name)."""
    header, data = SAFETENSORS_MALFORMED[variant]
    return _safetensors(path, header, data)


def make_safetensors_huge_header(path: Path) -> Path:
    """A safetensors file whose header length field claims 2**62 bytes."""
    return _safetensors(path, b'{"w": {}}', header_len=2**62)


def _bundle_manifest(member: str) -> bytes:
    return json.dumps({"bundle_version": 1, "model": "MiDaS_small", "format": "pt", "file": member}).encode()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_sparse_tar(path: Path, realsize: int = 256 * 1024 * 1024) -> Path:
    """A ~10 KB bundle whose weight member is a PAX (GNU 1.0) sparse file of `realsize` bytes of zeros."""
    member = "midas_v21_small_256.pt"
    sparse_map = b"1\n0\n512\n"  # one region: offset 0, 512 bytes; the rest is a hole
    body = sparse_map.ljust(512, b"\0") + b"\0" * 512
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, "manifest.json", _bundle_manifest(member))
        info = tarfile.TarInfo("GNUSparseFile.0/" + member)
        info.size = len(body)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": member,
                            "GNU.sparse.realsize": str(realsize)}
        archive.addfile(info, io.BytesIO(body))
    return Path(path)


def make_gnu_sparse_tar(path: Path, realsize: int = 256 * 1024 * 1024) -> Path:
    """A bundle whose weight member is an old GNU sparse member (type 'S') of `realsize` bytes."""
    member = "midas_v21_small_256.pt"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        _add(archive, "manifest.json", _bundle_manifest(member))
        _add(archive, member, b"\0" * 512)
    raw = bytearray(Path(path).read_bytes())
    header = next(offset for offset in range(0, len(raw), 512) if raw[offset:].startswith(member.encode()))
    block = raw[header:header + 512]
    block[156:157] = tarfile.GNUTYPE_SPARSE
    block[386:398] = b"%011o\0" % 0  # sparse region 0: offset 0
    block[398:410] = b"%011o\0" % 512  # ... 512 bytes stored
    block[483:495] = b"%011o\0" % realsize  # the size the member expands to
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    raw[header:header + 512] = block
    Path(path).write_bytes(bytes(raw))
    return Path(path)


def make_tar_huge_pax_header(path: Path, declared: int = 1024**3) -> Path:
    """A 2 KB bundle whose first member is a PAX extended header declaring `declared` bytes."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = declared
    block = header.tobuf(format=tarfile.USTAR_FORMAT)
    Path(path).write_bytes(block + b"20 path=manifest.json\n".ljust(512, b"\0") + b"\0" * 1024)
    return Path(path)


def make_bundle_oversized_manifest(path: Path, size: int = 8 * 1024 * 1024) -> Path:
    """A bundle whose manifest.json is `size` bytes of JSON whitespace."""
    with tarfile.open(path, "w") as archive:
        _add(archive, "manifest.json", b" " * size + _bundle_manifest("w.pt"))
    return Path(path)


def make_pt_legacy_declared_large(path: Path, numel: int = DECLARED_BYTES // 4) -> Path:
    """A legacy (pre-1.6) torch file whose one float32 storage declares `numel` elements but holds four."""
    import collections

    import torch
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class _Storage:
        pass

    storage = _Storage()

    class _Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, (numel,), (1,), False, collections.OrderedDict())

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    buffer = io.BytesIO()
    for value in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(value, buffer, protocol=2)
    _Pickler(buffer, protocol=2).dump({"weight": _Tensor()})
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write(struct.pack("<q", numel) + b"\0" * 16)
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


def make_pt_compressed(path: Path, source_pt: Path) -> Path:
    """A copy of a torch zip checkpoint with every record deflate-compressed."""
    import zipfile

    with zipfile.ZipFile(source_pt) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return Path(path)


def make_h5_aliased_attribute(path: Path, string_bytes: int = 32 * 1024, count: int = 2048,
                              as_array_type: bool = False) -> Path:
    """A ~100 KB .h5 whose metadata attribute holds `count` + 1 variable-length strings, every one of them
    pointing at the same `string_bytes`-byte string in the global heap: reading it decodes 64 MB.

    Each string is a 16-byte record in the attribute (length, heap collection address, object index); the
    records of entries 1..count are overwritten with entry 0's. `as_array_type` stores the strings as one
    value of an HDF5 array type in a scalar dataspace instead of a one-dimensional dataspace of strings.
    """
    import h5py

    values = np.array(["A" * string_bytes] + ["b"] * count, dtype=object)
    with h5py.File(path, "w") as handle:
        handle.attrs["format_version"] = "1"
        if as_array_type:
            handle.attrs.create("notes", values, dtype=np.dtype((h5py.string_dtype(), values.shape)))
        else:
            handle.attrs.create("notes", values, dtype=h5py.string_dtype())
        handle.create_group("tensors").create_dataset("weight", data=np.zeros(4, "<f4"))
    raw = bytearray(Path(path).read_bytes())
    short = struct.pack("<I", 1)
    start = raw.find(struct.pack("<I", string_bytes))
    while start >= 0 and raw[start + 16:start + 20] != short:
        start = raw.find(struct.pack("<I", string_bytes), start + 1)
    if start < 0:
        raise ValueError("the attribute's string records were not found in the file")
    first = bytes(raw[start:start + 16])
    for index in range(1, count + 1):
        record = start + 16 * index
        if raw[record:record + 4] != short:
            raise ValueError(f"string record {index} is not where it was expected")
        raw[record:record + 16] = first
    Path(path).write_bytes(bytes(raw))
    return Path(path)


def make_pt_expanded(path: Path, shape: tuple[int, ...] = (40_000, 40_000)) -> Path:
    """A ~1.5 KB torch zip holding one float32 element expanded (stride 0) to `shape`: 6.4 GB once copied."""
    import torch

    torch.save({"weight": torch.zeros(1).expand(*shape)}, path)
    return Path(path)


def make_pt_strided_overlap(path: Path, rows: int = 40_000) -> Path:
    """A 320 KB torch zip whose one tensor is a (rows, rows) view with strides (1, 1) of 2 * rows elements:
    no stride is zero, yet row i is row 0 shifted by i elements."""
    import torch

    torch.save({"weight": torch.zeros(2 * rows).as_strided((rows, rows), (1, 1))}, path)
    return Path(path)


def make_pkl_aliased(path: Path, count: int = 4096, elements: int = 16 * 1024) -> Path:
    """A ~120 KB pickle naming one 64 KB float32 array under `count` keys (the pickle memo refers back to
    it): 256 MB of tensors once each key is copied or converted."""
    array = np.zeros(elements, "<f4")
    Path(path).write_bytes(pickle.dumps({f"layer{index}.weight": array for index in range(count)}, protocol=4))
    return Path(path)


def make_zip_many_entries(path: Path, count: int = 30_000, name_length: int = 120, zip64: bool = False) -> Path:
    """A torch-like zip (archive/data.pkl of an empty dict) with `count` more empty records whose names are
    about `name_length` bytes: its central directory alone is a few MB, and zipfile keeps a ZipInfo per entry.

    `zip64` rewrites the end of the archive as ZIP64 end records (as a writer does past 65,535 entries), with
    the classic record's fields all set to "see the ZIP64 record"."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        for index in range(count):
            archive.writestr(f"archive/data/{index:0{name_length - 13}d}", b"")
    if zip64:
        raw = Path(path).read_bytes()
        end = raw.rindex(b"PK\x05\x06")
        _, _, _, _, entries, directory_size, directory_offset, _ = struct.unpack("<4s4H2LH", raw[end:end + 22])
        record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
                             directory_size, directory_offset)
        locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
        classic = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        Path(path).write_bytes(raw[:end] + record + locator + classic)
    return Path(path)


def make_tar_duplicate_members(path: Path, count: int = 20_000) -> Path:
    """A ~10 MB bundle: a manifest, then `count` empty members all named as the manifest's weight file."""
    member = "midas_v21_small_256.pt"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        _add(archive, "manifest.json", _bundle_manifest(member))
        for _ in range(count):
            _add(archive, member, b"")
    return Path(path)


def make_bundle_with_manifest(path: Path, manifest, weights: Path) -> Path:
    """A bundle holding `weights` as midas_v21_small_256.pt and `manifest` (any JSON value) as its manifest."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, "manifest.json", json.dumps(manifest).encode())
        archive.add(weights, arcname="midas_v21_small_256.pt")
    return Path(path)


def make_h5_deflate_bomb(path: Path, declared: int = DECLARED_BYTES, chunk_bytes: int = 1024 * 1024) -> Path:
    """A ~600 KB .h5 whose chunked float32 dataset of `declared` bytes is every chunk written, each one a
    deflated chunk of zeros (about 1 KB standing for `chunk_bytes`)."""
    import zlib

    import h5py

    chunk = chunk_bytes // 4
    with h5py.File(path, "w") as handle:
        dataset = handle.create_group("tensors").create_dataset(
            "weight", shape=(declared // 4,), dtype="<f4", chunks=(chunk,), compression="gzip")
        deflated = zlib.compress(bytes(chunk_bytes))
        for index in range(declared // chunk_bytes):
            dataset.id.write_direct_chunk((index * chunk,), deflated)
    return Path(path)


def make_tar_header_chain(path: Path, count: int = 5000) -> Path:
    """A ~5 MB bundle whose one member follows a chain of `count` GNU long-name headers (tarfile reads each
    chain link by recursion)."""
    link = tarfile.TarInfo("././@LongLink")
    link.type = tarfile.GNUTYPE_LONGNAME
    name = b"manifest.json\0"
    link.size = len(name)
    block = link.tobuf(format=tarfile.USTAR_FORMAT) + name.ljust(512, b"\0")
    member = tarfile.TarInfo("manifest.json")
    Path(path).write_bytes(block * count + member.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 1024)
    return Path(path)
