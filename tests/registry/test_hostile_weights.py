"""Weight files that lie: each hostile class is refused with its kind, before a foreign byte is read or a
declared size is allocated; bundles extract only what they hold; a changed pin stops serving old weights."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import (
    DiskFullError,
    NotFoundError,
    OfflineError,
    TooLargeError,
    WeightFileError,
)
from models_registry.formats import content_digest, read_weights, restricted_loads, write_weights
from models_registry.models import WeightFile
from models_registry.services import imports as import_services
from models_registry.services.catalogue import model_pin
from models_registry.services.export import weight_convert
from models_registry.services.imports import weight_import
from models_registry.services.verify import weight_verify
from depthsite.testing import hostile

SECRET = b"TOPSECRT" * 64
# Far below the 512 MB the hostile files declare, far above what refusing them needs.
PEAK_LIMIT = 16 * 1024 * 1024


def refused(path: Path, **kwargs) -> WeightFileError:
    with pytest.raises(WeightFileError) as caught:
        read_weights(path, **kwargs)
    assert caught.value.status == 422
    return caught.value


def peak_while(call) -> int:
    """Peak bytes traced by tracemalloc (numpy's array data included) while `call` runs."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret_key"
    path.write_bytes(SECRET)
    return path


# --- 1. HDF5 that points elsewhere -----------------------------------------------------------------


@pytest.mark.parametrize("maker", ["external", "external_link", "soft_link", "virtual", "devzero", "fifo"])
def test_h5_whose_data_lives_elsewhere_is_refused_before_reading(tmp_path, secret, maker):
    import h5py  # noqa: F401  (imported before measuring)

    path = tmp_path / "hostile.h5"
    if maker == "external":
        hostile.make_h5_external(path, secret)
    elif maker == "external_link":
        hostile.make_h5_external_link(path, tmp_path / "other.h5")
    elif maker == "soft_link":
        hostile.make_h5_soft_link(path)
    elif maker == "virtual":
        hostile.make_h5_virtual(path, tmp_path / "source.h5")
    elif maker == "devzero":
        hostile.make_h5_external_devzero(path)
    else:  # a FIFO never ends: reading it would hang the worker
        hostile.make_h5_external_fifo(path, tmp_path / "fifo")
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == "h5_not_in_file", errors[0].message
    assert "inside the file" in errors[0].message
    assert peak < PEAK_LIMIT


def test_h5_pointing_at_a_secret_never_puts_a_byte_of_it_in_the_cache(tmp_path, small_model, small_arrays,
                                                                      secret, settings):
    # The official layout with every num_batches_tracked stored in the secret file: the layout check
    # passed these, and 8 bytes each of the secret reached converted and exported copies.
    path = hostile.make_h5_external(tmp_path / "midas_v21_small_256.h5", secret, small_arrays)
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path, model_name="MiDaS_small")
    assert caught.value.status == 422 and caught.value.extra["kind"] == "h5_not_in_file"
    with pytest.raises(WeightFileError):
        weight_import(path=path)
    cache = Path(settings.DEPTHSITE_CACHE_DIR)
    assert not WeightFile.objects.exists()
    assert not cache.exists() or files_holding(cache, SECRET[:8]) == []


# --- 2. declared sizes ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("maker, kind", [
    (hostile.make_h5_unwritten, "unwritten"),
    (hostile.make_h5_unwritten_chunks, "unwritten"),
    (hostile.make_pkl_uninitialised, "unreadable"),
    (hostile.make_pkl_reconstruct_without_data, "bad_pickle_array"),
    (hostile.make_pkl_huge_length, "bad_pickle"),
    (hostile.make_pkl_memo_bomb, "bad_pickle"),
    (hostile.make_pkl_opcode_flood, "bad_pickle"),
])
def test_declared_sizes_are_refused_without_allocating_them(tmp_path, maker, kind):
    import h5py  # noqa: F401  (imported before measuring)

    path = maker(tmp_path / "hostile.bin")
    assert path.stat().st_size < 2 * 1024 * 1024
    errors = []
    peak = peak_while(lambda: errors.append(refused(path)))
    assert errors[0].extra["kind"] == kind, errors[0].message
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"


def test_legacy_pt_storage_larger_than_the_file_is_refused_before_torch_allocates(tmp_path):
    path = hostile.make_pt_legacy_declared_large(tmp_path / "legacy.pt")
    error = refused(path)
    assert error.extra["kind"] == "truncated" and "declares" in error.message


def test_compressed_torch_zip_is_refused(tmp_path, write_checkpoint, tiny_arrays):
    source = write_checkpoint("pt", arrays=tiny_arrays)
    error = refused(hostile.make_pt_compressed(tmp_path / "deflated.pt", source))
    assert "compressed" in error.message


def test_tensors_over_the_architecture_budget_are_refused_before_reading(tmp_path):
    # One tensor just over MiDaS_small's budget (its elements at 8 bytes each, plus slack), in a sparse file.
    from models_registry.formats import guards

    budget = guards.tensor_budget("MiDaS_small")
    assert budget < guards.tensor_budget() and budget < guards.tensor_budget("DPT_Large")
    header = {"w": {"dtype": "F64", "shape": [budget // 8 + 1], "data_offsets": [0, (budget // 8 + 1) * 8]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:  # a sparse file: declared bytes are present without using the disk
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + (budget // 8 + 1) * 8)
    error = refused(path, architecture="MiDaS_small")
    assert error.extra["kind"] == "too_large"
    assert read_weights(path).arrays["w"].shape == (budget // 8 + 1,)  # under the largest architecture's budget


# --- 3. pickles ----------------------------------------------------------------------------------


def test_pickled_object_arrays_are_refused(tmp_path):
    error = refused(hostile.make_pkl_object_dtype(tmp_path / "objects.pkl"))
    assert error.extra["kind"] == "bad_pickle_array" and "numeric" in error.message


def test_pickled_mapping_with_shadowed_methods_is_a_clear_error(tmp_path):
    error = refused(hostile.make_pkl_shadowed_items(tmp_path / "shadowed.pkl"))
    assert error.extra["kind"] == "unreadable"
    # torch's weights-only unpickler BUILDs OrderedDict attributes: the items are read through dict itself
    loaded = read_weights(hostile.make_pt_shadowed_items(tmp_path / "shadowed.pt"))
    assert list(loaded.arrays) == ["weight"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numeric_arrays_still_unpickle_in_every_protocol(protocol):
    arrays = {
        "c": np.arange(12, dtype="<f4").reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype="<f8").reshape(2, 3)),
        "big_endian": np.arange(5, dtype=">i4"),
        "scalar": np.array(7, dtype="<i8"),
        "empty": np.zeros((0, 3), dtype="<f2"),
        "flags": np.array([True, False]),
    }
    loaded = restricted_loads(pickle.dumps(arrays, protocol=protocol))
    assert set(loaded) == set(arrays)
    for key, value in arrays.items():
        assert isinstance(loaded[key], np.ndarray)
        # numpy itself may hand back native byte order; kind, size, shape and values must survive
        assert loaded[key].dtype.str[1:] == value.dtype.str[1:] and loaded[key].shape == value.shape
        np.testing.assert_array_equal(loaded[key], value)


def test_pickle_reader_returns_plain_arrays(tmp_path, tiny_arrays):
    path = tmp_path / "w.pkl"
    write_weights(tiny_arrays, path, "pkl")
    loaded = read_weights(path)
    assert all(type(array) is np.ndarray for array in loaded.arrays.values())
    assert content_digest(loaded.arrays) == content_digest(tiny_arrays)


# --- 4. safetensors headers ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(hostile.SAFETENSORS_MALFORMED))
def test_malformed_safetensors_headers_are_clear_errors(tmp_path, variant):
    error = refused(hostile.make_safetensors_malformed(tmp_path / f"{variant}.safetensors", variant))
    expected = {"out_of_file": "truncated_safetensors", "header_not_a_dict": "unknown"}.get(
        variant, "malformed_safetensors")
    assert error.extra["kind"] == expected, error.message


def test_huge_safetensors_header_length_is_refused(tmp_path):
    error = refused(hostile.make_safetensors_huge_header(tmp_path / "huge.safetensors"))
    assert error.extra["kind"] == "truncated_safetensors"


def test_safetensors_reader_agrees_with_safe_open(tmp_path, tiny_arrays):
    from safetensors import safe_open

    arrays = {**tiny_arrays, "ints": np.arange(6, dtype="<i8").reshape(2, 3), "half": np.ones(3, "<f2"),
              "flags": np.array([True, False, True]), "empty": np.zeros((0,), "<f4"), "scalar": np.array(3.5, "<f4")}
    path = tmp_path / "good.safetensors"
    write_weights(arrays, path, "safetensors", {"model": "x"})
    ours = read_weights(path)
    with safe_open(str(path), framework="numpy") as theirs:
        assert set(theirs.keys()) == set(ours.arrays)
        assert theirs.metadata() == ours.metadata
        for key in theirs.keys():
            expected = theirs.get_tensor(key)
            assert ours.arrays[key].dtype == expected.dtype and ours.arrays[key].shape == expected.shape, key
            assert ours.arrays[key].tobytes() == expected.tobytes(), key


@pytest.fixture(scope="module")
def tiny_arrays() -> dict[str, np.ndarray]:
    return {"layer.weight": np.linspace(-1, 1, 24, dtype="<f4").reshape(2, 3, 4),
            "layer.bias": np.arange(2, dtype="<f4"),
            "bn.num_batches_tracked": np.array(5, dtype="<i8")}


# --- 5. tar bundles ------------------------------------------------------------------------------


def _cache_files(settings) -> list[Path]:
    root = Path(settings.DEPTHSITE_CACHE_DIR)
    return [path for path in root.rglob("*") if path.is_file() and not path.name.endswith(".lock")] \
        if root.exists() else []


@pytest.mark.parametrize("maker", [hostile.make_sparse_tar, hostile.make_gnu_sparse_tar,
                                   hostile.make_bundle_oversized_manifest, hostile.make_tar_huge_pax_header])
def test_hostile_bundles_are_refused_before_extracting(tmp_path, small_model, settings, maker):
    path = maker(tmp_path / "hostile.tar")
    assert path.stat().st_size < 16 * 1024 * 1024
    peak = peak_while(lambda: pytest.raises(WeightFileError, weight_import, path=path))
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path)
    assert caught.value.extra["kind"] == "bad_bundle", caught.value.message
    assert _cache_files(settings) == []
    assert peak < PEAK_LIMIT


def _bundle(path: Path, member_path: Path) -> Path:
    manifest = json.dumps({"bundle_version": 1, "model": "MiDaS_small", "format": "pt",
                           "file": "midas_v21_small_256.pt"}).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
        archive.add(member_path, arcname="midas_v21_small_256.pt")
    return path


def test_bundle_member_over_the_import_limit_or_the_free_disk_is_refused_before_writing(
        tmp_path, small_model, small_pt, settings, monkeypatch):
    bundle = _bundle(tmp_path / "small.tar", small_pt)
    settings.DEPTHSITE_MAX_IMPORT_BYTES = small_pt.stat().st_size - 1
    with pytest.raises(TooLargeError) as caught:
        weight_import(path=bundle)
    assert caught.value.status == 413 and "DEPTHSITE_MAX_IMPORT_BYTES" in caught.value.message
    assert _cache_files(settings) == []

    settings.DEPTHSITE_MAX_IMPORT_BYTES = 4 * 1000**3
    monkeypatch.setattr(cachefs, "disk_free", lambda path: 1024)
    with pytest.raises(DiskFullError):
        weight_import(path=bundle)
    assert _cache_files(settings) == []


@pytest.mark.slow
def test_two_concurrent_imports_of_one_model_never_touch_each_others_file(
        tmp_path, small_model, small_arrays, monkeypatch):
    # Bundle B holds other weights under the same member name. B's import runs to its end while A's
    # extracted file is open and mapped: with one fixed extraction name, B truncated and rewrote A's file.
    other = dict(small_arrays)
    key = next(k for k, v in other.items() if v.dtype.kind == "f" and v.size > 1)
    other[key] = other[key] + 1
    paths = {}
    for name, arrays in (("a", small_arrays), ("b", other)):
        member = tmp_path / name / "midas_v21_small_256.pt"
        member.parent.mkdir()
        write_weights(arrays, member, "pt")
        paths[name] = _bundle(tmp_path / f"{name}.tar", member)

    real_inspect = import_services.weights_inspect
    extracted, second = [], []

    def interleaved(**kwargs):
        inspection = real_inspect(**kwargs)
        extracted.append((kwargs["path"], kwargs["path"].stat().st_ino))
        if len(extracted) == 1:
            second.append(weight_import(path=paths["b"]))
            assert kwargs["path"].stat().st_ino == extracted[0][1]  # A's file is still A's
        return inspection

    monkeypatch.setattr(import_services, "weights_inspect", interleaved)
    first = weight_import(path=paths["a"])
    assert second[0].created and second[0].weight_file.content_digest == content_digest(other)
    assert first.created and first.weight_file.content_digest == content_digest(small_arrays)
    assert extracted[0][0] != extracted[1][0]
    cached = cachefs.absolute(first.weight_file.path)
    assert content_digest(read_weights(cached).arrays) == content_digest(small_arrays)
    leftovers = [p for p in cached.parent.parent.rglob("*bundle-*")]
    assert leftovers == []


# --- 6. re-pinning -------------------------------------------------------------------------------


@pytest.fixture
def two_copies(cached_small):
    """MiDaS_small cached as pt (imported, not pinned) and as a safetensors copy converted from it."""
    converted = weight_convert(model=cached_small.model, fmt="safetensors")
    return cached_small, converted


def _health(weight_file: WeightFile) -> str:
    weight_file.refresh_from_db()
    return weight_file.health


def test_a_new_pin_stops_serving_copies_of_the_old_weights(two_copies, settings):
    from models_registry.services.resolve import weights_resolve
    from tests.registry.test_commands import run

    pt, safetensors = two_copies
    model = pt.model
    settings.DEPTHSITE_OFFLINE = True
    assert weights_resolve(model=model, offline=True) is not None

    out = run("pin", "--model", "MiDaS_small", "--sha256", "ab" * 32)  # the operator's new release file
    assert "2 cached copies of MiDaS_small no longer served" in out
    model.refresh_from_db()
    assert _health(pt) == Health.CORRUPT and _health(safetensors) == Health.CORRUPT
    assert "pin of MiDaS_small changed" in safetensors.health_reason
    with pytest.raises(OfflineError):  # not served: the pinned file must be fetched again
        weights_resolve(model=model, offline=True)
    assert weight_verify(weight_file=safetensors, functional=False).health == Health.CORRUPT  # verify keeps it so
    with pytest.raises(NotFoundError):  # and no copy of old weights is converted or exported either
        weight_convert(model=model, fmt="h5")


def test_pinning_the_cached_file_itself_proves_its_copies(two_copies):
    from models_registry.services.resolve import weights_resolve

    pt, safetensors = two_copies
    model = model_pin(model=pt.model, sha256=pt.sha256, source="operator")
    assert model.expected_content_digest == pt.content_digest
    assert _health(pt) == Health.OK and _health(safetensors) == Health.OK
    assert weights_resolve(model=model, offline=True).format in ("pt", "safetensors")

    model = model_pin(model=model, reset=True)
    assert _health(pt) == Health.CORRUPT and _health(safetensors) == Health.CORRUPT
    with pytest.raises(OfflineError):
        weights_resolve(model=model, offline=True)


def test_import_under_a_pin_without_a_proven_digest_needs_the_pinned_file(two_copies, tmp_path, small_arrays):
    pt, _ = two_copies
    model = model_pin(model=pt.model, sha256="cd" * 32, source="operator")
    other = tmp_path / "copy.safetensors"
    write_weights(small_arrays, other, "safetensors")
    with pytest.raises(Exception) as caught:
        weight_import(path=other, model_name="MiDaS_small")
    assert getattr(caught.value, "status", None) == 409 and "cannot be proven" in caught.value.message
    assert model.expected_content_digest == ""


# --- the API door --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, make, kind", [
    ("w.h5", lambda p, secret: hostile.make_h5_external(p, secret), "h5_not_in_file"),
    ("w.h5", lambda p, secret: hostile.make_h5_unwritten(p), "unwritten"),
    ("w.pkl", lambda p, secret: hostile.make_pkl_uninitialised(p), "unreadable"),
    ("w.pkl", lambda p, secret: hostile.make_pkl_huge_length(p), "bad_pickle"),
    ("w.safetensors", lambda p, secret: hostile.make_safetensors_malformed(p, "entry_not_a_dict"),
     "malformed_safetensors"),
    ("w.pt", lambda p, secret: hostile.make_pt_legacy_declared_large(p), "truncated"),
    ("w.tar", lambda p, secret: hostile.make_sparse_tar(p), "bad_bundle"),
])
def test_api_import_of_hostile_files_is_a_422_naming_the_kind(tmp_path, small_model, secret, name, make, kind):
    assert_api_import_refused(make(tmp_path / name, secret), name, kind)


def assert_api_import_refused(path: Path, name: str, kind: str) -> None:
    """An operator's API import of the file at `path` (uploaded as `name`): 422 naming `kind`, nothing recorded."""
    from django.contrib.auth import get_user_model
    from django.core.cache import cache
    from django.core.files.uploadedfile import SimpleUploadedFile
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    cache.clear()  # throttle counters
    from tests.support.operators import grant_operator_permissions

    staff = get_user_model().objects.create_user("operator", "op@example.com", "pw-operator-123", is_staff=True)
    grant_operator_permissions(staff)  # importing needs models_registry.change_registeredmodel
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")
    response = client.post("/api/models/import", {"file": SimpleUploadedFile(name, path.read_bytes())},
                           format="multipart")
    assert response.status_code == 422, response.content
    assert response.json()["extra"]["kind"] == kind
    assert not WeightFile.objects.exists()
