"""Pieces the request bodies of both apps' APIs are built from: strict bodies, size, weight format and upload fields."""
from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from depthsite.units import parse_size
from models_registry.choices import WeightFormat
from depthsite.exceptions import InvalidRequestError

MAX_BYTES_LIMIT = 2**63 - 1  # what a BigIntegerField and every disk can hold


class WeightFormatField(serializers.ChoiceField):
    """A weight format; also takes the CLI's spellings (pth, hdf5, pickle, .pt) and yields the canonical value."""

    def __init__(self, **kwargs):
        super().__init__(choices=WeightFormat.choices, **kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid_choice", input=data)
        try:
            return WeightFormat.parse(data).value
        except InvalidRequestError as exc:
            raise serializers.ValidationError(exc.message, code="invalid_choice") from None


@extend_schema_field({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "example": "2GB"}],
                     "description": "Bytes, or a size with a unit: 2GB, 500MiB, 800M (decimal units; KiB/MiB/GiB "
                                    "binary)."})
class SizeField(serializers.Field):
    """A byte count given as an integer or with a unit ("2GB", "500MiB"): the CLI's --max-size reads the same."""

    default_error_messages = {"invalid": "{reason}", "max_value": "at most {max_value} bytes"}

    def __init__(self, *, max_value: int = MAX_BYTES_LIMIT, **kwargs):
        self.max_value = max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, str)):
            self.fail("invalid", reason=f"not a size: {data!r} (examples: 2GB, 500MiB, 123456)")
        try:
            value = parse_size(data)
        except ValueError as exc:
            self.fail("invalid", reason=str(exc))
        if value > self.max_value:
            self.fail("max_value", max_value=self.max_value)
        return value

    def to_representation(self, value):
        return value


class StrictSerializer(serializers.Serializer):
    """A request body whose unknown fields are a 400 naming them: a misspelt option must never do nothing.

    Every write endpoint of /api/models/* and /api/predictions/ validates its body with one of these."""

    IGNORED = frozenset({"csrfmiddlewaretoken"})  # the browsable API's own form field

    def to_internal_value(self, data):
        if hasattr(data, "keys"):
            unknown = sorted(str(key) for key in data.keys() if key not in self.fields and key not in self.IGNORED)
            if unknown:
                known = ", ".join(name for name, field in self.fields.items() if not field.read_only) or "none"
                raise serializers.ValidationError(
                    {"non_field_errors": [f"unknown field{'s' if len(unknown) > 1 else ''} "
                                          f"{', '.join(unknown)}; this endpoint accepts: {known}"]},
                    code="unknown_field")
        return super().to_internal_value(data)


@extend_schema_field(OpenApiTypes.BINARY)
class UploadField(serializers.FileField):
    """A file part of a multipart body; documented as binary (not a URI) so clients and fuzzers send bytes."""
