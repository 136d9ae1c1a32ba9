"""Inference's domain errors, members of the one ApplicationError family (rendered alike by every door)."""
from depthsite.exceptions import ApplicationError, TooLargeError


class ImageError(ApplicationError):
    """The uploaded file is not a photo depthsite can read (not an image, truncated, empty)."""

    status = 400


class ImageTooLargeError(ImageError, TooLargeError):
    """Too many pixels (a decompression bomb) or too many bytes."""

    status = 413


class InferenceError(ApplicationError):
    """The model could not run (device unavailable, out of memory)."""

    status = 503


class DeviceError(InferenceError):
    """The device asked for (DEPTHSITE_DEVICE, --device) is unknown or absent on this machine: the configuration's
    fault, which a job's uploader can do nothing about (inference.services.job_runs.error_for)."""


class OutOfMemoryError(InferenceError):
    """The network ran out of memory on this input (CPU or GPU): a smaller image or model may fit."""


class QuotaExceededError(ApplicationError):
    """An anonymous session or address already stores as many jobs or bytes as DEPTHSITE_ANON_MAX_* allow."""

    status = 429


class RuntimeArtifactError(InferenceError):
    """A runtime artifact (ONNX) could not be built, or does not compute what eager PyTorch computes."""
