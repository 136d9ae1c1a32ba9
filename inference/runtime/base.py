"""What every runtime's estimator answers: the depth result, and the facts the pool and the job record read."""
from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from depthsite.netspecs import NetSpec


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
    runtime: str = "eager"

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "depth"}


def preprocessing_facts(config: NetSpec, size: tuple[int, int]) -> dict[str, Any]:
    """How an image became the network input, as a job records it."""
    return {
        "network_input": list(size),
        "resize_method": config.resize_method,
        "ensure_multiple_of": config.ensure_multiple_of,
        "keep_aspect_ratio": config.keep_aspect_ratio,
        "mean": list(config.mean),
        "std": list(config.std),
        "interpolation": "bicubic, no antialiasing, on float64 image/255",
    }


class Estimator(Protocol):
    """One network from one cached weight file, ready to predict; the pool holds these."""

    model_name: str
    weights_sha256: str
    weights_format: str
    weight_file_id: int
    runtime: str
    bytes: int
    load_ms: float
    last_used: float

    @property
    def key(self) -> tuple: ...

    @property
    def device_name(self) -> str: ...

    @property
    def dtype_name(self) -> str: ...

    def predict(self, image: np.ndarray) -> DepthResult: ...


def depth_result(estimator, depth: np.ndarray, *, started: float, height: int, width: int) -> DepthResult:
    """The result of one prediction by `estimator` (either runtime), timed from `started` (perf_counter)."""
    elapsed = (time.perf_counter() - started) * 1000
    estimator.last_used = time.monotonic()
    return DepthResult(
        depth=depth, depth_min=float(depth.min()), depth_max=float(depth.max()), semantics=estimator.semantics,
        model=estimator.model_name, weights_sha256=estimator.weights_sha256, weights_format=estimator.weights_format,
        device=estimator.device_name, dtype=estimator.dtype_name, preprocessing=estimator.preprocessing(height, width),
        inference_ms=elapsed, runtime=estimator.runtime,
    )
