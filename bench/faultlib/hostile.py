"""Builders of damaged and hostile weight files: each writes one file that must be refused as not usable weights.

The hostile ones are the classes of issue 10 items 1-5: HDF5 whose tensors live elsewhere (external
raw storage, external links, soft links, virtual datasets pointing at a secret file), declared sizes
that the bytes do not back, pickles that reconstruct arrays without data or with object dtypes,
malformed safetensors headers, and tar bundles with sparse members or oversized manifests; and files whose few
bytes stand for far more once read (found in review on 2026-12-07: one array under thousands of pickle keys,
deflated HDF5 chunks of zeros, a zip directory of tens of thousands of records, a bundle repeating one member
name or chaining long-name headers). Wherever a
class can ride along a file that is otherwise perfect (the MiDaS_small layout, so the layout check
passes), it does: that is how the attack works. numpy and h5py only (no torch, no Django).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from depthsite.testing.hostile import (
    make_h5_deflate_bomb,
    make_pkl_aliased,
    make_safetensors_malformed,
    make_tar_duplicate_members,
    make_tar_header_chain,
    make_zip_many_entries,
)

SECRET_BYTES = 72 * 8  # one 8-byte window per num_batches_tracked entry of MiDaS_small
GIB = 1024**3


@dataclass(frozen=True)
class Case:
    name: str
    klass: str  # the class ("classic" for the long-known bad files)
    suffix: str
    build: Callable[["Materials", Path], None]
    path: str = "import"  # "import": `models import FILE`; "verify": damage a cached good file, `models verify`
    timeout: float = 120


@dataclass
class Materials:
    """What builders draw on: a good numpy state dict, its .pt file, and a secret file on the 'server'."""

    arrays: dict[str, np.ndarray]
    good_pt: Path
    secret: Path  # random bytes a hostile file tries to pull into its tensors
    secret_h5: Path  # the same bytes as datasets of another HDF5 file (for links and virtual datasets)

    @property
    def nbt_keys(self) -> list[str]:
        return [key for key in self.arrays if key.endswith("num_batches_tracked")]

    @property
    def bias_keys(self) -> list[str]:
        """Small float vectors of the layout (for classes that cannot be 0-d)."""
        return [key for key, array in self.arrays.items() if array.ndim == 1 and array.dtype == np.float32][:8]


def make_materials(folder: Path, arrays: dict[str, np.ndarray], good_pt: Path) -> Materials:
    import h5py

    secret = folder / "server-secret.bin"
    secret.write_bytes(os.urandom(SECRET_BYTES))
    secret_h5 = folder / "server-secret.h5"
    raw = np.frombuffer(secret.read_bytes(), dtype="<i8")
    with h5py.File(secret_h5, "w") as handle:
        for index, value in enumerate(raw):
            handle.create_dataset(f"s{index}", data=np.int64(value))
        handle.create_dataset("floats", data=np.frombuffer(secret.read_bytes(), dtype="<f4"))
    return Materials(arrays=arrays, good_pt=good_pt, secret=secret, secret_h5=secret_h5)


def secret_needles(secret: bytes) -> list[bytes]:
    """What finds the secret in an output: each aligned 8-byte window, raw and as text (hex, decimal)."""
    needles = []
    for offset in range(0, len(secret) - 7, 8):
        window = secret[offset:offset + 8]
        needles += [window, window.hex().encode(), str(int.from_bytes(window, "little", signed=True)).encode()]
    return [needle for needle in needles if len(needle) >= 8]


# --- classic -------------------------------------------------------------------------------------------


def _empty(m: Materials, path: Path) -> None:
    path.write_bytes(b"")


def _lfs_pointer(m: Materials, path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:" + "ab" * 32 + "\nsize 21700000\n")


def _html_page(m: Materials, path: Path) -> None:
    path.write_text("<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not Found</body></html>\n")


def _truncated_pt(m: Materials, path: Path) -> None:
    data = m.good_pt.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def _pickle_runs_code(m: Materials, path: Path) -> None:
    marker = path.parent / "PWNED-pickle"
    # GLOBAL os.system, a one-string tuple, REDUCE: loading it runs `touch marker`.
    command = f"touch {marker}".encode()
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command + b"\x85R.")


def _pt_runs_code(m: Materials, path: Path) -> None:
    marker = path.parent / "PWNED-pt"
    command = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command + b"\x85R."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/.data/serialization_id", "0" * 40)


def _tar_symlink_member(m: Materials, path: Path) -> None:
    manifest = json.dumps({"bundle_version": 1, "model": "MiDaS_small", "format": "pt",
                           "file": "midas_v21_small_256.pt"}).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
        info = tarfile.TarInfo("midas_v21_small_256.pt")
        info.type, info.linkname = tarfile.SYMTYPE, str(m.secret)
        archive.addfile(info)


def _no_op(m: Materials, path: Path) -> None:
    """Verify-path cases damage the cached copy of the good file themselves (see badfiles)."""


# --- 1. HDF5 that points elsewhere ----------------------------------------------------------------


def _h5_with(m: Materials, path: Path, special: Callable[["object", str, int], bool]) -> None:
    """The whole layout as the registry writes it, except the entries `special(group, key, index)` creates."""
    import h5py

    with h5py.File(path, "w", track_order=True) as handle:
        handle.attrs["format_version"] = "1"
        group = handle.create_group("tensors", track_order=True)
        for index, (key, array) in enumerate(m.arrays.items()):
            if not special(group, key, index):
                group.create_dataset(key, data=np.asarray(array, order="C"))  # keeps 0-d entries 0-d


def _h5_external_storage(m: Materials, path: Path) -> None:
    import h5py

    nbt = {key: n for n, key in enumerate(m.nbt_keys)}

    def special(group, key, index):
        if key not in nbt:
            return False
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_external(str(m.secret).encode(), nbt[key] * 8, 8)
        h5py.h5d.create(group.id, key.encode(), h5py.h5t.STD_I64LE, h5py.h5s.create(h5py.h5s.SCALAR), dcpl=dcpl)
        return True

    _h5_with(m, path, special)


def _h5_external_link(m: Materials, path: Path) -> None:
    import h5py

    nbt = {key: n for n, key in enumerate(m.nbt_keys)}

    def special(group, key, index):
        if key not in nbt:
            return False
        group[key] = h5py.ExternalLink(str(m.secret_h5), f"/s{nbt[key]}")
        return True

    _h5_with(m, path, special)


def _h5_soft_link(m: Materials, path: Path) -> None:
    import h5py

    nbt = {key: n for n, key in enumerate(m.nbt_keys)}

    def special(group, key, index):
        if key not in nbt:
            return False
        hidden = group.file.require_group("hidden")
        hidden.create_dataset(f"n{nbt[key]}", data=np.int64(7))
        group[key] = h5py.SoftLink(f"/hidden/n{nbt[key]}")
        return True

    _h5_with(m, path, special)


def _h5_virtual_dataset(m: Materials, path: Path) -> None:
    import h5py

    targets = set(m.bias_keys)
    offset = {"next": 0}

    def special(group, key, index):
        if key not in targets:
            return False
        shape = m.arrays[key].shape
        count = int(np.prod(shape))
        start = offset["next"] % (SECRET_BYTES // 4 - count)
        offset["next"] += count
        layout = h5py.VirtualLayout(shape=shape, dtype="<f4")
        layout[:] = h5py.VirtualSource(str(m.secret_h5), "floats", shape=(SECRET_BYTES // 4,))[start:start + count]
        group.create_virtual_dataset(key, layout)
        return True

    _h5_with(m, path, special)


def _h5_external_fifo(m: Materials, path: Path) -> None:
    """External raw storage on a FIFO nobody writes: a reader that follows it blocks forever."""
    import h5py

    fifo = path.parent / "endless.fifo"
    os.mkfifo(fifo)
    key = m.nbt_keys[0]

    def special(group, name, index):
        if name != key:
            return False
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_external(str(fifo).encode(), 0, 8)
        h5py.h5d.create(group.id, name.encode(), h5py.h5t.STD_I64LE, h5py.h5s.create(h5py.h5s.SCALAR), dcpl=dcpl)
        return True

    _h5_with(m, path, special)


# --- 2. declared sizes -------------------------------------------------------------------------------------


def _h5_declared_never_written(m: Materials, path: Path) -> None:
    """A 1 GiB contiguous dataset that was declared and never written: a few KB of file."""
    import h5py

    with h5py.File(path, "w") as handle:
        group = handle.create_group("tensors")
        group.create_dataset("pretrained.layer1.0.weight", shape=(GIB // 4,), dtype="<f4")


def _h5_chunked_declared_larger(m: Materials, path: Path) -> None:
    """A chunked 1 GiB dataset with one chunk written: the rest is fill value, allocated on read."""
    import h5py

    with h5py.File(path, "w") as handle:
        group = handle.create_group("tensors")
        dataset = group.create_dataset("pretrained.layer1.0.weight", shape=(GIB // 4,), dtype="<f4",
                                       chunks=(1 << 20,))
        dataset[: 1 << 20] = 1.0


def _safetensors_declared_larger(m: Materials, path: Path) -> None:
    """A header that declares a 1 GiB tensor over 16 bytes of data."""
    count = GIB // 4
    header = {"x": {"dtype": "F32", "shape": [count], "data_offsets": [0, count * 4]}}
    _write_safetensors(path, header, b"\0" * 16)


# --- 3. pickles ----------------------------------------------------------------------------------------------


class _Hole:
    """Pickles as numpy.ndarray(shape, dtype): an array made without data (uninitialised memory)."""

    def __init__(self, shape: tuple, dtype: str):
        self.shape, self.dtype = shape, dtype


class _HolePickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, _Hole):
            return np.ndarray, (obj.shape, obj.dtype)
        return NotImplemented


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _HolePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _pkl_uninitialised_huge(m: Materials, path: Path) -> None:
    """~80 bytes that become a 512 MiB array of whatever the heap held."""
    path.write_bytes(_dumps({"x": _Hole((GIB // 8,), "f4")}))


def _pkl_uninitialised_in_layout(m: Materials, path: Path) -> None:
    """The whole layout, but every num_batches_tracked is 8 bytes of uninitialised memory."""
    nbt = set(m.nbt_keys)
    state = {key: (_Hole((), "<i8") if key in nbt else array) for key, array in m.arrays.items()}
    path.write_bytes(_dumps(state))


def _pkl_object_dtype(m: Materials, path: Path) -> None:
    """The whole layout, one entry an object array (its elements are whatever the pickle says)."""
    key = m.nbt_keys[0]
    state = dict(m.arrays)
    state[key] = np.array(0, dtype=object)
    path.write_bytes(_dumps(state))


# --- 4. malformed safetensors headers --------------------------------------------------------------------


def _write_safetensors(path: Path, header: dict | list, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _st_malformed(variant: str) -> Callable[[Materials, Path], None]:
    """A safetensors file with one malformed header entry, from the tests' catalogue (one builder for both)."""
    def build(m: Materials, path: Path) -> None:
        make_safetensors_malformed(path, variant)

    return build


_st_missing_offsets = _st_malformed("missing_data_offsets")
_st_entry_not_dict = _st_malformed("entry_not_a_dict")
_st_negative_dims = _st_malformed("negative_dim")
_st_negative_offsets = _st_malformed("negative_offset")
_st_list_metadata = _st_malformed("list_metadata")


# --- 5. tar bundles ------------------------------------------------------------------------------------------


def _bundle(path: Path, manifest: bytes, member: str, data: bytes, *, manifest_pax: dict | None = None,
            member_pax: dict | None = None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        info.pax_headers = manifest_pax or {}
        archive.addfile(info, io.BytesIO(manifest))
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.pax_headers = member_pax or {}
        archive.addfile(info, io.BytesIO(data))


def _manifest(**extra) -> bytes:
    return json.dumps({"bundle_version": 1, "model": "MiDaS_small", "format": "safetensors",
                       "file": "w.safetensors", **extra}).encode()


def _tar_sparse_member(m: Materials, path: Path) -> None:
    """A ~10 KB bundle whose member expands to a 256 MiB safetensors file (a header, then a hole of zeros)."""
    count = 64 * 1024 * 1024
    raw = json.dumps({"pretrained.layer1.0.weight": {"dtype": "F32", "shape": [count],
                                                     "data_offsets": [0, count * 4]}}).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    real = len(head) + count * 4
    _bundle(path, _manifest(), "w.safetensors", head,
            member_pax={"GNU.sparse.size": str(real), "GNU.sparse.map": f"0,{len(head)}",
                        "GNU.sparse.name": "w.safetensors"})


def _tar_sparse_manifest(m: Materials, path: Path) -> None:
    """A manifest member that expands to 512 MiB (JSON, then zeros) from a few KB of bundle."""
    manifest = _manifest()
    _bundle(path, manifest, "w.safetensors", b"\0" * 64,
            manifest_pax={"GNU.sparse.size": str(GIB // 2), "GNU.sparse.map": f"0,{len(manifest)}",
                          "GNU.sparse.name": "manifest.json"})


def _tar_oversized_manifest(m: Materials, path: Path) -> None:
    """Good weights, with a manifest padded to 32 MiB of JSON whitespace (read whole into memory today)."""
    from safetensors.numpy import save

    data = save({key: np.asarray(array, order="C") for key, array in m.arrays.items()})
    manifest = _manifest() + b" " * (32 * 1024 * 1024)
    _bundle(path, manifest, "w.safetensors", data)


def _amplified(maker: Callable[[Path], Path]) -> Callable[[Materials, Path], None]:
    """A builder from one of depthsite.testing.hostile's makers that need no materials."""
    def build(m: Materials, path: Path) -> None:
        maker(path)
    return build


CASES: tuple[Case, ...] = (
    Case("empty file", "classic", ".pt", _empty),
    Case("Git LFS pointer", "classic", ".pt", _lfs_pointer),
    Case("HTML error page", "classic", ".pt", _html_page),
    Case("truncated .pt", "classic", ".pt", _truncated_pt),
    Case("bit flip in the cached file", "classic", ".pt", _no_op, path="verify"),
    Case("truncation of the cached file", "classic", ".pt", _no_op, path="verify"),
    Case("pickle that runs code", "classic", ".pkl", _pickle_runs_code),
    Case(".pt whose pickle runs code", "classic", ".pt", _pt_runs_code),
    Case("bundle member is a symlink", "classic", ".tar", _tar_symlink_member),
    Case("h5 external raw storage", "1 h5 elsewhere", ".h5", _h5_external_storage),
    Case("h5 external links", "1 h5 elsewhere", ".h5", _h5_external_link),
    Case("h5 soft links", "1 h5 elsewhere", ".h5", _h5_soft_link),
    Case("h5 virtual datasets", "1 h5 elsewhere", ".h5", _h5_virtual_dataset),
    Case("h5 external storage on a FIFO", "2 declared sizes", ".h5", _h5_external_fifo, timeout=20),
    Case("h5 1 GiB declared, never written", "2 declared sizes", ".h5", _h5_declared_never_written),
    Case("h5 chunked 1 GiB, one chunk written", "2 declared sizes", ".h5", _h5_chunked_declared_larger),
    Case("safetensors 1 GiB over 16 bytes", "2 declared sizes", ".safetensors", _safetensors_declared_larger),
    Case("pkl 512 MiB array without data", "3 pickles", ".pkl", _pkl_uninitialised_huge),
    Case("pkl layout with uninitialised entries", "3 pickles", ".pkl", _pkl_uninitialised_in_layout),
    Case("pkl object dtype", "3 pickles", ".pkl", _pkl_object_dtype),
    Case("safetensors entry without data_offsets", "4 safetensors header", ".safetensors", _st_missing_offsets),
    Case("safetensors entry not a dict", "4 safetensors header", ".safetensors", _st_entry_not_dict),
    Case("safetensors negative dims", "4 safetensors header", ".safetensors", _st_negative_dims),
    Case("safetensors negative offsets", "4 safetensors header", ".safetensors", _st_negative_offsets),
    Case("safetensors list __metadata__", "4 safetensors header", ".safetensors", _st_list_metadata),
    Case("bundle with a sparse member", "5 tar bundles", ".tar", _tar_sparse_member),
    Case("bundle with a sparse manifest", "5 tar bundles", ".tar", _tar_sparse_manifest),
    Case("bundle with a 32 MiB manifest", "5 tar bundles", ".tar", _tar_oversized_manifest),
    Case("pkl one array under 4096 keys", "6 amplification", ".pkl", _amplified(make_pkl_aliased)),
    Case("h5 512 MiB of deflated zeros", "6 amplification", ".h5", _amplified(make_h5_deflate_bomb)),
    Case("pt zip of 30,000 directory records", "6 amplification", ".pt", _amplified(make_zip_many_entries)),
    Case("bundle repeating one member 20,000 times", "6 amplification", ".tar",
         _amplified(make_tar_duplicate_members)),
    Case("bundle behind 5,000 long-name headers", "6 amplification", ".tar", _amplified(make_tar_header_chain)),
)
# The classes --quick keeps: one per class, the cheap ones (no full-layout file to write or load).
QUICK = ("empty file", "Git LFS pointer", "HTML error page", "pickle that runs code",
         "h5 1 GiB declared, never written", "pkl 512 MiB array without data",
         "safetensors entry without data_offsets", "bundle with a sparse manifest")
