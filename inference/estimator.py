"""The registry-backed depth estimator, and the per-process pool that keeps estimators warm.

Weights come from the registry's resolution chain (healthy cached file -> other format -> download),
are memory-mapped, and are assigned into a network built on the meta device: no random initialisation
and no second copy of the weights in memory. torch is imported here, never by the web pages.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from django.conf import settings

from inference.exceptions import InferenceError, OutOfMemoryError
from inference.nets import create_model, get_config, postprocess, preprocess, target_size
from models_registry.catalogue import approx_bytes
from models_registry.exceptions import WeightFileError
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_get
from models_registry.services.resolve import weights_resolve, weights_resolve_loaded
from models_registry.services.warm import warm_model_forget, warm_model_record, warm_models_forget_at_exit
from models_registry.services.weights import weight_mark_corrupt, weight_mark_used

logger = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class DepthResult:
    depth: np.ndarray  # (H, W) float32 at the input resolution
    depth_min: float
    depth_max: float
    semantics: str
    model: str
    weights_sha256: str
    weights_format: str
    device: str
    dtype: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    inference_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "depth"}


def device_select(requested: str | None = None) -> torch.device:
    """DEPTHSITE_DEVICE (or `requested`) when given, else CUDA when present, else CPU."""
    name = (requested or settings.DEPTHSITE_DEVICE or "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InferenceError(f"unknown device {name!r} (use cpu, cuda or cuda:N)", extra={"field": "device"}) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {name} was asked for but CUDA is not available on this machine",
                             extra={"field": "device"})
    if device.type not in ("cpu", "cuda", "mps"):
        raise InferenceError(f"device type {device.type} is not supported", extra={"field": "device"})
    return device


def _configure_threads() -> None:
    threads = settings.DEPTHSITE_TORCH_THREADS
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class DepthEstimator:
    """One network on one device from one cached weight file; predict() may be called from many threads."""

    def __init__(self, *, model: RegisteredModel, weight_file: WeightFile, state_dict: dict,
                 device: torch.device, half: bool = False, compile: bool = False):
        started = time.perf_counter()
        self.model_name = model.name
        self.architecture = model.architecture
        self.semantics = model.semantics
        self.weights_sha256 = weight_file.sha256
        self.weights_format = weight_file.format
        self.weight_file_id = weight_file.pk
        self.device = device
        self.dtype = torch.float16 if half else torch.float32
        self.config = get_config(model.architecture)
        network = create_model(model.architecture, state_dict=state_dict, device=str(device))
        if half:
            network = network.half()
        network.eval()
        if compile:
            network = torch.compile(network)
        self.network = network
        self.bytes = network_bytes(network)
        self.load_ms = (time.perf_counter() - started) * 1000
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def key(self) -> tuple:
        return (self.model_name, self.weights_sha256, str(self.device), str(self.dtype))

    def preprocessing(self, height: int, width: int) -> dict[str, Any]:
        return {
            "network_input": list(target_size(height, width, self.config)),
            "resize_method": self.config.resize_method,
            "ensure_multiple_of": self.config.ensure_multiple_of,
            "keep_aspect_ratio": self.config.keep_aspect_ratio,
            "mean": list(self.config.mean),
            "std": list(self.config.std),
            "interpolation": "bicubic, no antialiasing, on float64 image/255",
        }

    def predict(self, image: np.ndarray) -> DepthResult:
        """uint8 RGB (H, W, 3) -> float32 relative inverse depth at (H, W)."""
        height, width = int(image.shape[0]), int(image.shape[1])
        try:
            batch = preprocess(image, self.config)
        except ValueError as exc:
            raise InferenceError(f"cannot prepare the image for {self.model_name}: {exc}") from None
        batch = batch.to(self.device, self.dtype)
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            try:
                prediction = self.network(batch)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise OutOfMemoryError(f"out of GPU memory running {self.model_name} on a {width}x{height} image; "
                                     "try a smaller image or a smaller model") from None
            except RuntimeError as exc:
                if not cpu_out_of_memory(exc):
                    raise
                raise OutOfMemoryError(f"out of memory running {self.model_name} on a {width}x{height} image; "
                                       "try a smaller image or a smaller model") from None
            depth = postprocess(prediction.float().cpu(), (height, width), self.config)
        elapsed = (time.perf_counter() - started) * 1000
        self.last_used = time.monotonic()
        return DepthResult(
            depth=depth, depth_min=float(depth.min()), depth_max=float(depth.max()), semantics=self.semantics,
            model=self.model_name, weights_sha256=self.weights_sha256, weights_format=self.weights_format,
            device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
            preprocessing=self.preprocessing(height, width), inference_ms=elapsed,
        )


def cpu_out_of_memory(exc: RuntimeError) -> bool:
    """Whether torch's CPU allocator refused memory: it raises a plain RuntimeError ("DefaultCPUAllocator:
    can't allocate memory" or "... not enough memory"), the one place a type cannot tell it apart."""
    text = str(exc)
    return "DefaultCPUAllocator" in text or "out of memory" in text.lower()


def network_bytes(network: torch.nn.Module) -> int:
    """Bytes of the tensors a network holds (parameters and buffers; shared storage counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*network.parameters(), *network.buffers()]:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def estimator_build(*, model: RegisteredModel, device: torch.device, half: bool, compile: bool,
                    offline: bool | None = None) -> DepthEstimator:
    """Resolve, load and build; a file that the network refuses is marked corrupt and the next one is tried."""
    last_error = ""
    for _ in range(3):
        weight_file, loaded = weights_resolve_loaded(model=model, offline=offline)
        state_dict = {key: torch.from_numpy(array) for key, array in loaded.arrays.items()}
        try:
            return DepthEstimator(model=model, weight_file=weight_file, state_dict=state_dict, device=device,
                                  half=half, compile=compile)
        except ValueError as exc:
            last_error = str(exc)
            weight_mark_corrupt(weight_file=weight_file, reason=f"the network refused these weights: {exc}")
    raise WeightFileError(f"no cached file of {model.name} builds a network (last error: {last_error})",
                          extra={"model": model.name})


class EstimatorPool:
    """Warm estimators keyed by (model, weights sha256, device, dtype), least recently used evicted first.

    At most `capacity` networks (DEPTHSITE_WARM_MODELS) and `max_bytes` of their tensors
    (DEPTHSITE_WARM_BYTES): room is made before a network is built, so a large model does not load
    next to the ones it will replace. One network larger than the budget alone is still kept (it must run).
    """

    def __init__(self, capacity: int | None = None, max_bytes: int | None = None):
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._estimators: OrderedDict[tuple, DepthEstimator] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    @property
    def capacity(self) -> int:
        return max(1, self._capacity or settings.DEPTHSITE_WARM_MODELS)

    @property
    def max_bytes(self) -> int | None:
        value = self._max_bytes if self._max_bytes is not None else getattr(settings, "DEPTHSITE_WARM_BYTES", None)
        return value or None

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._estimators.values())

    def get(self, *, model: RegisteredModel | str, device: str | None = None, half: bool | None = None,
            offline: bool | None = None) -> DepthEstimator:
        if isinstance(model, str):
            model = model_get(name=model, enabled_only=True)
        _configure_threads()
        target = device_select(device)
        use_half = bool(settings.DEPTHSITE_FP16 if half is None else half)
        if use_half and target.type != "cuda":
            logger.info("fp16 is only used on CUDA; %s runs in float32 on %s", model.name, target)
            use_half = False
        dtype = str(torch.float16 if use_half else torch.float32)
        weight_file = weights_resolve(model=model, offline=offline)
        key = (model.name, weight_file.sha256, str(target), dtype)

        estimator = self._lookup(key)
        if estimator is None:
            with self._build_lock(key):
                estimator = self._lookup(key)
                if estimator is None:
                    incoming = approx_bytes(model.architecture) // (2 if use_half else 1)
                    self._evict(self._over_budget(incoming=incoming, adding=1))
                    estimator = estimator_build(model=model, device=target, half=use_half,
                                                compile=settings.DEPTHSITE_COMPILE, offline=offline)
                    self._insert(estimator)
                    logger.info("%s ready on %s in %.0f ms (%d MB)", model.name, target, estimator.load_ms,
                                estimator.bytes // 1_000_000)
                    warm_model_record(model=model, weight_file=WeightFile.objects.filter(
                        pk=estimator.weight_file_id).first(), worker=WORKER_ID, device=str(target),
                        dtype=dtype.replace("torch.", ""), load_ms=estimator.load_ms, bytes=estimator.bytes)
                    if not settings.Q_CLUSTER.get("sync"):
                        # A worker (or `predict`) that exits takes its rows with it; tasks run inline (tests)
                        # belong to no worker.
                        warm_models_forget_at_exit(worker=WORKER_ID)
        used = WeightFile.objects.filter(pk=estimator.weight_file_id).first()
        if used is not None:
            weight_mark_used(weight_file=used)
        return estimator

    def _lookup(self, key: tuple) -> DepthEstimator | None:
        with self._lock:
            estimator = self._estimators.get(key)
            if estimator is not None:
                self._estimators.move_to_end(key)
            return estimator

    def _build_lock(self, key: tuple) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def _over_budget(self, *, incoming: int = 0, adding: int = 0) -> list[DepthEstimator]:
        """Least recently used estimators to drop so that `adding` more networks of `incoming` bytes fit."""
        limit = self.max_bytes
        with self._lock:
            held = list(self._estimators.values())  # least recently used first
        # After an insert the newest network always stays: without it the request could not run at all.
        candidates = held if adding else held[:-1]
        count = len(held) + adding
        total = sum(e.bytes for e in held) + incoming
        chosen = []
        for old in candidates:
            if count <= self.capacity and (limit is None or total <= limit):
                break
            chosen.append(old)
            count -= 1
            total -= old.bytes
        return chosen

    def _insert(self, estimator: DepthEstimator) -> None:
        with self._lock:
            self._estimators[estimator.key] = estimator
            self._estimators.move_to_end(estimator.key)
        self._evict(self._over_budget())
        if self.max_bytes is not None and estimator.bytes > self.max_bytes:
            logger.warning("%s alone holds %d bytes, over DEPTHSITE_WARM_BYTES=%d; kept while it is used",
                           estimator.model_name, estimator.bytes, self.max_bytes)

    def _evict(self, victims: list[DepthEstimator]) -> None:
        evicted = []
        with self._lock:
            for old in victims:
                if self._estimators.get(old.key) is old:
                    del self._estimators[old.key]
                    evicted.append(old)
        for old in evicted:
            logger.info("evicting warm %s (%s) from this process", old.model_name, old.device)
            try:
                model = RegisteredModel.objects.get(name=old.model_name)
                warm_model_forget(worker=WORKER_ID, model=model, device=str(old.device),
                                  dtype=str(old.dtype).replace("torch.", ""))
            except RegisteredModel.DoesNotExist:
                pass
            if old.device.type == "cuda":
                del old
                torch.cuda.empty_cache()

    def warm(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"model": e.model_name, "weights_sha256": e.weights_sha256, "device": str(e.device),
                     "dtype": str(e.dtype).replace("torch.", ""), "load_ms": e.load_ms, "bytes": e.bytes}
                    for e in self._estimators.values()]

    def clear(self) -> None:
        with self._lock:
            self._estimators.clear()
            self._building.clear()
        warm_model_forget(worker=WORKER_ID)


_pool = EstimatorPool()


def estimator_get(*, model: RegisteredModel | str, device: str | None = None, half: bool | None = None,
                  offline: bool | None = None) -> DepthEstimator:
    """A warm estimator from this process's pool (built on first use)."""
    return _pool.get(model=model, device=device, half=half, offline=offline)


def estimator_pool() -> EstimatorPool:
    return _pool
