"""Which worker processes hold which models loaded: written by the estimator pool, read by status pages."""
from __future__ import annotations

import logging
import multiprocessing.util
import os
import threading
from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

from models_registry import cachefs
from models_registry.models import RegisteredModel, WarmModel, WeightFile

logger = logging.getLogger(__name__)

# The worker names whose rows this process removes when it exits, by pid: a forked child inherits the
# dict, not the duty (and multiprocessing clears the parent's finalizers in a child).
_exit_duty: dict[int, set[str]] = {}
_exit_lock = threading.Lock()


def warm_model_record(*, model: RegisteredModel, weight_file: WeightFile | None, worker: str, device: str,
                      dtype: str, load_ms: float | None = None, bytes: int | None = None,
                      weights_sha256: str | None = None, loaded_at: datetime | None = None) -> WarmModel:
    """Say that `worker` holds `model` loaded on `device` in `dtype`: one row per those four, the last record wins.

    `weights_sha256` names the weights where `weight_file` cannot (its row was deleted while the network stayed
    loaded); `loaded_at` is when the network loaded, where that was not just now."""
    now = timezone.now()
    if weights_sha256 is None:
        weights_sha256 = weight_file.sha256 if weight_file else ""
    warm, _ = WarmModel.objects.update_or_create(
        model=model, worker=worker, device=device, dtype=dtype,
        defaults={"weight_file": weight_file, "weights_sha256": weights_sha256, "node": cachefs.node_name(),
                  "load_ms": load_ms, "bytes": bytes, "loaded_at": loaded_at or now, "last_used_at": now},
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


def warm_models_heartbeat(*, worker: str, held: set[tuple[str, str, str]]) -> int:
    """The worker's heartbeat: its rows stay current (and listed) for as long as it lives and holds them; the
    number renewed. `held` is the (model name, device, dtype) of the networks it holds: its other rows go (an
    eviction whose delete failed left one behind)."""
    rows = WarmModel.objects.filter(worker=worker)
    gone = [pk for pk, name, device, dtype in rows.values_list("pk", "model__name", "device", "dtype")
            if (name, device, dtype) not in held]
    if gone:
        WarmModel.objects.filter(pk__in=gone).delete()
    return rows.update(last_used_at=timezone.now())


def warm_models_stale_remove(*, older_than: timedelta) -> int:
    """Remove the rows of workers whose heartbeat stopped longer ago than `older_than` (dead workers)."""
    deleted, _ = WarmModel.objects.filter(last_used_at__lt=timezone.now() - older_than).delete()
    return deleted


def warm_models_forget_at_exit(*, worker: str) -> bool:
    """Remove `worker`'s rows when this process exits cleanly; False when that was arranged already.

    A multiprocessing finalizer, not `atexit`: a qcluster worker is a multiprocessing child that ends with
    `os._exit` (atexit handlers never run there), after running the finalizers of a normal return from its
    loop (`qcluster` stopped by SIGTERM or Ctrl-C, a recycled worker, a task timeout). In a plain process
    (`manage.py predict`) the same finalizers run at interpreter exit.
    """
    pid = os.getpid()
    with _exit_lock:
        workers = _exit_duty.setdefault(pid, set())
        if worker in workers:
            return False
        first = not workers
        workers.add(worker)
    if first:
        multiprocessing.util.Finalize(None, warm_models_exit_forget, exitpriority=10)
    return True


def warm_models_exit_forget() -> int:
    """Delete the rows of the workers this process promised to forget at exit; returns how many went.

    Never raises: the process is leaving, and rows it could not delete are removed as stale later anyway."""
    with _exit_lock:
        workers = sorted(_exit_duty.get(os.getpid()) or ())
    if not workers:
        return 0
    try:
        deleted, _ = WarmModel.objects.filter(worker__in=workers).delete()
    except Exception as exc:  # a database that went away first, a locked SQLite file
        logger.warning("could not remove the warm-model rows of %s at exit (%s); they are removed once stale",
                       ", ".join(workers), exc)
        return 0
    finally:
        connection.close()
    logger.info("removed %d warm-model row(s) of %s at exit", deleted, ", ".join(workers))
    return deleted
