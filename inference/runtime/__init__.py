"""How a network runs: a verified ONNX Runtime artifact (no torch in the process) or eager PyTorch.

`runtime_select` decides per request from DEPTHSITE_RUNTIME (auto | onnx | eager) and the device: auto
means ONNX Runtime on CPU when it is installed, eager on CUDA. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "eager")
_said: set[str] = set()


def say_once(key: str, message: str, *args, level: int = logging.WARNING) -> None:
    """Log a fallback or an ignored setting once per process, not once per image."""
    if key not in _said:
        _said.add(key)
        logger.log(level, message, *args)


# The first release that opens a packed artifact (inference.runtime.pack): an ONNX graph handed over as bytes
# whose external data lies in a named folder. 1.19 and 1.20 refuse it ("model_path must not be empty").
ONNXRUNTIME_MIN = (1, 21)


def onnxruntime_version() -> tuple[int, ...] | None:
    """The installed onnxruntime's (major, minor), None when it is not installed."""
    try:
        module = importlib.import_module("onnxruntime")
    except ImportError:
        return None
    parts = []
    for part in str(getattr(module, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def cuda_possible() -> bool:
    """Whether CUDA could be there: without an NVIDIA driver it cannot, and torch need not be imported to ask."""
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()):
        return False
    import torch

    return torch.cuda.is_available()


def runtime_select(*, device: str | None = None) -> str:
    """'onnx' or 'eager' for a request on `device` (None: DEPTHSITE_DEVICE, else CUDA when present, else CPU)."""
    from django.conf import settings  # here, so inference.nets may use this package's numpy transforms

    wanted = (getattr(settings, "DEPTHSITE_RUNTIME", "auto") or "auto").lower()
    if wanted == "eager":
        return "eager"
    name = (device or settings.DEPTHSITE_DEVICE or "").strip().lower()
    if name and name != "cpu":
        if wanted == "onnx":
            say_once(f"device:{name}", "DEPTHSITE_RUNTIME=onnx runs on CPU only; %s runs eager", name)
        return "eager"
    if not name and wanted == "auto" and cuda_possible():
        return "eager"
    version = onnxruntime_version()
    if version is None or version < ONNXRUNTIME_MIN:
        if version is None:
            say_once("no-onnxruntime", "onnxruntime is not installed: models run in eager PyTorch "
                     "(pip install -r requirements.txt for the faster CPU runtime)")
        else:
            say_once("old-onnxruntime", "onnxruntime %s is older than %s, the first that opens depthsite's "
                     "artifacts: models run in eager PyTorch (pip install -r requirements.txt)",
                     ".".join(map(str, version)), ".".join(map(str, ONNXRUNTIME_MIN)))
        return "eager"
    return "onnx"
