"""Pre- and postprocessing in numpy: the torch-free twin of inference/nets/transforms.py (same sizes, same kernels).

Resizing is separable: each axis is a gather of 4 (bicubic) or 2 (bilinear) neighbours with per-output
weights, computed exactly as torch's upsample kernels compute them (half-pixel centres without
clamping for bicubic, a = -0.75, border indices clamped; align_corners for Depth Anything's bilinear).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from depthsite.netspecs import NetSpec, net_spec, target_size

CUBIC_A = -0.75


def _resolve(spec_or_name: NetSpec | str) -> NetSpec:
    return spec_or_name if isinstance(spec_or_name, NetSpec) else net_spec(spec_or_name)


def _cubic_taps(size_in: int, size_out: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (size_out, 4): torch's bicubic with align_corners=False and no antialiasing."""
    scale = dtype(size_in) / dtype(size_out)
    source = scale * (np.arange(size_out, dtype=dtype) + dtype(0.5)) - dtype(0.5)  # not clamped for cubic
    base = np.floor(source)
    t = (source - base).astype(dtype)
    a = dtype(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(dtype)
    indices = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(indices, 0, size_in - 1), weights


def _linear_taps_aligned(size_in: int, size_out: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (size_out, 2): torch's bilinear with align_corners=True."""
    scale = dtype(size_in - 1) / dtype(size_out - 1) if size_out > 1 else dtype(0)
    source = scale * np.arange(size_out, dtype=dtype)
    low = np.floor(source).astype(np.int64)
    low = np.clip(low, 0, size_in - 1)
    lam = (source - low).astype(dtype)
    high = np.minimum(low + 1, size_in - 1)
    return np.stack([low, high], axis=1), np.stack([1 - lam, lam], axis=1).astype(dtype)


# Taps gathered at a time (elements): a few MB, so a 12-megapixel input or output never makes a
# temporary four times its size.
GATHER_CHUNK = 1 << 20


def _resize_axis(x: np.ndarray, axis: int, size_out: int, mode: str, dtype: Any, threads: int = 1) -> np.ndarray:
    """Resize one of the last two axes: the taps of a block of rows gathered in one take, then summed with
    their weights in one contraction (not a gather, a product and a sum per tap: 2.4x faster on a phone
    photo, 7x on a 12-megapixel one). x may be uint8: the taps are summed in `dtype`."""
    if axis not in (x.ndim - 1, x.ndim - 2):
        raise ValueError(f"only the last two axes are resized, not axis {axis}")
    size_in = x.shape[axis]
    if mode == "bicubic":
        indices, weights = _cubic_taps(size_in, size_out, dtype)
    else:
        indices, weights = _linear_taps_aligned(size_in, size_out, dtype)
    taps = indices.shape[1]
    if axis == x.ndim - 1:
        rows = x.reshape(-1, size_in)
        out = _blockwise(rows.shape[0], size_out * taps, (rows.shape[0], size_out), 0, dtype,
                         lambda block: np.einsum("rok,ok->ro", rows[block][:, indices], weights, dtype=dtype,
                                                 casting="same_kind"), threads)
        return out.reshape(x.shape[:-1] + (size_out,))
    planes = x.reshape(-1, size_in, x.shape[-1])
    out = _blockwise(size_out, planes.shape[0] * taps * x.shape[-1], (planes.shape[0], size_out, x.shape[-1]), 1,
                     dtype, lambda block: np.einsum("bokw,ok->bow", planes[:, indices[block]], weights[block],
                                                    dtype=dtype, casting="same_kind"), threads)
    return out.reshape(x.shape[:-2] + (size_out, x.shape[-1]))


# Below this many taps a pass runs in the calling thread: handing blocks to threads costs more than it saves.
THREADED_FROM_TAPS = 1 << 16


def _threads_for(work: int, threads: int) -> int:
    # A pool thread never hands work to its own pool: it would wait for threads that are all busy waiting.
    if work < THREADED_FROM_TAPS or threading.current_thread().name.startswith(_POOL_PREFIX):
        return 1
    return max(1, min(MAX_RESIZE_THREADS, threads))


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_POOL_PREFIX = "depthsite-resize"
# More threads than this only cut one photo's passes into smaller blocks (measured: 1 against 2 threads).
MAX_RESIZE_THREADS = 4


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads for this process (a pool made before a fork has no threads in the child)."""
    key = (os.getpid(), threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_POOL_PREFIX)
        return pool


def _forget_pools_in_child() -> None:
    # A fork copies the parent's pools without their threads, and the lock as it was: held, if another thread
    # was making a pool at that moment, and then never released in the child.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def resize_threads(threads: int = 0) -> int:
    """Threads for the resize: `threads`, or with 0 the cores this process may run on; at most
    MAX_RESIZE_THREADS either way."""
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    return max(1, min(MAX_RESIZE_THREADS, threads))


def _blockwise(count: int, taps_each: int, shape: tuple[int, ...], axis: int, dtype: Any,
               part: Callable[[slice], np.ndarray], threads: int = 1) -> np.ndarray:
    """The array of `shape` whose `count` slices along `axis` are part(slice), taken in blocks of at most
    GATHER_CHUNK taps (`taps_each` per slice). part returns each block as a new array, copied into place: asked
    to write into the output itself, einsum takes a slower loop (1.8 ms against 0.4 ms for a phone photo's width
    pass). One block is returned as it is, without a copy.

    With `threads` > 1 and at least THREADED_FROM_TAPS taps in all, there are at least that many blocks, computed
    in a pool (the gather and einsum release the GIL). A block computes the same in any thread; its shape may change einsum's loop and so the order of a few
    additions (as GATHER_CHUNK's blocks always could): differences near 1e-16 relative in float64, rarely one
    float32 ulp. bench/resize.py found the outputs bit-identical at its sizes."""
    step = max(1, GATHER_CHUNK // max(1, taps_each))
    threads = _threads_for(count * taps_each, threads)
    if threads > 1:
        step = min(step, -(-count // threads))
    if step >= count:
        return part(slice(0, count))
    out = np.empty(shape, dtype=dtype)

    def fill(start: int) -> None:
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, start + step)
        out[tuple(index)] = part(index[axis])

    starts = range(0, count, step)
    if threads > 1:
        for _ in _pool(threads).map(fill, starts):
            pass
    else:
        for start in starts:
            fill(start)
    return out


def resize(x: np.ndarray, size: tuple[int, int], *, mode: str = "bicubic", dtype: Any = np.float64,
           threads: int = 1) -> np.ndarray:
    """Resize the last two axes of x (…, H, W) to size; mode "bicubic" (half-pixel) or "bilinear" (aligned corners).

    x of another dtype (uint8 pixels) is read as is: only the taps are converted, never the whole input.
    `threads` > 1 splits each pass across a pool of that many threads (see _blockwise)."""
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"unsupported interpolation {mode!r}")
    height, width = int(size[0]), int(size[1])
    # Along x first, then y: the order torch's kernels accumulate in, so float32 results agree closely.
    x = _resize_axis(x, x.ndim - 1, width, mode, dtype, threads)
    return _resize_axis(x, x.ndim - 2, height, mode, dtype, threads)


def preprocess(image: np.ndarray, spec_or_name: NetSpec | str, *, threads: int = 1) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> normalised float32 (1, 3, h, w) at the network input size (float64 inside)."""
    cfg = _resolve(spec_or_name)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array of shape (H, W, 3), got {array.dtype} {array.shape}")
    size = target_size(array.shape[0], array.shape[1], cfg)
    # Resized from the uint8 pixels, then scaled: the same sums divided once, on the network's few pixels.
    x = resize(array.transpose(2, 0, 1), size, mode="bicubic", dtype=np.float64, threads=threads)
    x /= 255.0  # in place, the same operations in the same order as (x / 255 - mean) / std
    x -= np.asarray(cfg.mean, dtype=np.float64).reshape(3, 1, 1)
    x /= np.asarray(cfg.std, dtype=np.float64).reshape(3, 1, 1)
    return np.ascontiguousarray(x[None].astype(np.float32))


def postprocess(prediction: np.ndarray, size: tuple[int, int], spec_or_name: NetSpec | str | None = None, *,
                threads: int = 1) -> np.ndarray:
    """Network output (1, h, w) or (h, w) -> float32 (H, W) at the image size, with the variant's official resize."""
    pred = np.asarray(prediction)
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.ndim != 2:
        raise ValueError(f"expected a prediction of shape (1, h, w) or (h, w), got {tuple(np.shape(prediction))}")
    mode = "bicubic"
    if spec_or_name is not None:
        cfg = _resolve(spec_or_name)
        mode = cfg.output_interpolation
        if cfg.output_align_corners != (mode == "bilinear"):
            # Only the two official pairs have a twin: bicubic half-pixel (MiDaS), bilinear aligned (DA V2).
            raise ValueError(f"{cfg.name}: {mode} with align_corners={cfg.output_align_corners} has no numpy twin")
    # float32 like torch: its float32 source indices and weights are what the eager path computes with.
    out = resize(pred.astype(np.float32), size, mode=mode, dtype=np.float32, threads=threads)
    return np.ascontiguousarray(out, dtype=np.float32)
