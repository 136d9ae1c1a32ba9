"""Choices of the registry's records, with the groups that views and services rely on."""
from django.db import models


class WeightFormat(models.TextChoices):
    PT = "pt", "PyTorch state_dict (.pt)"
    SAFETENSORS = "safetensors", "safetensors"
    H5 = "h5", "HDF5 (.h5)"
    PKL = "pkl", "Pickle of numpy arrays (.pkl)"

    @classmethod
    def extension(cls, fmt: str) -> str:
        return {"pt": ".pt", "safetensors": ".safetensors", "h5": ".h5", "pkl": ".pkl"}[fmt]

    @classmethod
    def parse(cls, text: str) -> "WeightFormat":
        from models_registry.exceptions import ValidationError

        value = (text or "").strip().lower().lstrip(".")
        value = {"pth": "pt", "torch": "pt", "st": "safetensors", "hdf5": "h5", "pickle": "pkl"}.get(value, value)
        try:
            return cls(value)
        except ValueError:
            raise ValidationError(
                f"unknown format {text!r}; choose one of: {', '.join(cls.values)}", extra={"field": "format"}
            ) from None


class Health(models.TextChoices):
    OK = "ok", "ok"
    UNVERIFIED = "unverified", "unverified"
    CORRUPT = "corrupt", "corrupt"
    MISSING = "missing", "missing"


# Groups ride on the choice classes so no view or service hard-codes a list of values.
Health.USABLE = (Health.OK, Health.UNVERIFIED)


class Architecture(models.TextChoices):
    DPT_LARGE = "DPT_Large", "DPT Large (ViT-L/16 384)"
    DPT_HYBRID = "DPT_Hybrid", "DPT Hybrid (ViT-B/16 + ResNet-50 384)"
    MIDAS_V21 = "MiDaS", "MiDaS v2.1 (ResNeXt-101 32x8d 384)"
    MIDAS_V21_SMALL = "MiDaS_small", "MiDaS v2.1 small (EfficientNet-Lite3 256)"


class RunStatus(models.TextChoices):
    """The life of a background run (a download here, a depth job in inference)."""

    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


RunStatus.ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
RunStatus.TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED)
DownloadStatus = RunStatus
