"""The eager PyTorch estimator: a network built on the meta device, weights assigned from the memory-mapped file.

torch is imported here and only here on the inference path; a process whose models all run from a
verified ONNX artifact never imports this module.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from django.conf import settings

from inference.exceptions import DeviceError, InferenceError, OutOfMemoryError
from inference.nets import create_model, get_config, postprocess, preprocess, target_size
from inference.runtime.base import DepthResult, depth_result, preprocessing_facts
from depthsite.exceptions import WeightFileError
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.records import weights_read

logger = logging.getLogger(__name__)


def device_select(requested: str | None = None) -> torch.device:
    """DEPTHSITE_DEVICE (or `requested`) when given, else CUDA when present, else CPU."""
    name = (requested or settings.DEPTHSITE_DEVICE or "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r} (use cpu, cuda or cuda:N)", extra={"field": "device"}) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} was asked for but CUDA is not available on this machine",
                          extra={"field": "device"})
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {device.type} is not supported", extra={"field": "device"})
    return device


def half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit float a device runs fast: float16 on CUDA; on a CPU bfloat16, which AMX tiles multiply (the pool
    only asks for it there, inference.runtime.cpu) and whose float32-wide exponent cannot overflow."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def configure_threads() -> None:
    threads = settings.DEPTHSITE_TORCH_THREADS
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cpu_out_of_memory(exc: RuntimeError) -> bool:
    """Whether torch's CPU allocator refused memory: it raises a plain RuntimeError ("DefaultCPUAllocator:
    can't allocate memory" or "... not enough memory"), the one place a type cannot tell it apart."""
    text = str(exc)
    return "DefaultCPUAllocator" in text or "out of memory" in text.lower()


class DepthEstimator:
    """One network on one device from one cached weight file; predict() may be called from many threads."""

    runtime = "eager"

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
        self.dtype = half_dtype(device) if half else torch.float32
        self.config = get_config(model.architecture)
        network = create_model(model.architecture, state_dict=state_dict, device=str(device))
        if half:
            network = network.to(self.dtype)
        network.eval()
        if compile:
            network = torch.compile(network)
        self.network = network
        self.bytes = network_bytes(network)
        self.load_ms = (time.perf_counter() - started) * 1000
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def key(self) -> tuple:
        return (self.model_name, self.weights_sha256, self.device_name, str(self.dtype), self.runtime)

    def preprocessing(self, height: int, width: int) -> dict[str, Any]:
        return preprocessing_facts(self.config, target_size(height, width, self.config))

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
        return depth_result(self, depth, started=started, height=height, width=width)

    def release(self) -> None:
        # A thread may still be running it: drop nothing it needs, only hand cached blocks back to the GPU.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


def state_dict_read(weight_file: WeightFile) -> dict[str, torch.Tensor]:
    """The file's tensors as torch tensors sharing the memory-mapped arrays (no copy)."""
    loaded = weights_read(weight_file)
    return {key: torch.from_numpy(array) for key, array in loaded.arrays.items()}


def network_refused(model: RegisteredModel, exc: ValueError) -> WeightFileError:
    """The network refusing a file's tensors (missing keys, wrong shapes) means the file is unusable for it."""
    return WeightFileError(f"the network refused these weights: {exc}", extra={"model": model.name})


def estimator_build(*, model: RegisteredModel, weight_file: WeightFile, device: torch.device, half: bool,
                    compile: bool) -> DepthEstimator:
    """Read the handed file and build its network; WeightFileError (or OSError) when the file is unusable."""
    state_dict = state_dict_read(weight_file)
    try:
        return DepthEstimator(model=model, weight_file=weight_file, state_dict=state_dict, device=device,
                              half=half, compile=compile)
    except ValueError as exc:
        raise network_refused(model, exc) from None
