"""Reads of the registry: finding models by any accepted name, and the cache statistics."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import QuerySet
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
