"""Weight files whose few bytes stand for far more: aliased HDF5 strings, overlapping or repeated tensors, zip
directories and tar headers by the thousand, and bundle manifests of the wrong shape; each is refused with its
kind before the bytes it stands for are allocated."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from depthsite.exceptions import WeightFileError
from depthsite.testing import hostile
from models_registry.formats import io as formats_io
from models_registry.formats import read_weights, sniff_format, write_weights
from models_registry.models import WeightFile
from models_registry.services.imports import weight_import
from tests.registry.test_hostile_weights import PEAK_LIMIT, assert_api_import_refused, peak_while, refused


# --- HDF5 metadata -------------------------------------------------------------------------------


@pytest.mark.parametrize("as_array_type", [False, True], ids=["string_array", "array_type"])
def test_h5_attribute_of_aliased_strings_is_never_decoded(tmp_path, as_array_type):
    # 2049 heap pointers to one 32 KB string in a 140 KB file: h5py decoded 64 MB (136 MB peak with str()). An
    # attribute of many values is not metadata depthsite writes: the file reads without it, nothing decoded.
    import h5py  # noqa: F401  (imported before measuring)

    path = hostile.make_h5_aliased_attribute(tmp_path / "aliased.h5", as_array_type=as_array_type)
    assert path.stat().st_size < 256 * 1024
    loaded = []
    peak = peak_while(lambda: loaded.append(read_weights(path)))
    assert loaded[0].metadata == {"format_version": "1"} and list(loaded[0].arrays) == ["weight"]
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"

    # What the writer stores (scalar strings) still reads.
    good = tmp_path / "good.h5"
    write_weights({"weight": np.ones(3, "<f4")}, good, "h5", {"model": "MiDaS_small", "note": "x" * 4096})
    assert read_weights(good).metadata == {"format_version": "1", "model": "MiDaS_small", "note": "x" * 4096}


def test_h5_metadata_decoding_past_the_limit_in_total_is_refused(tmp_path):
    # Each attribute is a scalar string under the per-attribute limit; together they pass it.
    from models_registry.formats.h5 import H5_MAX_ATTRIBUTE

    path = tmp_path / "many.h5"
    chunk = H5_MAX_ATTRIBUTE // 4
    write_weights({"weight": np.ones(3, "<f4")}, path, "h5", {f"note{index}": "y" * chunk for index in range(5)})
    error = refused(path)
    assert error.extra["kind"] == "too_large" and "metadata" in error.message, error.message


# --- tensors that overlap or repeat --------------------------------------------------------------


@pytest.mark.parametrize("maker", [hostile.make_pt_expanded, hostile.make_pt_strided_overlap])
def test_pt_tensor_whose_elements_overlap_is_refused_and_honest_views_still_load(tmp_path, maker):
    # (40000, 40000) float32 from one stored element (stride 0) or from 80000 (strides 1, 1): 6.4 GB
    # once the content digest or a conversion copies it.
    import torch

    path = maker(tmp_path / "overlap.pt")
    assert path.stat().st_size < 512 * 1024
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == "aliased_tensors", errors[0].message
    assert errors[0].extra["key"] == "weight"
    assert peak < PEAK_LIMIT

    base = torch.arange(24, dtype=torch.float32)
    tied = torch.arange(6, dtype=torch.float32)
    honest = {
        "transposed": base.reshape(4, 6).t(),
        "sliced": base[::3],
        "cropped": base.reshape(4, 6)[1:3, 2:5],
        "position_ids": torch.arange(8).expand(1, -1),  # a zero stride on an axis of length 1
        "empty": torch.zeros(0, 5).expand(3, 0, 5),
        "encoder.weight": tied,
        "decoder.weight": tied,  # tied weights share one storage
    }
    good = tmp_path / "views.pt"
    torch.save(honest, good)
    loaded = read_weights(good)
    for key, tensor in honest.items():
        np.testing.assert_array_equal(loaded.arrays[key], tensor.numpy())


def test_pickle_naming_one_array_under_many_keys_is_refused(tmp_path):
    # 4096 keys for one 64 KB array in a 150 KB file: 256 MB of tensors to digest, check and convert.
    path = hostile.make_pkl_aliased(tmp_path / "aliased.pkl")
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == "aliased_tensors", errors[0].message
    assert errors[0].extra["declared"] == 4096 * 64 * 1024
    assert peak < PEAK_LIMIT


def test_tensors_over_the_budget_are_refused_even_when_stored_once(tmp_path, monkeypatch):
    # Two keys for one 600 KB array: the file is under a 1 MB budget, its tensors are not.
    path = tmp_path / "tied.pkl"
    array = np.zeros(150 * 1024, "<f4")
    path.write_bytes(pickle.dumps({"a.weight": array, "b.weight": array}, protocol=4))
    monkeypatch.setattr(formats_io, "tensor_budget", lambda architecture=None: 1024 * 1024)
    error = refused(path)
    assert error.extra["kind"] == "too_large" and error.extra["declared"] == 2 * array.nbytes, error.message


def test_h5_chunks_that_inflate_past_the_file_are_refused_before_inflating(tmp_path):
    # 512 MB of deflated zeros in a 600 KB file, under the largest architecture's budget: all of it was inflated.
    import h5py  # noqa: F401  (imported before measuring)

    path = hostile.make_h5_deflate_bomb(tmp_path / "deflated.h5")
    assert path.stat().st_size < 2 * 1024 * 1024
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == "aliased_tensors", errors[0].message
    assert errors[0].extra["declared"] == hostile.DECLARED_BYTES
    assert peak < PEAK_LIMIT


# --- zip central directories ---------------------------------------------------------------------


@pytest.mark.parametrize("zip64", [False, True], ids=["classic", "zip64"])
def test_zip_with_thousands_of_entries_is_refused_before_zipfile_reads_its_directory(tmp_path, zip64):
    # 30,001 entries, a 6 MB directory: zipfile held 23 MB of ZipInfo objects before anything was refused.
    path = hostile.make_zip_many_entries(tmp_path / "many.pt", zip64=zip64)
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == "zip_directory_too_large", errors[0].message
    assert errors[0].extra["entries"] == 30_001
    assert peak < 1024 * 1024  # the end records are read, never the directory
    with pytest.raises(WeightFileError) as caught:
        sniff_format(path)
    assert caught.value.extra["kind"] == "zip_directory_too_large"


def test_zip_whose_end_record_understates_its_directory_is_refused(tmp_path):
    # zipfile parses as many entries as the directory's byte size holds, whatever the count says.
    from models_registry.formats import sniff

    path = hostile.make_zip_many_entries(tmp_path / "many.pt", count=20_000, name_length=400)
    raw = bytearray(path.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    raw[end + 8:end + 12] = (3).to_bytes(2, "little") * 2  # entries on this disk, entries in all
    path.write_bytes(bytes(raw))
    error = refused(path)
    assert error.extra["kind"] == "zip_directory_too_large", error.message
    assert error.extra["directory_bytes"] > sniff.ZIP_MAX_DIRECTORY


# --- bundles -------------------------------------------------------------------------------------


def test_bundle_of_duplicate_members_is_refused_at_the_first_duplicate(tmp_path, small_model):
    # 20,000 empty members under one name: a dict of names kept two while tarfile kept every header.
    path = hostile.make_tar_duplicate_members(tmp_path / "duplicates.tar")
    errors = []
    peak = peak_while(lambda: errors.append(pytest.raises(WeightFileError, weight_import, path=path).value))
    assert errors[0].extra["kind"] == "bad_bundle", errors[0].message
    assert "twice" in errors[0].message
    assert peak < 1024 * 1024


def test_bundle_of_chained_long_name_headers_is_a_clear_error(tmp_path, small_model):
    # tarfile follows each long-name header by recursion: 5000 of them raised RecursionError, an HTTP 500.
    path = hostile.make_tar_header_chain(tmp_path / "chain.tar")
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path)
    assert caught.value.extra["kind"] == "bad_bundle", caught.value.message


MANIFEST_FIELDS = [
    ("model", ["MiDaS_small"]),
    ("model", 7),
    ("file", ["midas_v21_small_256.pt"]),
    ("file_sha256", 5),
    ("content_digest", {"sha256": "ab"}),
]


@pytest.mark.parametrize("field, value", MANIFEST_FIELDS)
def test_bundle_manifest_field_of_the_wrong_type_is_a_clear_error(tmp_path, small_model, small_pt, field, value):
    manifest = {"bundle_version": 1, "model": "MiDaS_small", "format": "pt", "file": "midas_v21_small_256.pt",
                field: value}
    path = hostile.make_bundle_with_manifest(tmp_path / "typed.tar", manifest, small_pt)
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path)
    assert caught.value.status == 422
    assert caught.value.extra == {"kind": "bad_bundle", "field": field}, caught.value.message
    assert repr(field) in caught.value.message
    assert not WeightFile.objects.exists()


@pytest.mark.parametrize("name, make, kind", [
    ("w.tar", lambda p, pt: hostile.make_bundle_with_manifest(
        p, {"bundle_version": 1, "model": ["x"], "file": "midas_v21_small_256.pt"}, pt), "bad_bundle"),
    ("w.tar", lambda p, pt: hostile.make_tar_duplicate_members(p, count=40), "bad_bundle"),
    ("w.tar", lambda p, pt: hostile.make_tar_header_chain(p), "bad_bundle"),
    ("w.pt", lambda p, pt: hostile.make_pt_expanded(p, shape=(4000, 4000)), "aliased_tensors"),
    ("w.pt", lambda p, pt: hostile.make_zip_many_entries(p, count=20_000, name_length=20), "zip_directory_too_large"),
])
def test_api_import_of_amplifying_files_is_a_422_naming_the_kind(tmp_path, small_model, small_pt, name, make, kind):
    assert_api_import_refused(make(tmp_path / name, small_pt), name, kind)
