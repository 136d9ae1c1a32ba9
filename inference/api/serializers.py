"""Shapes of the predictions API: the multipart request that creates a job, and a job as clients see it."""
from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from depthsite.choices import RunStatus
from inference.choices import JobErrorCode
from inference.colormaps import COLORMAPS, DEFAULT_COLORMAP
from inference.images import ALPHA_NOTE
from inference.models import DepthJob
from inference.selectors import depth_job_public
from inference.sessions import upload_session_key
from inference.writers import DEFAULT_FOV_DEGREES, FOV_RANGE, OUTPUT_FORMATS
from models_registry.api.fields import StrictSerializer, UploadField
from models_registry.catalogue import DEFAULT_MODEL


class PredictionCreateSerializer(StrictSerializer):
    image = serializers.FileField(
        allow_empty_file=True,  # the service says precisely why a file is not a photo, empty included
        help_text="The photo: JPEG, PNG, WebP, GIF (first frame), BMP or TIFF (no other format), up to "
                  f"DEPTHSITE_MAX_UPLOAD_BYTES and DEPTHSITE_MAX_IMAGE_PIXELS. {ALPHA_NOTE}",
    )
    model = serializers.CharField(default=DEFAULT_MODEL, max_length=64, allow_blank=True,
                                  help_text="A model name or alias (case-insensitive), e.g. MiDaS_small, "
                                            "DPT_Large; empty means MiDaS_small.")
    outputs = serializers.ListField(
        child=serializers.CharField(max_length=64), default=["png"], max_length=len(OUTPUT_FORMATS) + 1,
        help_text=f"Output formats: {', '.join(OUTPUT_FORMATS)} or all; repeat the field or give a comma list.",
    )
    colormap = serializers.ChoiceField(choices=COLORMAPS, default=DEFAULT_COLORMAP,
                                       help_text="Colour map of the png and side outputs.")
    fov = serializers.FloatField(default=DEFAULT_FOV_DEGREES, min_value=FOV_RANGE[0], max_value=FOV_RANGE[1],
                                 help_text="Horizontal field of view in degrees of the pinhole camera the ply output "
                                           "(a relative point cloud, not metres) assumes.")


class PredictionImageSerializer(serializers.Serializer):
    name = serializers.CharField()
    size = serializers.IntegerField(help_text="Bytes.")
    sha256 = serializers.CharField()
    format = serializers.CharField()
    width = serializers.IntegerField(allow_null=True, help_text="Upright width in pixels.")
    height = serializers.IntegerField(allow_null=True)


# A DepthJob as clients see it: its public facts (inference.selectors.depth_job_public, which the pages read too),
# and the API's own: its URLs and the model's licence. (A docstring here would become the schema's description.)
class PredictionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.SerializerMethodField(help_text="This prediction in the API.")
    page_url = serializers.SerializerMethodField(help_text="Its web page, with live status.")
    status = serializers.ChoiceField(choices=RunStatus.choices)
    attempts = serializers.IntegerField()
    error = serializers.CharField(help_text="Why it failed, and what to do; empty otherwise.")
    error_code = serializers.ChoiceField(choices=[("", "none"), *JobErrorCode.choices])
    model = serializers.CharField()
    model_license = serializers.SerializerMethodField(help_text="Licence of the model's weights (e.g. MIT, "
                                                                "CC-BY-NC-4.0); empty if the model was removed.")
    outputs = serializers.ListField(child=serializers.ChoiceField(choices=OUTPUT_FORMATS))
    colormap = serializers.CharField()
    fov = serializers.FloatField(help_text="Field of view of the ply output, degrees.")
    image = PredictionImageSerializer()
    created_at = serializers.DateTimeField()
    queued_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    load_ms = serializers.FloatField(allow_null=True, help_text="Getting the network (near 0 when it was warm).")
    inference_ms = serializers.FloatField(allow_null=True)
    depth_min = serializers.FloatField(allow_null=True)
    depth_max = serializers.FloatField(allow_null=True)
    semantics = serializers.CharField(help_text="What the values mean (relative inverse depth: larger is nearer).")
    weights_sha256 = serializers.CharField(help_text="sha256 of the weight file used.")
    weights_format = serializers.CharField()
    device = serializers.CharField()
    dtype = serializers.CharField(help_text="float32, or the 16-bit float DEPTHSITE_FP16 ran it in (less precise); "
                                            "empty for predictions from before it was recorded.")
    reused_from = serializers.SerializerMethodField(
        help_text="An earlier prediction of yours whose result was reused (same image, weights and options); "
                  "null otherwise, and null when the earlier one is not yours.")
    files = serializers.SerializerMethodField(help_text="Download URL of each output.")
    preview = serializers.SerializerMethodField(help_text="The output best shown as an image, if any.")

    def _request(self):
        return self.context.get("request")

    def to_representation(self, job: DepthJob) -> dict[str, Any]:
        # The fields read the selector's facts; the job rides along for what only the API shows.
        request = self._request()
        user = request.user if request is not None else AnonymousUser()
        session_key = upload_session_key(request) if request is not None else ""  # the stored digest, as views use
        facts = depth_job_public(job=job, user=user, session_key=session_key)
        return super().to_representation({**facts, "job": job})

    @extend_schema_field(OpenApiTypes.URI)
    def get_url(self, row: dict[str, Any]) -> str:
        return reverse("predictions-api:prediction-detail", args=[row["id"]], request=self._request())

    def get_model_license(self, row: dict[str, Any]) -> str:
        model = row["job"].model
        return model.license if model is not None else ""

    @extend_schema_field(OpenApiTypes.URI)
    def get_page_url(self, row: dict[str, Any]) -> str:
        return reverse("inference:job_detail", args=[row["id"]], request=self._request())

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string", "format": "uri"},
                          "example": {"png": "http://127.0.0.1:8000/api/predictions/<id>/files/png/"}})
    def get_files(self, row: dict[str, Any]) -> dict[str, str]:
        return {fmt: reverse("predictions-api:prediction-file", args=[row["id"], fmt], request=self._request())
                for fmt in (row["job"].result_files or {})}

    @extend_schema_field({"type": "string", "format": "uuid", "nullable": True})
    def get_reused_from(self, row: dict[str, Any]) -> str | None:
        return row["reused_from"]

    @extend_schema_field({"type": "string", "nullable": True, "description": "one of the outputs, or null"})
    def get_preview(self, row: dict[str, Any]) -> str | None:
        return row["preview"]


class PredictionErrorSerializer(serializers.Serializer):
    """Every error of the API: a message a person can read, and machine-readable details."""

    message = serializers.CharField()
    extra = serializers.DictField()


# --- batches -------------------------------------------------------------------------------------


class BatchCreateSerializer(StrictSerializer):
    images = serializers.ListField(
        child=UploadField(allow_empty_file=True), required=False, default=list,
        help_text="Photos, one `images` part each (repeat the field); each is checked as a single upload is. "
                  "At most DEPTHSITE_BATCH_MAX_FILES photos and DEPTHSITE_BATCH_MAX_BYTES in all.")
    archive = UploadField(
        required=False, allow_null=True, default=None, allow_empty_file=True,
        help_text="Or (and) one .zip of photos. Folders, hidden files, macOS metadata, nested archives and files "
                  "not named as photos are skipped and listed in `skipped`; an encrypted zip, or one with symbolic "
                  "links, absolute or `..` names, a name listed twice, or a zip-bomb ratio, is refused (400).")
    model = serializers.CharField(default=DEFAULT_MODEL, max_length=64, allow_blank=True,
                                  help_text="A model name or alias, as for a single prediction.")
    outputs = serializers.ListField(
        child=serializers.CharField(max_length=64), default=["png"], max_length=len(OUTPUT_FORMATS) + 1,
        help_text=f"Output formats of every job: {', '.join(OUTPUT_FORMATS)} or all.")
    colormap = serializers.ChoiceField(choices=COLORMAPS, default=DEFAULT_COLORMAP)
    fov = serializers.FloatField(default=DEFAULT_FOV_DEGREES, min_value=FOV_RANGE[0], max_value=FOV_RANGE[1])


class BatchJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.URLField(help_text="The prediction in the API.")
    name = serializers.CharField(help_text="The photo's file name (in the archive: its base name).")
    status = serializers.ChoiceField(choices=RunStatus.choices)
    error = serializers.CharField()
    error_code = serializers.CharField()
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    format = serializers.CharField()
    outputs = serializers.ListField(child=serializers.CharField(), help_text="Outputs written (once finished).")


class BatchSkippedSerializer(serializers.Serializer):
    name = serializers.CharField()
    reason = serializers.CharField()


class BatchSerializer(serializers.Serializer):
    """A batch as `inference.selectors.depth_batch_summary` describes it, with its URLs."""

    id = serializers.UUIDField()
    url = serializers.URLField(help_text="This batch's status in the API (poll it).")
    page_url = serializers.URLField(help_text="Its web page, with live progress.")
    archive_url = serializers.URLField(help_text="The zip of every output: 409 while jobs run, unless ?partial=1.")
    model = serializers.CharField()
    outputs = serializers.ListField(child=serializers.CharField())
    colormap = serializers.CharField()
    fov = serializers.FloatField()
    archive_name = serializers.CharField(help_text="The zip sent, if any.")
    skipped = BatchSkippedSerializer(many=True, help_text="Members of the zip not made into jobs, with why.")
    created_at = serializers.DateTimeField()
    total = serializers.IntegerField()
    done = serializers.IntegerField(help_text="Jobs succeeded or failed.")
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="Jobs per status.")
    progress = serializers.FloatField(help_text="done / total, 0 to 1.")
    complete = serializers.BooleanField()
    jobs = BatchJobSerializer(many=True)
