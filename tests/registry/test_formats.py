"""Weight formats: round trips with equal digests, sniffing by content, bad files named, pickles that cannot run code."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import h5py
import numpy as np
import pytest

from depthsite.exceptions import WeightFileError
from models_registry.formats import (
    content_digest,
    read_weights,
    restricted_loads,
    sniff_format,
    write_weights,
)

FORMATS = ["pt", "safetensors", "h5", "pkl"]


@pytest.fixture(scope="module")
def tiny_arrays():
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float32),
        "a.num_batches_tracked": np.array(7, dtype=np.int64),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_every_tensor_and_the_digest(tmp_path, tiny_arrays, fmt):
    path = tmp_path / f"w.{fmt}"
    write_weights(tiny_arrays, path, fmt, {"model": "X", "content_digest": content_digest(tiny_arrays)})

    loaded = read_weights(path)

    assert loaded.format == fmt
    assert sorted(loaded.arrays) == sorted(tiny_arrays)
    if fmt != "safetensors":  # safetensors orders tensors itself
        assert list(loaded.arrays) == list(tiny_arrays)
    for key, array in tiny_arrays.items():
        assert loaded.arrays[key].shape == array.shape
        assert loaded.arrays[key].dtype == array.dtype
        np.testing.assert_array_equal(loaded.arrays[key], array)
    assert content_digest(loaded.arrays) == content_digest(tiny_arrays)
    if fmt != "pt":  # pt stays a bare state_dict so the official loaders read it
        assert loaded.metadata["model"] == "X"
        assert loaded.metadata["format_version"] == "1"


def test_full_midas_small_round_trip_through_every_format(tmp_path, small_arrays):
    expected = content_digest(small_arrays)
    for fmt in FORMATS:
        path = tmp_path / f"small.{fmt}"
        write_weights(small_arrays, path, fmt)
        assert content_digest(read_weights(path).arrays) == expected, fmt


def test_content_digest_changes_with_one_value_and_ignores_order(tiny_arrays):
    reordered = dict(reversed(list(tiny_arrays.items())))
    assert content_digest(reordered) == content_digest(tiny_arrays)
    changed = {**tiny_arrays, "a.bias": tiny_arrays["a.bias"].copy()}
    changed["a.bias"][0] += 1e-6
    assert content_digest(changed) != content_digest(tiny_arrays)
    reshaped = {**tiny_arrays, "a.bias": tiny_arrays["a.bias"].reshape(2, 2)}
    assert content_digest(reshaped) != content_digest(tiny_arrays)


def test_h5_tensors_are_contiguous_datasets_with_attributes(tmp_path, tiny_arrays):
    path = tmp_path / "w.h5"
    write_weights(tiny_arrays, path, "h5", {"model": "MiDaS_small", "content_digest": "abc"})
    with h5py.File(path) as handle:
        assert handle.attrs["model"] == "MiDaS_small"
        assert handle.attrs["content_digest"] == "abc"
        dataset = handle["tensors"]["b.weight"]
        assert dataset.chunks is None and dataset.compression is None
    loaded = read_weights(path)
    assert isinstance(loaded.arrays["b.weight"].base, np.memmap) or isinstance(loaded.arrays["b.weight"], np.memmap)


def test_pt_wrapper_and_legacy_files_load(tmp_path, tiny_arrays):
    import torch

    tensors = {key: torch.from_numpy(value) for key, value in tiny_arrays.items()}
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": tensors, "optimizer": {"lr": 0.1, "state": {}}}, wrapped)
    legacy = tmp_path / "legacy.pt"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)

    for path in (wrapped, legacy):
        loaded = read_weights(path)
        assert loaded.format == "pt"
        assert content_digest(loaded.arrays) == content_digest(tiny_arrays)
    assert read_weights(wrapped).unwrapped is True


@pytest.mark.parametrize(
    "content,kind",
    [
        (b"", "empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 85704107\n", "lfs_pointer"),
        (b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>", "html"),
        (b"  \n<html><head><title>Sign in</title></head></html>", "html"),
        (b"this is not a checkpoint at all, just some text", "unknown"),
    ],
)
def test_classic_bad_files_are_named(tmp_path, content, kind):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(WeightFileError) as caught:
        sniff_format(path)
    assert caught.value.extra["kind"] == kind
    assert "weights.pt" in caught.value.message


def test_truncated_zip_is_the_central_directory_case(tmp_path, small_pt):
    data = small_pt.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(WeightFileError) as caught:
        sniff_format(truncated)

    assert caught.value.extra["kind"] == "truncated_zip"
    assert "failed finding central directory" in caught.value.message
    assert "download" in caught.value.message  # says how to fix it


def test_a_zip_that_is_not_torch_is_refused(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(WeightFileError) as caught:
        sniff_format(path)
    assert caught.value.extra["kind"] == "not_torch_zip"


def test_truncated_safetensors_and_h5_are_refused(tmp_path, write_checkpoint):
    for fmt in ("safetensors", "h5"):
        good = write_checkpoint(fmt)
        data = good.read_bytes()
        bad = tmp_path / f"bad.{fmt}"
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(WeightFileError):
            read_weights(bad)


def test_format_is_recognised_by_content_not_extension(tmp_path, write_checkpoint):
    h5_named_pt = write_checkpoint("h5", name="looks_like.pt")
    assert sniff_format(h5_named_pt) == "h5"
    assert read_weights(h5_named_pt).format == "h5"


class _Exploit:
    """A pickle payload whose loading would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pkl_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"weight": np.zeros(3, np.float32), "x": _Exploit(marker)}, handle, protocol=4)

    with pytest.raises(WeightFileError) as caught:
        read_weights(path)

    assert caught.value.extra["kind"] == "unsafe_pickle"
    assert "posix.system" in caught.value.message or "os.system" in caught.value.message
    assert not marker.exists()


def test_malicious_pt_is_refused_and_runs_nothing(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(3), "x": _Exploit(marker)}, path)

    with pytest.raises(WeightFileError) as caught:
        read_weights(path)

    assert caught.value.extra["kind"] == "unsafe_pickle"
    assert not marker.exists()


def test_restricted_unpickler_admits_numpy_and_plain_containers():
    data = {"a": [1, 2.5, "x", (3, None)], "b": np.arange(6, dtype=np.int64).reshape(2, 3), "c": np.float32(1.5)}
    for protocol in (2, 4, 5):
        loaded = restricted_loads(pickle.dumps(data, protocol=protocol))
        np.testing.assert_array_equal(loaded["b"], data["b"])
        assert loaded["a"] == data["a"]


def test_pickled_torch_tensors_in_pkl_are_refused(tmp_path):
    import torch

    buffer = io.BytesIO()
    pickle.dump({"w": torch.zeros(2)}, buffer)
    path = tmp_path / "torch.pkl"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(WeightFileError) as caught:
        read_weights(path)
    assert "torch" in caught.value.message
