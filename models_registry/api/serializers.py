"""Shapes of the registry API's resources: models, their files, downloads and warm workers, the node's status
and cache info, and the error every endpoint answers with (documented for OpenAPI)."""
from __future__ import annotations

from rest_framework import serializers

from models_registry.api import public
from depthsite.choices import RunStatus
from models_registry.choices import Health, WeightFormat
from models_registry.models import RegisteredModel


# --- errors --------------------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    """Every error of every endpoint, rendered by depthsite.api.exception_handler."""

    message = serializers.CharField(help_text="What went wrong and, where possible, what to do about it.")
    extra = serializers.DictField(help_text="Machine-readable details (field, model, kind, ...).")


# --- catalogue and files -------------------------------------------------------------------------


class WeightFileSerializer(serializers.Serializer):
    """One cached weight file, as `selectors.weight_file_data` describes it."""

    id = serializers.IntegerField()
    model = serializers.CharField()
    format = serializers.ChoiceField(choices=WeightFormat.choices)
    path = serializers.CharField(help_text="Relative to the node's cache directory.")
    size = serializers.IntegerField()
    size_human = serializers.CharField()
    sha256 = serializers.CharField()
    content_digest = serializers.CharField(help_text="Hash of the tensors, the same in every format.")
    dtype = serializers.CharField()
    health = serializers.ChoiceField(choices=Health.choices)
    health_reason = serializers.CharField(allow_blank=True)
    functional_hash = serializers.CharField(allow_blank=True)
    verified_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField(allow_null=True)
    node = serializers.CharField()
    license = serializers.CharField(allow_blank=True, help_text="Licence of the weights, recorded when cached.")
    provenance = serializers.DictField(
        required=False, help_text="Where the bytes came from: kind (download, import, convert, unknown), source "
                                  "(URL, original file name, or the copy converted from), by, at, sha256.")

    def to_representation(self, instance):
        from models_registry.selectors import weight_file_data

        # Model instances go through the one function that the CLI's --json uses; dicts are already in that shape.
        data = instance if isinstance(instance, dict) else weight_file_data(instance)
        if self.context.get("public"):
            data = public.weight_file_public(data)
        return super().to_representation(data)


class WarmLoadSerializer(serializers.Serializer):
    worker = serializers.CharField(help_text="node:pid:start of the process holding the network.")
    node = serializers.CharField()
    device = serializers.CharField()
    dtype = serializers.CharField()
    weights_sha256 = serializers.CharField(allow_blank=True)
    load_ms = serializers.FloatField(allow_null=True)
    bytes = serializers.IntegerField(allow_null=True, help_text="Bytes of the network's tensors in that process.")
    loaded_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField()
    alive = serializers.BooleanField(help_text="False once the worker has not been heard from for a few minutes "
                                               "(shown as gone; no longer listed a little later).")

    def to_representation(self, instance):
        from models_registry.selectors import warm_model_data

        data = instance if isinstance(instance, dict) else warm_model_data(instance)
        return super().to_representation(public.warm_load_public(data) if self.context.get("public") else data)


class DownloadSerializer(serializers.Serializer):
    """A download job: poll `url` until `active` is false."""

    id = serializers.IntegerField()
    model = serializers.CharField()
    node = serializers.CharField()
    format = serializers.ChoiceField(choices=WeightFormat.choices)
    status = serializers.ChoiceField(choices=RunStatus.choices)
    active = serializers.BooleanField()
    bytes_done = serializers.IntegerField()
    bytes_total = serializers.IntegerField(allow_null=True)
    progress = serializers.FloatField(allow_null=True, help_text="bytes_done / bytes_total, 0 to 1.")
    resumed_from = serializers.IntegerField()
    source_url = serializers.CharField(allow_blank=True)
    error = serializers.CharField(allow_blank=True)
    error_code = serializers.CharField(allow_blank=True, required=False,
                                       help_text="Stable code of a failure: download_dns, download_unreachable, "
                                                 "download_tls, download_timeout, download_http_404, "
                                                 "download_http_5xx, ...")
    requested_by = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    url = serializers.SerializerMethodField(help_text="Where to poll this download.")

    def to_representation(self, instance):
        from models_registry.selectors import download_data

        data = instance if isinstance(instance, dict) else download_data(instance)
        return super().to_representation(public.download_public(data) if self.context.get("public") else data)

    def get_url(self, data) -> str:
        from django.urls import reverse

        path = reverse("models-api:download-detail", kwargs={"pk": data["id"]})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class ModelFactsSerializer(serializers.Serializer):
    """What a user needs to choose a model, as `selectors.model_facts` describes it."""

    family = serializers.CharField(allow_blank=True)
    family_label = serializers.CharField()
    input_size = serializers.IntegerField(allow_null=True, help_text="Native input side in pixels.")
    keep_aspect_ratio = serializers.BooleanField(allow_null=True,
                                                 help_text="False: the photo is stretched to the native square.")
    preprocessing = serializers.DictField(help_text="The architecture's preprocessing (read-only facts).")
    approx_bytes = serializers.IntegerField(help_text="About the size of the weights (file and float32 memory).")
    cpu_seconds = serializers.FloatField(allow_null=True, help_text="Median CPU forward time per image at the "
                                                                    "native input (bench/forward.py).")
    license_note = serializers.CharField()
    license_accepted = serializers.BooleanField(help_text="False when DEPTHSITE_ACCEPTED_LICENSES refuses it here.")

    def to_representation(self, instance):
        from models_registry.selectors import model_facts

        if isinstance(instance, dict):
            return super().to_representation(instance)
        facts = model_facts(instance)
        try:
            facts["preprocessing"] = instance.spec.preprocessing
        except KeyError:
            facts["preprocessing"] = {}
        return super().to_representation(facts)


class RegisteredModelSerializer(serializers.ModelSerializer):
    """A catalogue entry with the files cached on every node and the workers holding it warm."""

    pinned_sha256 = serializers.CharField(source="expected_sha256", help_text="sha256 the released file must have; "
                                          "empty until the first good download pins it.")
    pinned_size = serializers.IntegerField(source="expected_size", allow_null=True)
    files = WeightFileSerializer(source="files_all", many=True,
                                 help_text="Cached files on every node; actions act on the node answering.")
    warm = WarmLoadSerializer(source="warm_now", many=True, help_text="Worker processes holding the network now.")
    is_warm = serializers.SerializerMethodField()
    input_size = serializers.IntegerField(read_only=True, allow_null=True,
                                          help_text="Native input side in pixels (a fact of the architecture).")
    facts = ModelFactsSerializer(source="*", help_text="To choose a model: family, native input, preprocessing, "
                                                       "size, CPU time per image, whether its licence is accepted.")

    class Meta:
        model = RegisteredModel
        fields = ["name", "display_name", "architecture", "aliases", "description", "source_url", "file_name",
                  "license", "semantics", "enabled", "pinned", "pinned_sha256", "pinned_size",
                  "expected_content_digest", "sha256_pinned_at", "sha256_pinned_from", "files", "is_warm", "warm",
                  "input_size", "facts"]
        read_only_fields = fields

    def get_is_warm(self, model) -> bool:
        return bool(model.warm_now)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if self.context.get("public"):
            data["sha256_pinned_from"] = ""  # an operator's name or a mirror path
        return data


# --- status and cache info -----------------------------------------------------------------------


class ModelStatusSerializer(serializers.Serializer):
    name = serializers.CharField()
    display_name = serializers.CharField()
    enabled = serializers.BooleanField()
    pinned = serializers.BooleanField(help_text="Never evicted by optimize.")
    expected_sha256 = serializers.CharField(allow_blank=True, help_text="The pinned sha256 of the released file.")
    license = serializers.CharField(allow_blank=True)
    license_accepted = serializers.BooleanField(help_text="False when DEPTHSITE_ACCEPTED_LICENSES refuses it here.")
    health = serializers.ChoiceField(choices=Health.choices, allow_null=True,
                                     help_text="The worst health of the model's files here; null when none is cached.")
    bytes = serializers.IntegerField()
    formats = WeightFileSerializer(many=True, help_text="The files cached on this node.")
    download = DownloadSerializer(allow_null=True, help_text="The latest download on this node, running or not.")
    warm = WarmLoadSerializer(many=True)


class NodeQuerySerializer(serializers.Serializer):
    node = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=255, required=False, allow_blank=True,
                                  help_text="A node name (DEPTHSITE_NODE); empty: this node.")


class StatusTotalsSerializer(serializers.Serializer):
    models = serializers.IntegerField()
    files = serializers.IntegerField()
    bytes = serializers.IntegerField()
    max_bytes = serializers.IntegerField(allow_null=True)
    disk_free = serializers.IntegerField(allow_null=True, help_text="Null for another node's records.")
    downloads_active = serializers.IntegerField()


class StatusSerializer(serializers.Serializer):
    node = serializers.CharField(allow_blank=True,
                                 help_text="The node whose cache this is (and which the actions change); "
                                           "empty for anonymous readers.")
    generated_at = serializers.DateTimeField()
    health = serializers.CharField()
    totals = StatusTotalsSerializer()
    models = ModelStatusSerializer(many=True)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if self.context.get("public"):
            data["node"] = ""
        return data


class FormatStatsSerializer(serializers.Serializer):
    files = serializers.IntegerField()
    bytes = serializers.IntegerField()


class CacheInfoModelSerializer(serializers.Serializer):
    name = serializers.CharField()
    display_name = serializers.CharField()
    architecture = serializers.CharField()
    enabled = serializers.BooleanField()
    pinned = serializers.BooleanField()
    expected_sha256 = serializers.CharField(allow_blank=True)
    license = serializers.CharField(allow_blank=True)
    bytes = serializers.IntegerField()
    files = WeightFileSerializer(many=True)


class CacheInfoSerializer(serializers.Serializer):
    """Documentation only: the endpoint returns `selectors.cache_info()` untouched, as `models info --json` does."""

    cache_dir = serializers.CharField()
    node = serializers.CharField()
    totals = serializers.DictField(child=serializers.IntegerField())
    health = serializers.CharField()
    problem_files = serializers.ListField(child=serializers.CharField())
    formats = serializers.DictField(child=FormatStatsSerializer())
    max_bytes = serializers.IntegerField(allow_null=True)
    disk_free = serializers.IntegerField()
    models = CacheInfoModelSerializer(many=True)
    warm = serializers.ListField(child=serializers.DictField(),
                                 help_text="Per worker process: the networks it holds warm and their bytes.")

