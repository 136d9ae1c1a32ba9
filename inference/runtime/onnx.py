"""The ONNX Runtime estimator: a verified artifact, numpy pre- and postprocessing, and no torch in the process."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from depthsite.netspecs import net_spec
from inference.exceptions import InferenceError, OutOfMemoryError
from inference.runtime import transforms
from inference.runtime.pack import pack_read
from inference.runtime.base import DepthResult, depth_result, preprocessing_facts


def session_options(threads: int = 0, *, prepack: bool = True) -> Any:
    """ORT's options as measured here (docs/performance.md): every graph optimisation, one inter-op thread, no spinning.

    `prepack=False` skips repacking the weights into the matrix kernels' layout when the session opens: DPT_Large
    then opens in 0.5 s instead of 2.4 s, for a forward a few per cent slower. Worth it for a process that runs a
    few images and exits (`manage.py predict`), not for a worker."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = max(0, int(threads or 0))  # 0: one per physical core
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    # ORT's pool threads otherwise spin for a while after each run: on a shared CPU that time is taken from
    # everything else in the worker (an eager fallback model ran 10x slower right after a run here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Not "session.prepack.enable_parallel" (ORT >= 1.31): it opened DPT_Large 0.5 s sooner but held every mapped
    # weight while its threads repacked, a peak of 1.92x the weights against 1.16x (docs/performance.md).
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def session_open(path: Path | str, threads: int = 0, *, prepack: bool = True) -> Any:
    """A session on an artifact: a packed one (inference.runtime.pack) or a plain ONNX file.

    PackError when a packed file cannot be opened where it is."""
    import onnxruntime as ort

    options = session_options(threads, prepack=prepack)
    packed = pack_read(path)
    if packed is None:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(packed.folder))
    return ort.InferenceSession(packed.graph, options, providers=["CPUExecutionProvider"])


class OnnxEstimator:
    """One model from one verified artifact; the artifact was built from the weight file it names."""

    runtime = "onnx"

    def __init__(self, *, model_name: str, architecture: str, semantics: str, weights_sha256: str,
                 weights_format: str, weight_file_id: int, artifact_path: Path, artifact_bytes: int,
                 threads: int = 0, prepack: bool = True):
        started = time.perf_counter()
        self.model_name = model_name
        self.architecture = architecture
        self.semantics = semantics
        self.weights_sha256 = weights_sha256
        self.weights_format = weights_format
        self.weight_file_id = weight_file_id
        self.config = net_spec(architecture)
        self.prepack = prepack
        self.session = session_open(artifact_path, threads, prepack=prepack)
        # The resize around the forward runs while the session's threads wait: DEPTHSITE_TORCH_THREADS threads too
        # (0: the cores this process may use, where ORT takes the physical cores; the same on these VMs).
        self.resize_threads = transforms.resize_threads(threads)
        self.input_name = self.session.get_inputs()[0].name
        self.bytes = artifact_bytes
        self.load_ms = (time.perf_counter() - started) * 1000
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    device_name = "cpu"
    dtype_name = "float32"

    @property
    def key(self) -> tuple:
        return (self.model_name, self.weights_sha256, self.device_name, "torch.float32", self.runtime)

    def preprocessing(self, height: int, width: int) -> dict[str, Any]:
        return preprocessing_facts(self.config, transforms.target_size(height, width, self.config))

    def forward(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.session.run(None, {self.input_name: batch})[0]

    def predict(self, image: np.ndarray) -> DepthResult:
        """uint8 RGB (H, W, 3) -> float32 relative inverse depth at (H, W)."""
        height, width = int(image.shape[0]), int(image.shape[1])
        try:
            batch = transforms.preprocess(image, self.config, threads=self.resize_threads)
        except ValueError as exc:
            raise InferenceError(f"cannot prepare the image for {self.model_name}: {exc}") from None
        started = time.perf_counter()
        try:
            prediction = self.forward(batch)
        except Exception as exc:
            # ONNX Runtime reports a failed allocation as its own RuntimeException ("Failed to allocate memory",
            # "bad allocation"); numpy as MemoryError.
            if not (isinstance(exc, MemoryError) or "alloc" in str(exc).lower()):
                raise
            raise OutOfMemoryError(f"out of memory running {self.model_name} on a {width}x{height} image; "
                                   "try a smaller image or a smaller model") from None
        depth = transforms.postprocess(prediction, (height, width), self.config, threads=self.resize_threads)
        return depth_result(self, depth, started=started, height=height, width=width)

    def release(self) -> None:
        self.session = None
