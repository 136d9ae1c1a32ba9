"""Reads of the registry: finding models by any accepted name, and the cache statistics."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery
from django.utils import timezone

from depthsite.units import format_size, iso_time
from models_registry import cachefs
from depthsite.choices import RunStatus
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import NotFoundError
from models_registry.models import ManagementRun, RegisteredModel, WarmModel, WeightDownload, WeightFile

# A live worker refreshes its warm rows' last_used_at (on use and by its heartbeat). Rows older than
# WARM_GONE_AFTER are shown as gone (the worker stopped answering); older than WARM_STALE_AFTER they are not
# listed at all (a worker killed without saying goodbye).
WARM_GONE_AFTER = timedelta(minutes=3)
WARM_STALE_AFTER = timedelta(minutes=15)


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
    """Usable copies of the weights themselves (a runtime artifact is not a source of weights)."""
    return list(weight_files(model=model, node=node).filter(health__in=Health.USABLE, format__in=WeightFormat.values))


def download_active(*, model: RegisteredModel, node: str | None = None) -> WeightDownload | None:
    return (
        WeightDownload.objects.filter(model=model, node=node or cachefs.node_name(), status__in=RunStatus.ACTIVE)
        .order_by("-created_at")
        .first()
    )


def warm_models(*, model: RegisteredModel | None = None) -> QuerySet[WarmModel]:
    """Networks loaded in worker processes now (stale rows of dead workers excluded)."""
    queryset = WarmModel.objects.select_related("model").filter(last_used_at__gte=timezone.now() - WARM_STALE_AFTER)
    return queryset.filter(model=model) if model is not None else queryset


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
        "verified_at": iso_time(weight_file.verified_at),
        "last_used_at": iso_time(weight_file.last_used_at),
        "created_at": iso_time(weight_file.created_at),
        "node": weight_file.node,
        "license": weight_file.license,
        "provenance": weight_file.provenance,
    }


def _model_cache_data(model: RegisteredModel, files: list[WeightFile]) -> dict[str, Any]:
    """What `models info` and the status API both say of a model and its files on a node."""
    return {
        "name": model.name,
        "display_name": model.display_name,
        "enabled": model.enabled,
        "pinned": model.pinned,
        "expected_sha256": model.expected_sha256,
        "license": model.license,
        "bytes": sum(f.size for f in files),
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
        models.append({**_model_cache_data(model, model_files), "architecture": model.architecture,
                       "files": [weight_file_data(f) for f in model_files]})
    total_bytes = sum(f.size for f in files)
    root = cachefs.cache_root()
    return {
        "cache_dir": str(root),
        "node": node,
        "totals": {"models": len(by_model), "files": len(files), "bytes": total_bytes},
        "health": "good" if not problems else f"{len(problems)} file(s) need attention",
        "problem_files": [f.label() for f in problems],
        "formats": formats,
        "max_bytes": _max_bytes(),
        "disk_free": cachefs.disk_free(root),
        "models": models,
        "warm": warm_worker_data(node=node),
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
        "created_at": iso_time(download.created_at),
        "started_at": iso_time(download.started_at),
        "finished_at": iso_time(download.finished_at),
    }


def warm_model_data(warm: WarmModel) -> dict[str, Any]:
    alive = warm.last_used_at is not None and warm.last_used_at >= timezone.now() - WARM_GONE_AFTER
    return {
        "worker": warm.worker,
        "node": warm.node,
        "device": warm.device,
        "dtype": warm.dtype,
        "weights_sha256": warm.weights_sha256,
        "load_ms": warm.load_ms,
        "bytes": warm.bytes,
        "loaded_at": iso_time(warm.loaded_at),
        "last_used_at": iso_time(warm.last_used_at),
        "alive": alive,
    }


def _worst_health(files: list[WeightFile]) -> str | None:
    present = {f.health for f in files}
    return next((health.value for health in HEALTH_SEVERITY if health in present), None)


def download_is_superseded(*, download: WeightDownload, files: list[WeightFile]) -> bool:
    """A failed download is history, not the model's state, once a usable file of the model was written or
    verified after it: the dashboard then shows the healthy cache, not the old failure."""
    if download.status != RunStatus.FAILED:
        return False
    ended = download.finished_at or download.created_at
    return any(f.health in Health.USABLE and max(t for t in (f.created_at, f.verified_at) if t) > ended
               for f in files if f.created_at or f.verified_at)


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
        if download is not None and download_is_superseded(download=download, files=model_files):
            download = None
        entries.append({
            **_model_cache_data(model, model_files),
            "license_accepted": model_facts(model)["license_accepted"],
            "health": _worst_health(model_files),
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
            # Another node's disk is on its own machine: unknown here.
            "disk_free": cachefs.disk_free(root) if node == cachefs.node_name() else None,
            "downloads_active": sum(1 for d in downloads.values() if d.is_active),
        },
        "models": entries,
    }


# --- choosing a model: the facts every surface shows ----------------------------------------------


def model_facts(model: RegisteredModel) -> dict[str, Any]:
    """What a user needs to choose a model: family, native input, size, CPU time per image, licence.

    Network facts come from the architecture's NetSpec, size and CPU time from the catalogue (torch-free).
    """
    from models_registry.catalogue import approx_bytes, cpu_seconds, family_order, license_note
    from models_registry.services.licences import license_accepted

    try:
        spec = model.spec
    except KeyError:  # an architecture this version does not know: still listed, never run
        spec = None
    size = approx_bytes(model.architecture)
    return {
        "family": spec.family if spec else "",
        "family_label": spec.family_label if spec else "unknown architecture",
        "family_order": family_order(spec.family if spec else ""),
        "input_size": spec.input_size if spec else None,
        "keep_aspect_ratio": spec.keep_aspect_ratio if spec else None,
        "approx_bytes": size,
        "approx_size": format_size(size) if size else "",
        "cpu_seconds": cpu_seconds(model.architecture),
        "license": model.license,
        "license_note": license_note(model.license),
        "license_accepted": license_accepted(model.license),
    }


def models_by_family(models) -> list[tuple[str, list[tuple[RegisteredModel, dict[str, Any]]]]]:
    """(family label, [(model, facts)]) in the families' order; within a family, fastest first."""
    groups: dict[str, list] = {}
    rows = sorted(((model, model_facts(model)) for model in models),
                  key=lambda row: (row[1]["family_order"], row[1]["family_label"],
                                   row[1]["cpu_seconds"] if row[1]["cpu_seconds"] is not None else float("inf"),
                                   row[1]["approx_bytes"], row[0].name))
    for model, facts in rows:
        groups.setdefault(facts["family_label"], []).append((model, facts))
    return list(groups.items())


def warm_worker_data(*, node: str | None = None) -> list[dict[str, Any]]:
    """Per worker process: the networks it holds warm and their bytes (what `models info` and the dashboard show)."""
    workers: dict[str, dict[str, Any]] = {}
    queryset = warm_models().order_by("node", "worker", "model__name")
    if node is not None:
        queryset = queryset.filter(node=node)
    for warm in queryset:
        entry = workers.setdefault(warm.worker, {"worker": warm.worker, "node": warm.node, "bytes": 0, "models": []})
        entry["models"].append({"model": warm.model.name, "device": warm.device, "dtype": warm.dtype,
                                "bytes": warm.bytes, "loaded_at": iso_time(warm.loaded_at),
                                "last_used_at": iso_time(warm.last_used_at)})
        entry["bytes"] += warm.bytes or 0
    return list(workers.values())


def management_run_get(*, pk: int) -> ManagementRun:
    run = ManagementRun.objects.select_related("model").filter(pk=pk).first()
    if run is None:
        raise NotFoundError(f"no management run with id {pk}", extra={"run": pk})
    return run


def management_run_data(run: ManagementRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "kind": run.kind,
        "model": run.model.name if run.model_id else None,
        "node": run.node,
        "status": run.status,
        "active": run.is_active,
        "params": run.params or {},
        "result": run.result,
        "error": run.error,
        "error_status": run.error_status,
        "requested_by": run.requested_by,
        "created_at": iso_time(run.created_at),
        "started_at": iso_time(run.started_at),
        "finished_at": iso_time(run.finished_at),
    }
