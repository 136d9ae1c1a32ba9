"""Bounds checked before a reader allocates: dtypes, the bytes a file may declare, and a pickle's opcodes.

A weight file is untrusted: its header may declare tensors far larger than the file, data that was
never written, or lengths that make an unpickler allocate gigabytes before it notices the file is
short. Every reader states what it is about to allocate and asks here first.
"""
from __future__ import annotations

import pickletools
from functools import lru_cache
from pathlib import Path

import numpy as np

from models_registry.catalogue import ARCHITECTURES, key_layout
from depthsite.exceptions import WeightFileError

# The widest element a weights file may use (float64/int64): the budget allows every tensor at 8 bytes.
MAX_ITEMSIZE = 8
# Room for tensors that a layout does not list (a custom head) before a file counts as too large.
BUDGET_SLACK = 16 * 1024 * 1024
NUMERIC_KINDS = "fiub"


@lru_cache(maxsize=None)
def _layout_elements(architecture: str) -> int:
    total = 0
    for _, shape, _ in key_layout(architecture).entries:
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def tensor_budget(architecture: str | None = None) -> int:
    """The most tensor bytes a file may declare: the architecture's elements (the largest one's when
    unknown) at 8 bytes each, plus a little slack."""
    if architecture in ARCHITECTURES:
        elements = _layout_elements(architecture)
    else:
        elements = max(_layout_elements(arch) for arch in ARCHITECTURES)
    return elements * MAX_ITEMSIZE + BUDGET_SLACK


def too_large(path: Path, declared: int, budget: int, what: str = "tensors") -> WeightFileError:
    return WeightFileError(
        f"{path.name} declares {declared} bytes of {what}, more than the {budget} bytes the largest "
        "weights of its architecture can need; refused before reading",
        extra={"kind": "too_large", "declared": declared, "budget": budget}, file=path.name,
    )


def check_dtype(path: Path, key: str, dtype: np.dtype) -> np.dtype:
    """A plain numeric dtype (bool, int, uint, float) of at most 8 bytes, or WeightFileError."""
    if (not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None
            or dtype.subdtype is not None or dtype.hasobject or dtype.itemsize not in (1, 2, 4, 8)):
        raise WeightFileError(
            f"{path.name}: tensor {key!r} has dtype {dtype}, not a plain numeric dtype (bool, int or float)",
            extra={"kind": "unsupported_dtype", "key": key}, file=path.name,
        )
    return dtype


def element_count(path: Path, key: str, shape) -> int:
    """The number of elements of a declared shape (non-negative ints, at most 32 dimensions)."""
    if not isinstance(shape, (tuple, list)) or len(shape) > 32 or not all(
            isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise WeightFileError(f"{path.name}: tensor {key!r} has an invalid shape {shape!r}",
                              extra={"kind": "bad_shape", "key": key}, file=path.name)
    count = 1
    for dim in shape:
        count *= dim
    return count


# --- pickles -------------------------------------------------------------------------------------

_OPS = {ord(op.code): op for op in pickletools.opcodes}
_LENGTH_PREFIX = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_TWO_LINES = {ord("c"), ord("i")}  # GLOBAL and INST: module and name, each on its own line
_MEMO_STORES = {ord("p"), ord("q"), ord("r"), 0x94}  # PUT, BINPUT, LONG_BINPUT, MEMOIZE
_BINPUTS = {ord("q"), ord("r")}
_PUT, _FRAME, _STOP = ord("p"), 0x95, ord(".")
MAX_LINE = 64 * 1024
# A MiDaS state_dict pickles in about ten opcodes per tensor (~10 000 in all); each opcode may leave an
# object on the unpickler's stack, so their number bounds its memory as much as the file's bytes do.
MAX_OPCODES = 1_000_000


def _bad_pickle(name: str, why: str) -> WeightFileError:
    return WeightFileError(f"{name}: damaged or hostile pickle: {why}", extra={"kind": "bad_pickle"},
                           file=name.partition("/")[0])


def pickle_scan(data, name: str = "pickle", start: int = 0) -> int:
    """Walk a pickle's opcodes without building anything; refuse lengths past the end and sparse memos.

    The C unpickler allocates a declared BINBYTES8/FRAME length before it reads, and grows its memo
    to twice a declared LONG_BINPUT index; both are checked here against what is really present.
    `data` is bytes or an mmap; the pickle starts at `start`; returns the offset just after its STOP.
    """
    size = len(data)
    pos = start
    stores = 0
    for _ in range(MAX_OPCODES):
        if pos >= size:
            raise _bad_pickle(name, "it ends before its STOP opcode")
        code = data[pos]  # an int, for bytes and mmap alike: no allocation per opcode
        op = _OPS.get(code)
        if op is None:
            raise _bad_pickle(name, f"unknown opcode {code:#04x} at byte {pos}")
        pos += 1
        arg = op.arg
        index = None
        if arg is None:
            pass
        elif arg.n >= 0:
            if pos + arg.n > size:
                raise _bad_pickle(name, f"{op.name} at byte {pos - 1} runs past the end")
            if code in _BINPUTS:
                index = int.from_bytes(bytes(data[pos:pos + arg.n]), "little")
            if code == _FRAME:  # the frame's bytes must be present
                length = int.from_bytes(bytes(data[pos:pos + 8]), "little")
                if pos + 8 + length > size:
                    raise _bad_pickle(name, f"a frame declares {length} bytes past the end of the file")
            pos += arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if code in _TWO_LINES else 1):
                end = data.find(b"\n", pos, min(size, pos + MAX_LINE))
                if end < 0:
                    raise _bad_pickle(name, f"{op.name} at byte {pos - 1} has no end of line")
                if code == _PUT:
                    try:
                        index = int(bytes(data[pos:end]))
                    except ValueError:
                        raise _bad_pickle(name, "a PUT index is not a number") from None
                pos = end + 1
        elif arg.n in _LENGTH_PREFIX:
            width, signed = _LENGTH_PREFIX[arg.n]
            if pos + width > size:
                raise _bad_pickle(name, f"{op.name} at byte {pos - 1} runs past the end")
            length = int.from_bytes(bytes(data[pos:pos + width]), "little", signed=signed)
            pos += width
            if length < 0 or pos + length > size:
                raise _bad_pickle(name, f"{op.name} at byte {pos - 1 - width} declares {length} bytes, "
                                        f"but only {size - pos} remain in the file")
            pos += length
        else:  # pragma: no cover - every opcode of pickletools is covered above
            raise _bad_pickle(name, f"unsupported opcode {op.name}")
        if code in _MEMO_STORES:
            if index is not None and index > stores:
                raise _bad_pickle(name, f"memo index {index} skips ahead of the {stores} objects stored")
            stores += 1
        if code == _STOP:
            return pos
    raise _bad_pickle(name, f"more than {MAX_OPCODES} opcodes; a weights pickle needs far fewer")


# --- what the arrays a reader hands back stand for -----------------------------------------------

# Tied weights (an encoder and a decoder sharing one embedding) may name one stored tensor twice; a checkpoint
# never names its bytes more often than that, while a file whose few stored bytes stand for gigabytes does.
MAX_ALIASING = 2


def _elements_overlap(array: np.ndarray) -> bool:
    """True unless its strides prove that no two elements of `array` share memory (a stride of 0 on an axis
    longer than 1 is the plainest overlap).

    The proof, sufficient for no overlap: with the axes longer than 1 sorted by |stride|, the smallest stride
    is at least the element size and each other one at least the previous stride times its axis length (then
    every element has bytes of its own). C, Fortran, transposed and sliced views pass; expanded views do not.
    """
    if array.size <= 1:
        return False
    axes = sorted((abs(stride), length) for stride, length in zip(array.strides, array.shape) if length > 1)
    reach = array.itemsize
    for stride, length in axes:
        if stride < reach:
            return True
        reach = stride * length
    return False


def check_declared_total(path: Path, total: int, size: int, budget: int) -> None:
    """Refuse `total` tensor bytes beyond MAX_ALIASING times the file's `size` or beyond `budget`."""
    if total > MAX_ALIASING * size:
        raise WeightFileError(
            f"{path.name}: its tensors stand for {total} bytes, more than {MAX_ALIASING} times the {size} bytes "
            "of the file: stored bytes named under many keys or inflated; a checkpoint stores its weights once "
            "(tied ones may share)", extra={"kind": "aliased_tensors", "declared": total, "size": size},
            file=path.name,
        )
    if total > budget:
        raise too_large(path, total, budget)


def check_tensor_bytes(path: Path, arrays, size: int, budget: int) -> None:
    """Refuse arrays that stand for more bytes than the file holds: elements that overlap in memory, or
    logical bytes beyond MAX_ALIASING times the file or beyond `budget`.

    A reader's bounds count the bytes a file stores; these arrays' logical bytes are what a copy, a content
    digest or a conversion allocates. They differ when a tensor is a strided view of fewer elements (torch's
    expand: one stored float standing for 6.4 GB) or when one stored tensor is named under many keys (a
    pickle's memo, torch's shared storages, HDF5 hard links).
    """
    total = 0
    for key, array in arrays.items():
        if _elements_overlap(array):
            raise WeightFileError(
                f"{path.name}: tensor {key!r} of shape {tuple(array.shape)} has strides {array.strides} under "
                "which its elements overlap: a few stored bytes standing for many; a checkpoint stores every "
                "element", extra={"kind": "aliased_tensors", "key": key}, file=path.name,
            )
        total += array.nbytes
    check_declared_total(path, total, size, budget)
