"""Django admin for the registry: models with their files inline; actions call the same services as the CLI and API."""
from __future__ import annotations

from django.contrib import admin, messages
from django.db import models
from django.http import FileResponse
from django.utils.html import format_html

from depthsite.units import format_size
from models_registry.api.permissions import OPERATOR_PERMISSIONS, may_operate
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import ApplicationError
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.services.cache import cache_clear
from models_registry.services.export import weight_convert, weight_export_artifact
from models_registry.services.verify import verify_nothing_summary, weight_verify, weights_verify

HEALTH_COLOURS = {Health.OK: "#1a7f37", Health.UNVERIFIED: "#9a6700", Health.CORRUPT: "#cf222e",
                  Health.MISSING: "#cf222e"}


def _health_badge(weight_file: WeightFile) -> str:
    colour = HEALTH_COLOURS.get(weight_file.health, "#57606a")
    return format_html('<strong style="color:{}">{}</strong>', colour, weight_file.health)


def _report(modeladmin, request, done: list[str], failed: list[str]) -> None:
    if done:
        modeladmin.message_user(request, "; ".join(done), messages.SUCCESS)
    for failure in failed:
        modeladmin.message_user(request, failure, messages.ERROR)


class WeightFileInline(admin.TabularInline):
    model = WeightFile
    extra = 0
    can_delete = False
    fields = ("format", "node", "human_size", "health_badge", "health_reason", "license", "last_used_at", "verified_at",
              "path")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="size")
    def human_size(self, obj):
        return format_size(obj.size)

    @admin.display(description="health")
    def health_badge(self, obj):
        return _health_badge(obj)


# Every action declares what it needs (Django's `allowed_permissions`): the admin then offers it, and runs a posted
# one, only for an account allowed it, so view-only staff can read the registry without being able to delete,
# convert, verify or export its files.


class OperatorActionPermissions:
    """Every registry action asks the permission table (models_registry.api.permissions.OPERATOR_PERMISSIONS) by
    its key, `permissions=["verify"]` and so on, through `may_operate` as the API, the pages and the dashboard do:
    an admin action that asked a model permission of its own would let a staff user do here what the API refuses
    them (the weight file Verify action asked change_weightfile, the export permission, where verifying needs
    change_registeredmodel)."""


def _asks_the_table(key: str):
    def has_permission(self, request) -> bool:
        return may_operate(request.user, key)

    has_permission.__name__ = f"has_{key}_permission"
    return has_permission


for _key in OPERATOR_PERMISSIONS:
    setattr(OperatorActionPermissions, f"has_{_key}_permission", _asks_the_table(_key))


def _convert_action(fmt: str):
    def action(modeladmin, request, queryset):
        done, failed = [], []
        for model in queryset:
            try:
                weight_file = weight_convert(model=model, fmt=fmt)
                done.append(f"{model.name}: {fmt} cached ({format_size(weight_file.size)})")
            except ApplicationError as exc:
                failed.append(f"{model.name}: {exc.message}")
        _report(modeladmin, request, done, failed)

    action.__name__ = f"convert_to_{fmt}"
    return admin.action(description=f"Convert to {fmt}", permissions=["convert"])(action)


@admin.action(description="Verify cached files (this node)", permissions=["verify"])
def verify_models(modeladmin, request, queryset):
    done, failed = [], []
    for model in queryset:
        results = weights_verify(model=model)
        for result in results:
            (done if result.ok else failed).append(result.summary)
        if not results:
            failed.append(verify_nothing_summary(model=model))
    _report(modeladmin, request, done, failed)


@admin.action(description="Clear cached files (this node)", permissions=["cache_clear"])
def clear_models(modeladmin, request, queryset):
    _report(modeladmin, request, [cache_clear(model=model).summary for model in queryset], [])


def _download_response(result) -> FileResponse:
    response = FileResponse(result.open(), as_attachment=True, filename=result.download_name)
    response["Content-Length"] = str(result.size)
    response["ETag"] = f'"{result.sha256}"'
    return response


@admin.register(RegisteredModel)
class RegisteredModelAdmin(OperatorActionPermissions, admin.ModelAdmin):
    # Fits a laptop's viewport: the display name is on the change page, the pin shows as its hash.
    list_display = ("name", "architecture", "native_input", "license", "enabled", "cached_formats", "cached_size",
                    "pinned_hash")
    list_filter = ("architecture", "license", "enabled", "pinned", "is_official")
    search_fields = ("name", "display_name", "file_name")
    readonly_fields = ("native_input", "preprocessing_facts", "is_official", "created_at", "updated_at",
                       "sha256_pinned_at", "sha256_pinned_from")
    inlines = [WeightFileInline]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    actions = [verify_models, *(_convert_action(fmt) for fmt in WeightFormat.values), clear_models]

    # Facts of the architecture (depthsite.netspecs), shown read-only: editing them could not change the network.
    @admin.display(description="native input")
    def native_input(self, obj):
        try:
            return f"{obj.spec.input_size} px"
        except KeyError:
            return "-"

    @admin.display(description="preprocessing (from the architecture)")
    def preprocessing_facts(self, obj):
        try:
            facts = obj.spec.preprocessing
        except KeyError:
            return "- (choose an architecture and save)"
        return format_html("<code>{}</code>", ", ".join(f"{key}={value}" for key, value in facts.items()))

    @admin.display(description="cached")
    def cached_formats(self, obj):
        return ", ".join(f"{f.format} ({f.health})" for f in obj.weight_files.all()) or "-"

    @admin.display(description="size")
    def cached_size(self, obj):
        return format_size(sum(f.size for f in obj.weight_files.all()))

    @admin.display(description="pinned sha256")
    def pinned_hash(self, obj):
        return obj.expected_sha256[:16] + "..." if obj.expected_sha256 else "-"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("weight_files")


@admin.action(description="Verify", permissions=["verify"])
def verify_files(modeladmin, request, queryset):
    done, failed = [], []
    for weight_file in queryset.select_related("model"):
        try:
            result = weight_verify(weight_file=weight_file)
        except ApplicationError as exc:
            failed.append(exc.message)  # another node's row: its file is on that machine, the row stays as it is
            continue
        (done if result.ok else failed).append(result.summary)
    _report(modeladmin, request, done, failed)


@admin.action(description="Export (download the file)", permissions=["export"])
def export_file(modeladmin, request, queryset):
    if queryset.count() != 1:
        modeladmin.message_user(request, "select exactly one weight file to export", messages.ERROR)
        return None
    weight_file = queryset.select_related("model").get()
    try:
        # The export reads this node's copy: another node's row is refused, it would hand out a different file.
        result = weight_export_artifact(model=weight_file.model, fmt=weight_file.format, node=weight_file.node)
    except ApplicationError as exc:
        modeladmin.message_user(request, exc.message, messages.ERROR)
        return None
    return _download_response(result)


@admin.action(description="Delete file and record (clear)", permissions=["cache_clear"])
def clear_files(modeladmin, request, queryset):
    done, failed = [], []
    for weight_file in queryset.select_related("model"):
        try:
            result = cache_clear(model=weight_file.model, fmt=weight_file.format, node=weight_file.node)
        except ApplicationError as exc:
            failed.append(exc.message)  # another node's file: deleting here would remove this node's copy
            continue
        done.append(result.summary)
    _report(modeladmin, request, done, failed)


@admin.register(WeightFile)
class WeightFileAdmin(OperatorActionPermissions, admin.ModelAdmin):
    list_display = ("model", "format", "human_size", "health_badge", "health_reason", "last_used_at", "node",
                    "verified_at")
    list_filter = ("format", "health", "node", "model")
    search_fields = ("model__name", "sha256", "path")
    readonly_fields = [field.name for field in WeightFile._meta.fields]
    actions = [verify_files, export_file, clear_files]

    def has_add_permission(self, request):
        return False  # files enter the cache through import, download or convert, which check them

    @admin.display(description="size", ordering="size")
    def human_size(self, obj):
        return format_size(obj.size)

    @admin.display(description="health", ordering="health")
    def health_badge(self, obj):
        return _health_badge(obj)


@admin.register(WeightDownload)
class WeightDownloadAdmin(admin.ModelAdmin):
    list_display = ("model", "node", "status", "bytes_done", "bytes_total", "created_at", "finished_at", "error")
    list_filter = ("status", "node")
    readonly_fields = [field.name for field in WeightDownload._meta.fields]

    def has_add_permission(self, request):
        return False
