"""Shapes of the registry API's actions: the bodies and results of clear, optimize, download, verify, convert,
export and import, and the background runs they become."""
from __future__ import annotations

from rest_framework import serializers

from depthsite.choices import RunStatus
from models_registry.api.fields import SizeField, StrictSerializer, UploadField, WeightFormatField
from models_registry.api.serializers import WeightFileSerializer
from models_registry.choices import Health, WeightFormat


def node_field():
    return serializers.CharField(required=False, allow_blank=True, max_length=255,
                                 help_text="The node meant (a file's `node`): refused with 409 and the command to "
                                           "run on that node's machine unless it is the node answering.")


class CacheClearRequestSerializer(StrictSerializer):
    node = node_field()
    confirm = serializers.BooleanField(default=False, help_text="Must be true: clearing deletes weight files.")
    model = serializers.CharField(required=False, allow_blank=True, max_length=200,
                                  help_text="Only this model (name or alias); default every model.")
    format = WeightFormatField(required=False, allow_null=True, help_text="Only this format.")


class CacheClearResultSerializer(serializers.Serializer):
    files = serializers.IntegerField()
    bytes = serializers.IntegerField()
    models = serializers.ListField(child=serializers.CharField(), help_text="Those that had something here to remove.")
    scope = serializers.CharField(help_text="What was asked: a model, a model and format, or every model.")
    node = serializers.CharField(help_text="The node whose cache was cleared (this one).")
    elsewhere = serializers.ListField(child=serializers.CharField(),
                                      help_text="Other nodes that still cache it: cleared only on their machines.")
    summary = serializers.CharField(help_text="One line for people.")


class CacheOptimizeRequestSerializer(StrictSerializer):
    node = node_field()
    dry_run = serializers.BooleanField(default=True, help_text="Only compute the plan (default); false carries it out.")
    max_bytes = SizeField(required=False, allow_null=True,
                          help_text="Evict least recently used files to fit (bytes, or e.g. \"2GB\"); default "
                                    "DEPTHSITE_CACHE_MAX_BYTES.")
    max_size = SizeField(required=False, allow_null=True, write_only=True,
                         help_text="The same as max_bytes, named as the CLI's --max-size.")

    def validate(self, attrs):
        if "max_size" in attrs:
            if attrs.get("max_bytes") is not None:
                raise serializers.ValidationError("give max_bytes or max_size, not both")
            attrs["max_bytes"] = attrs.pop("max_size")
        return attrs


class PlanItemSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["corrupt", "missing", "orphan", "temporary", "stale_lock", "evict"])
    path = serializers.CharField()
    bytes = serializers.IntegerField()
    reason = serializers.CharField()
    model = serializers.CharField(allow_blank=True)
    format = serializers.CharField(allow_blank=True)
    weight_file_id = serializers.IntegerField(allow_null=True)


class OptimizePlanSerializer(serializers.Serializer):
    cache_dir = serializers.CharField()
    node = serializers.CharField()
    max_bytes = serializers.IntegerField(allow_null=True)
    bytes_before = serializers.IntegerField()
    bytes_to_free = serializers.IntegerField()
    bytes_after = serializers.IntegerField()
    executed = serializers.BooleanField(help_text="Whether the plan was carried out.")
    freed_bytes = serializers.IntegerField()
    errors = serializers.ListField(child=serializers.CharField())
    items = PlanItemSerializer(many=True)


class DownloadRequestSerializer(StrictSerializer):
    node = node_field()
    format = WeightFormatField(required=False, allow_null=True,
                               help_text="Also keep a copy in this format (default DEPTHSITE_CACHE_FORMAT).")


class VerifyRequestSerializer(StrictSerializer):
    node = node_field()
    format = WeightFormatField(required=False, allow_null=True, help_text="Only this format.")
    functional = serializers.BooleanField(default=True, help_text="Also run the network on a tiny input.")


class VerifyResultSerializer(serializers.Serializer):
    model = serializers.CharField()
    format = serializers.CharField()
    path = serializers.CharField()
    health = serializers.ChoiceField(choices=Health.choices)
    reason = serializers.CharField(allow_blank=True)
    sha256 = serializers.CharField()
    functional_hash = serializers.CharField(allow_blank=True)


class VerifyResponseSerializer(serializers.Serializer):
    model = serializers.CharField()
    ok = serializers.BooleanField(help_text="Every file verified is ok (false when none is cached).")
    message = serializers.CharField()
    results = VerifyResultSerializer(many=True)


class ConvertRequestSerializer(StrictSerializer):
    format = WeightFormatField(help_text="The format of the copy to add.")


class ExportQuerySerializer(serializers.Serializer):
    format = WeightFormatField(default=WeightFormat.PT.value, help_text="Format of the exported weights.")
    bundle = serializers.BooleanField(default=False, help_text="A .tar with the file and a manifest.json.")


class ImportRequestSerializer(StrictSerializer):
    file = UploadField(help_text="A weight file (pt, safetensors, h5, pkl) or a depthsite bundle (.tar).")
    model = serializers.CharField(required=False, allow_blank=True, max_length=200,
                                  help_text="The model the weights are for; default: recognised by key layout.")
    pin = serializers.BooleanField(default=True, help_text="Pin the imported weights when the model has no pin "
                                                           "yet (false: cache them without pinning).")


class ImportResultSerializer(serializers.Serializer):
    model = serializers.CharField()
    format = serializers.CharField()
    created = serializers.BooleanField(help_text="False when identical weights were already cached.")
    message = serializers.CharField()
    sha256 = serializers.CharField()
    content_digest = serializers.CharField()
    path = serializers.CharField()
    pinned = serializers.BooleanField(help_text="This import pinned the model's weights.")
    provenance = serializers.DictField(help_text="kind (import), source (the file name sent), by, at, sha256.")
    file = WeightFileSerializer()


class ManagementRunSerializer(serializers.Serializer):
    """A background verify, convert or optimize: poll `url` until `active` is false; `result` then holds what
    the synchronous call (`?wait=1`) answers, or `error` why it failed."""

    id = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=["verify", "convert", "optimize"])
    model = serializers.CharField(allow_null=True, help_text="Null for cache-wide actions (optimize).")
    node = serializers.CharField()
    status = serializers.ChoiceField(choices=RunStatus.choices)
    active = serializers.BooleanField()
    params = serializers.DictField(help_text="The request's fields.")
    result = serializers.JSONField(allow_null=True, help_text="The action's answer once it succeeded.")
    error = serializers.CharField(allow_blank=True)
    error_status = serializers.IntegerField(allow_null=True, help_text="The HTTP status the error would have had.")
    requested_by = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    url = serializers.SerializerMethodField(help_text="Where to poll this run.")

    def to_representation(self, instance):
        from models_registry.selectors import management_run_data

        return super().to_representation(instance if isinstance(instance, dict) else management_run_data(instance))

    def get_url(self, data) -> str:
        from django.urls import reverse

        path = reverse("models-api:run-detail", kwargs={"pk": data["id"]})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class WaitQuerySerializer(serializers.Serializer):
    wait = serializers.BooleanField(default=False, help_text="1: run now and answer with the result (200) instead "
                                                             "of queueing it (202).")
