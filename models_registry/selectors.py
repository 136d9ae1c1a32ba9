"""Reads of the registry: finding models by any accepted name, and the cache statistics."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery
from django.utils import timezone

from depthsite.units import format_size
from models_registry import cachefs
from models_registry.choices import DownloadStatus, Health, WeightFormat
from models_registry.exceptions import NotFoundError
from models_registry.models import RegisteredModel, WarmModel, WeightDownload, WeightFile

# A worker killed without saying goodbye leaves its warm rows; they stop counting once this old.
WARM_STALE_AFTER = timedelta(hours=6)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def model_get(*, name: str, enabled_only: bool = False) -> RegisteredModel:
    """A model by its name or an alias, case-insensitively; NotFoundError lists the accepted names."""
    wanted = _normalise(name or "")
    models = list(RegisteredModel.objects.all())
    for model in models:
        accepted = {_normalise(model.name), *(_normalise(alias) for alias in model.aliases or [])}
        if wanted in accepted:
            if enabled_only and not model.enabled:
                raise NotFoundError(f"model {model.name} is disabled", extra={"model": model.name})
            return model
    names = ", ".join(model.name for model in models)
    raise NotFoundError(f"unknown model {name!r}; known models: {names}", extra={"field": "model"})


def model_list(*, enabled_only: bool = False) -> QuerySet[RegisteredModel]:
    queryset = RegisteredModel.objects.all()
    return queryset.filter(enabled=True) if enabled_only else queryset


def weight_files(*, model: RegisteredModel | None = None, node: str | None = None) -> QuerySet[WeightFile]:
    queryset = WeightFile.objects.select_related("model").filter(node=node or cachefs.node_name())
    return queryset.filter(model=model) if model is not None else queryset


def weight_file_get(*, model: RegisteredModel, fmt: str, node: str | None = None) -> WeightFile | None:
    return weight_files(model=model, node=node).filter(format=fmt).first()


def weight_files_usable(*, model: RegisteredModel, node: str | None = None) -> list[WeightFile]:
    return list(weight_files(model=model, node=node).filter(health__in=Health.USABLE))


def download_active(*, model: RegisteredModel, node: str | None = None) -> WeightDownload | None:
    return (
        WeightDownload.objects.filter(model=model, node=node or cachefs.node_name(), status__in=DownloadStatus.ACTIVE)
        .order_by("-created_at")
        .first()
    )


def warm_models(*, model: RegisteredModel | None = None) -> QuerySet[WarmModel]:
    """Networks loaded in worker processes now (stale rows of dead workers excluded)."""
    queryset = WarmModel.objects.select_related("model").filter(last_used_at__gte=timezone.now() - WARM_STALE_AFTER)
    return queryset.filter(model=model) if model is not None else queryset


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def weight_file_data(weight_file: WeightFile) -> dict[str, Any]:
    return {
        "id": weight_file.pk,
        "model": weight_file.model.name,
        "format": weight_file.format,
        "path": weight_file.path,
        "size": weight_file.size,
        "size_human": format_size(weight_file.size),
        "sha256": weight_file.sha256,
        "content_digest": weight_file.content_digest,
        "dtype": weight_file.dtype,
        "health": weight_file.health,
        "health_reason": weight_file.health_reason,
        "functional_hash": weight_file.functional_hash,
        "verified_at": _iso(weight_file.verified_at),
        "last_used_at": _iso(weight_file.last_used_at),
        "created_at": _iso(weight_file.created_at),
        "node": weight_file.node,
        "provenance": weight_file.provenance,
    }


def cache_info(*, node: str | None = None) -> dict[str, Any]:
    """Everything `models info` shows: totals, format distribution and per-model files on this node."""
    node = node or cachefs.node_name()
    files = list(weight_files(node=node))
    by_model: dict[int, list[WeightFile]] = {}
    for weight_file in files:
        by_model.setdefault(weight_file.model_id, []).append(weight_file)

    formats = {
        fmt: {"files": sum(1 for f in files if f.format == fmt), "bytes": sum(f.size for f in files if f.format == fmt)}
        for fmt in WeightFormat.values
    }
    problems = [f for f in files if f.health not in Health.USABLE]
    models = []
    for model in RegisteredModel.objects.all():
        model_files = by_model.get(model.pk, [])
        models.append({
            "name": model.name,
            "display_name": model.display_name,
            "architecture": model.architecture,
            "enabled": model.enabled,
            "pinned": model.pinned,
            "expected_sha256": model.expected_sha256,
            "bytes": sum(f.size for f in model_files),
            "files": [weight_file_data(f) for f in model_files],
        })
    total_bytes = sum(f.size for f in files)
    root = cachefs.cache_root()
    return {
        "cache_dir": str(root),
        "node": node,
        "totals": {"models": len(by_model), "files": len(files), "bytes": total_bytes},
        "health": "good" if not problems else f"{len(problems)} file(s) need attention",
        "problem_files": [f"{f.model.name} [{f.format}]: {f.health}" for f in problems],
        "formats": formats,
        "max_bytes": _max_bytes(),
        "disk_free": cachefs.disk_free(root),
        "models": models,
    }


def _max_bytes() -> int | None:
    from django.conf import settings

    return settings.DEPTHSITE_CACHE_MAX_BYTES


# --- the REST API and the dashboard ---------------------------------------------------------------

HEALTH_SEVERITY = (Health.CORRUPT, Health.MISSING, Health.UNVERIFIED, Health.OK)


def model_catalogue() -> QuerySet[RegisteredModel]:
    """The catalogue with every node's cached files and the live warm loads prefetched (`files_all`, `warm_now`)."""
    return RegisteredModel.objects.prefetch_related(
        Prefetch("weight_files", queryset=WeightFile.objects.order_by("node", "format"), to_attr="files_all"),
        Prefetch("warm_loads", queryset=warm_models().order_by("node", "worker"), to_attr="warm_now"),
    )


def download_get(*, pk: int) -> WeightDownload:
    download = WeightDownload.objects.select_related("model").filter(pk=pk).first()
    if download is None:
        raise NotFoundError(f"no download with id {pk}", extra={"download": pk})
    return download


def download_data(download: WeightDownload) -> dict[str, Any]:
    total = download.bytes_total
    return {
        "id": download.pk,
        "model": download.model.name,
        "node": download.node,
        "format": download.format,
        "status": download.status,
        "active": download.is_active,
        "bytes_done": download.bytes_done,
        "bytes_total": total,
        "progress": round(min(download.bytes_done / total, 1.0), 4) if total else None,
        "resumed_from": download.resumed_from,
        "source_url": download.source_url,
        "error": download.error,
        "error_code": download.error_code,
        "requested_by": download.requested_by,
        "created_at": _iso(download.created_at),
        "started_at": _iso(download.started_at),
        "finished_at": _iso(download.finished_at),
    }


def warm_model_data(warm: WarmModel) -> dict[str, Any]:
    return {
        "worker": warm.worker,
        "node": warm.node,
        "device": warm.device,
        "dtype": warm.dtype,
        "weights_sha256": warm.weights_sha256,
        "load_ms": warm.load_ms,
        "loaded_at": _iso(warm.loaded_at),
        "last_used_at": _iso(warm.last_used_at),
    }


def _worst_health(files: list[WeightFile]) -> str | None:
    present = {f.health for f in files}
    return next((health.value for health in HEALTH_SEVERITY if health in present), None)


def model_status(*, node: str | None = None) -> dict[str, Any]:
    """Per model, what this node has: files and their health, the latest download, and where the model is warm.

    Five queries whatever the size of the catalogue, and no torch: the dashboard polls it every few seconds.
    """
    node = node or cachefs.node_name()
    latest = WeightDownload.objects.filter(model=OuterRef("pk"), node=node).order_by("-created_at", "-pk")
    models = list(RegisteredModel.objects.annotate(latest_download_id=Subquery(latest.values("pk")[:1])))
    files = list(weight_files(node=node))
    downloads = WeightDownload.objects.select_related("model").in_bulk(
        [model.latest_download_id for model in models if model.latest_download_id])
    warm = list(warm_models().order_by("node", "worker"))
    entries = []
    for model in models:
        model_files = [f for f in files if f.model_id == model.pk]
        download = downloads.get(model.latest_download_id)
        entries.append({
            "name": model.name,
            "display_name": model.display_name,
            "enabled": model.enabled,
            "pinned": model.pinned,
            "expected_sha256": model.expected_sha256,
            "health": _worst_health(model_files),
            "bytes": sum(f.size for f in model_files),
            "formats": [weight_file_data(f) for f in model_files],
            "download": download_data(download) if download is not None else None,
            "warm": [warm_model_data(w) for w in warm if w.model_id == model.pk],
        })
    root = cachefs.cache_root()
    problems = [f for f in files if f.health not in Health.USABLE]
    return {
        "node": node,
        "generated_at": timezone.now().isoformat(),
        "health": "good" if not problems else f"{len(problems)} file(s) need attention",
        "totals": {
            "models": len({f.model_id for f in files}),
            "files": len(files),
            "bytes": sum(f.size for f in files),
            "max_bytes": _max_bytes(),
            "disk_free": cachefs.disk_free(root),
            "downloads_active": sum(1 for d in downloads.values() if d.is_active),
        },
        "models": entries,
    }
