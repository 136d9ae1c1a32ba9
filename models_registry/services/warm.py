"""Which worker processes hold which models loaded: written by the estimator pool, read by status pages."""
from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from models_registry import cachefs
from models_registry.models import RegisteredModel, WarmModel, WeightFile


def warm_model_record(*, model: RegisteredModel, weight_file: WeightFile | None, worker: str, device: str,
                      dtype: str, load_ms: float | None = None, bytes: int | None = None) -> WarmModel:
    now = timezone.now()
    warm, _ = WarmModel.objects.update_or_create(
        model=model, worker=worker, device=device, dtype=dtype,
        defaults={"weight_file": weight_file, "weights_sha256": weight_file.sha256 if weight_file else "",
                  "node": cachefs.node_name(), "load_ms": load_ms, "bytes": bytes, "loaded_at": now,
                  "last_used_at": now},
    )
    return warm


def warm_model_touch(*, model: RegisteredModel, worker: str) -> None:
    WarmModel.objects.filter(model=model, worker=worker).update(last_used_at=timezone.now())


def warm_model_forget(*, worker: str, model: RegisteredModel | None = None, device: str | None = None,
                      dtype: str | None = None) -> int:
    queryset = WarmModel.objects.filter(worker=worker)
    if model is not None:
        queryset = queryset.filter(model=model)
    if device is not None:
        queryset = queryset.filter(device=device)
    if dtype is not None:
        queryset = queryset.filter(dtype=dtype)
    deleted, _ = queryset.delete()
    return deleted


def warm_models_heartbeat(*, worker: str) -> int:
    """The worker's heartbeat: its rows stay current (and listed) for as long as it lives and holds them."""
    return WarmModel.objects.filter(worker=worker).update(last_used_at=timezone.now())


def warm_models_stale_remove(*, older_than: timedelta) -> int:
    """Remove the rows of workers whose heartbeat stopped longer ago than `older_than` (dead workers)."""
    deleted, _ = WarmModel.objects.filter(last_used_at__lt=timezone.now() - older_than).delete()
    return deleted
