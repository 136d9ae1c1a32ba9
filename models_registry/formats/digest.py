"""Hashes: the file sha256 (streamed) and the format-independent content digest of a set of tensors."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np

CHUNK = 4 * 1024 * 1024


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def c_order(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape (unlike np.ascontiguousarray, which turns 0-d into (1,))."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = c_order(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over (key, dtype, shape, little-endian bytes) of every tensor, keys in sorted order.

    Two files in different formats hold the same weights exactly when their digests are equal.
    """
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = _little_endian(arrays[key])
        shape = ",".join(str(dim) for dim in array.shape)
        digest.update(f"{key}\0{array.dtype.name}\0{shape}\0".encode("utf-8"))
        digest.update(memoryview(array.reshape(-1)).cast("B"))
    return digest.hexdigest()
