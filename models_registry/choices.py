"""Choices of the registry's records, with the groups that views and services rely on."""
from django.db import models

from depthsite.netspecs import NET_SPECS


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
        from depthsite.exceptions import InvalidRequestError

        value = (text or "").strip().lower().lstrip(".")
        value = {"pth": "pt", "torch": "pt", "st": "safetensors", "hdf5": "h5", "pickle": "pkl"}.get(value, value)
        try:
            return cls(value)
        except ValueError:
            raise InvalidRequestError(
                f"unknown format {text!r}; choose one of: {', '.join(cls.values)}", extra={"field": "format"}
            ) from None


class RuntimeFormat(models.TextChoices):
    """Files derived from cached weights for a faster runtime: built on this node, never imported or exported."""

    ONNX = "onnx", "ONNX Runtime graph (.onnx), built from cached weights"

    @classmethod
    def extension(cls, fmt: str) -> str:
        return {"onnx": ".onnx"}[fmt]


# What a WeightFile row may hold: weights in one of four formats, or a runtime artifact derived from them.
FILE_FORMAT_CHOICES = [*WeightFormat.choices, *RuntimeFormat.choices]


class Health(models.TextChoices):
    OK = "ok", "ok"
    UNVERIFIED = "unverified", "unverified"
    CORRUPT = "corrupt", "corrupt"
    MISSING = "missing", "missing"


# Groups ride on the choice classes so no view or service hard-codes a list of values.
Health.USABLE = (Health.OK, Health.UNVERIFIED)


# The network variants of depthsite.netspecs, e.g. Architecture.DPT_BEIT_L_512 == "DPT_BEiT_L_512".
Architecture = models.TextChoices(
    "Architecture",
    [(spec.name.upper(), (spec.name, f"{spec.name}: {spec.family_label}, {spec.backbone}, {spec.input_size} px"))
     for spec in NET_SPECS.values()],
)


def architecture_choices() -> list[tuple[str, str]]:
    """The field's choices as a callable: migrations refer to it, so a new variant needs no migration."""
    return Architecture.choices


