"""Django admin for depth jobs: status, model, owner, timings and error at a glance; re-run calls the same service."""
from __future__ import annotations

from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from depthsite.choices import RunStatus
from inference.models import DepthBatch, DepthJob
from inference.services.jobs import depth_job_rerun
from depthsite.exceptions import ApplicationError

STATUS_COLOURS = {RunStatus.QUEUED: "#9a6700", RunStatus.RUNNING: "#9a6700", RunStatus.SUCCEEDED: "#1a7f37",
                  RunStatus.FAILED: "#cf222e"}


# Re-running replaces a job's results: only for an account that may change jobs (Django's model permission).
@admin.action(description="Re-run selected jobs", permissions=["change"])
def rerun_jobs(modeladmin, request, queryset):
    done, failed = [], []
    for job in queryset:
        try:
            depth_job_rerun(job=job)
            done.append(job.short_id)
        except ApplicationError as exc:
            failed.append(f"{job.short_id}: {exc.message}")
    if done:
        modeladmin.message_user(request, f"queued again: {', '.join(done)}", messages.SUCCESS)
    for failure in failed:
        modeladmin.message_user(request, failure, messages.ERROR)


# session_key holds a digest of an anonymous uploader's session, which the views compare; the admin shows only
# whether there is one, and never offers it as a form field.
HIDDEN_FIELDS = ("session_key",)


def _shown_fields(model) -> list[str]:
    return [field.name for field in model._meta.fields if field.name not in HIDDEN_FIELDS]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


@admin.register(DepthJob)
class DepthJobAdmin(admin.ModelAdmin):
    list_display = ("short_id", "status_badge", "model_name", "owner_display", "created_at", "attempts", "load",
                    "inference", "error_short")
    list_filter = ("status", "model_name", "error_code", ("owner", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("id", "image_name", "image_sha256", "owner__username", "error")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    actions = [rerun_jobs]
    exclude = HIDDEN_FIELDS
    readonly_fields = _shown_fields(DepthJob) + ["page_link", "anonymous_session"]
    fieldsets = (
        (None, {"fields": ("id", "page_link", "status", "error", "error_code", "attempts", "owner",
                           "anonymous_session", "batch")}),
        ("Input", {"fields": ("image", "image_name", "image_format", "image_width", "image_height", "image_size",
                              "image_sha256", "model", "model_name", "outputs", "colormap", "fov_degrees")}),
        ("Run", {"fields": ("created_at", "queued_at", "started_at", "finished_at", "load_ms", "inference_ms",
                            "worker", "device", "dtype")}),
        ("Result", {"fields": ("result_files", "depth_min", "depth_max", "semantics", "weights_sha256",
                               "weights_format", "reused_from")}),
    )

    def has_add_permission(self, request):
        return False  # jobs come from uploads; the admin watches, re-runs and deletes them

    @admin.display(description="id", ordering="id")
    def short_id(self, obj):
        return obj.short_id

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return format_html('<strong style="color:{}">{}</strong>', STATUS_COLOURS.get(obj.status, "#57606a"),
                           obj.status)

    @admin.display(description="owner", ordering="owner__username")
    def owner_display(self, obj):
        return obj.owner.get_username() if obj.owner_id else "anonymous"

    @admin.display(description="weights load", ordering="load_ms")
    def load(self, obj):
        return _ms(obj.load_ms)

    @admin.display(description="inference", ordering="inference_ms")
    def inference(self, obj):
        return _ms(obj.inference_ms)

    @admin.display(description="error")
    def error_short(self, obj):
        return (obj.error[:80] + "…") if len(obj.error) > 80 else obj.error

    @admin.display(description="anonymous browser session", boolean=True)
    def anonymous_session(self, obj):
        return bool(obj.session_key)

    @admin.display(description="page")
    def page_link(self, obj):
        url = reverse("inference:job_detail", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, url)


@admin.register(DepthBatch)
class DepthBatchAdmin(admin.ModelAdmin):
    """Batches are made by uploads: the admin lists them with their size and links to their page."""

    list_display = ("short_id", "model_name", "owner_display", "created_at", "job_count", "archive_name")
    list_filter = ("model_name", ("owner", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("id", "owner__username", "archive_name")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    exclude = HIDDEN_FIELDS
    readonly_fields = _shown_fields(DepthBatch) + ["page_link", "anonymous_session"]

    def has_add_permission(self, request):
        return False

    def get_queryset(self, request):
        from django.db.models import Count

        return super().get_queryset(request).annotate(job_total=Count("jobs"))

    @admin.display(description="id", ordering="id")
    def short_id(self, obj):
        return obj.short_id

    @admin.display(description="owner", ordering="owner__username")
    def owner_display(self, obj):
        return obj.owner.get_username() if obj.owner_id else "anonymous"

    @admin.display(description="jobs", ordering="job_total")
    def job_count(self, obj):
        return obj.job_total

    @admin.display(description="anonymous browser session", boolean=True)
    def anonymous_session(self, obj):
        return bool(obj.session_key)

    @admin.display(description="page")
    def page_link(self, obj):
        url = reverse("inference:batch_detail", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, url)
