"""Long management actions (verify, convert, optimize) as background runs: a ManagementRun row, a django-q2
task that carries it out, and the outcome on the row for the API and the dashboard to poll.

`management_action` is the one place that runs an action and shapes its answer; a synchronous request
(`?wait=1`) and the background task both call it, so both answer the same body.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from models_registry import cachefs
from models_registry.services.records import node_check
from depthsite.choices import RunStatus
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import ApplicationError, InvalidRequestError
from models_registry.models import ManagementRun, RegisteredModel

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "the action failed unexpectedly; the worker's log has the details"
QUEUED_STALE_AFTER = timedelta(hours=24)  # no worker took it: no cluster runs (`manage.py qcluster`)


def management_action(*, kind: str, model: RegisteredModel | None, params: dict[str, Any]) -> dict[str, Any]:
    """Run one action now and return its JSON answer; ApplicationError as the synchronous call would raise."""
    if kind == ManagementRun.Kind.VERIFY:
        from models_registry.services.verify import verify_nothing_summary, weights_verify

        results = weights_verify(model=model, fmt=params.get("format"), functional=params.get("functional", True))
        return {
            "model": model.name,
            "ok": bool(results) and all(r.ok for r in results),
            "message": "; ".join(r.summary for r in results) or verify_nothing_summary(model=model),
            "results": [r.as_dict() for r in results],
        }
    if kind == ManagementRun.Kind.CONVERT:
        from models_registry.selectors import weight_file_data
        from models_registry.services.export import weight_convert

        return weight_file_data(weight_convert(model=model, fmt=params["format"]))
    if kind == ManagementRun.Kind.OPTIMIZE:
        from models_registry.services.cache import cache_optimize_execute, cache_optimize_plan

        plan = cache_optimize_plan(max_bytes=params.get("max_bytes"))
        if not params.get("dry_run", True) and plan.items:
            plan = cache_optimize_execute(plan=plan)
        return plan.as_dict()
    raise InvalidRequestError(f"unknown action {kind!r}", extra={"kind": kind})


def management_precheck(*, kind: str, model: RegisteredModel | None, params: dict[str, Any]) -> None:
    """The cheap checks a background run would only fail later, made before it is queued (so a request with
    nothing to act on still gets its 404 at once)."""
    if kind == ManagementRun.Kind.CONVERT:
        from models_registry.selectors import weight_file_get
        from models_registry.services.records import _best_source

        fmt = WeightFormat.parse(params["format"]).value
        existing = weight_file_get(model=model, fmt=fmt)
        if existing is None or existing.health != Health.OK:
            _best_source(model, exclude=[fmt])


def management_run_enqueue(*, kind: str, model: RegisteredModel | None = None, params: dict[str, Any] | None = None,
                           requested_by: str = "") -> ManagementRun:
    """Record a run and queue its task once the transaction commits (the task gets the row's id)."""
    params = dict(params or {})
    management_precheck(kind=kind, model=model, params=params)
    with transaction.atomic():
        run = ManagementRun.objects.create(kind=kind, model=model, node=cachefs.node_name(), params=params,
                                           requested_by=requested_by)
        transaction.on_commit(partial(_queue_run, run.pk))
    return run


def _queue_run(run_id: int) -> None:
    from django_q.tasks import async_task

    task_id = async_task("models_registry.tasks.management_run", run_id, task_name=f"management-{run_id}",
                         group="management")
    ManagementRun.objects.filter(pk=run_id).update(task_id=task_id or "")


def management_run_execute(*, run: ManagementRun) -> ManagementRun:
    """Carry out a queued run once: claim it (queued -> running), run the action, record result or error."""
    claimed = ManagementRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=timezone.now())
    if not claimed:  # a re-delivered task: the first delivery has it
        run.refresh_from_db()
        return run
    fields: dict[str, Any]
    try:
        # The run acts on the cache of the node it was asked of: a worker of another node refuses it with
        # where to run it, instead of acting on its own cache under that node's name.
        node_check(node=run.node, action=run.kind, model=run.model.name if run.model_id else "")
        result = management_action(kind=run.kind, model=run.model, params=run.params)
    except ApplicationError as exc:
        fields = {"status": RunStatus.FAILED, "error": exc.message, "error_status": exc.status}
    except Exception:  # noqa: BLE001 - the row must never stay "running"; the text stays in the log
        logger.exception("management run %s (%s) failed", run.pk, run.kind)
        fields = {"status": RunStatus.FAILED, "error": INTERNAL_ERROR, "error_status": 500}
    else:
        fields = {"status": RunStatus.SUCCEEDED, "result": result}
    ManagementRun.objects.filter(pk=run.pk).update(finished_at=timezone.now(), **fields)
    run.refresh_from_db()
    return run


def management_run_refresh(*, run: ManagementRun) -> ManagementRun:
    """A run no worker can still finish is marked failed, so pollers stop: running past the queue's timeout
    (django-q2 stops a task then), or queued for a day (no cluster took it)."""
    now = timezone.now()
    timeout = timedelta(seconds=int(settings.Q_CLUSTER.get("timeout") or 0) + 30)
    if run.status == RunStatus.RUNNING and run.started_at and now - run.started_at > timeout:
        error = "interrupted: its worker stopped before it finished (the queue's timeout); start it again"
    elif run.status == RunStatus.QUEUED and now - run.created_at > QUEUED_STALE_AFTER:
        error = "no worker took it within a day; is `manage.py qcluster` running? start it again"
    else:
        return run
    ManagementRun.objects.filter(pk=run.pk, status=run.status).update(
        status=RunStatus.FAILED, error=error, error_status=503, finished_at=now)
    run.refresh_from_db()
    return run
