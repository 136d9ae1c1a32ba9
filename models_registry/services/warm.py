"""Which worker processes hold which models loaded: written by the estimator pool, read by status pages."""
from __future__ import annotations

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
