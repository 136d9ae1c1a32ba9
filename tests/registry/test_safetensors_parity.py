"""depthsite's own safetensors reader against the library's safe_open, on the same files.

Kept for measured reasons (bench/safetensors_read.py, docs/performance.md): one copy-on-write map of the file
and views into it (MiDaS_small: 12 MB of resident growth against 85 MB, 0.35x the time), and a header cap of
8 MB instead of the library's 100 MB. It must read every valid file exactly as safe_open does.
"""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from depthsite.exceptions import WeightFileError
from models_registry.formats.io import read_weights

ARRAYS = {
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "f16": np.linspace(-3, 3, 10, dtype=np.float16),
    "f64": np.array([[np.pi, -np.e]], dtype=np.float64),
    "i64": np.array([0, -1, 2**40], dtype=np.int64),
    "i32": np.array([7], dtype=np.int32),
    "u8": np.arange(256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "scalar": np.array(1.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def _library(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("metadata", [None, {"format": "pt", "note": "é"}])
def test_every_valid_file_reads_as_the_library_reads_it(tmp_path, metadata):
    path = tmp_path / "w.safetensors"
    save_file(ARRAYS, str(path), metadata=metadata)
    ours = read_weights(path, "safetensors")
    theirs = _library(path)
    assert sorted(ours.arrays) == sorted(theirs)
    for key, expected in theirs.items():
        got = ours.arrays[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert np.array_equal(got, expected), key
    with safe_open(str(path), framework="np") as handle:
        assert ours.metadata == (handle.metadata() or {})


def test_the_real_layout_reads_alike(tmp_path, small_arrays):
    path = tmp_path / "small.safetensors"
    save_file(small_arrays, str(path))
    ours, theirs = read_weights(path, "safetensors").arrays, _library(path)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[key], theirs[key]) for key in theirs)


def test_a_header_the_library_would_parse_but_over_our_cap_is_refused(tmp_path, monkeypatch):
    # Stricter on purpose: a header of many MB would be parsed into far more memory than the file holds.
    from models_registry.formats import safetensors_file

    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(path), metadata={"pad": "x" * 4096})
    assert np.array_equal(_library(path)["a"], np.zeros(3, np.float32))
    monkeypatch.setattr(safetensors_file, "ST_MAX_HEADER", 1024)
    with pytest.raises(WeightFileError, match="malformed safetensors header"):
        read_weights(path, "safetensors")
