"""django-q2 tasks of the registry: each receives a row's id only, loads the row and calls one service."""
from __future__ import annotations

import logging

from depthsite.choices import RunStatus
from depthsite.exceptions import ApplicationError
from models_registry.models import WeightDownload

logger = logging.getLogger(__name__)


def download_run(download_id: int) -> str:
    """Carry out a queued WeightDownload; the row records progress and outcome, the return value is for the queue."""
    from models_registry.services.download import weight_download

    download = WeightDownload.objects.select_related("model").filter(pk=download_id).first()
    if download is None:
        logger.warning("download %s no longer exists; nothing to do", download_id)
        return "missing"
    if download.status in RunStatus.TERMINAL:
        # A re-delivery of a task that already ran (its worker died after finishing): never transfer twice.
        return download.status
    from models_registry.services.download import download_is_running_elsewhere

    if download_is_running_elsewhere(download=download):
        # Re-delivered while the first delivery still transfers (downloads outlive the broker's retry time).
        return "running elsewhere"
    from models_registry.services.records import node_check

    try:
        # A download fills the cache of the node it was asked of: a worker of another node refuses it with
        # where to run it, instead of caching the file here under that node's row.
        node_check(node=download.node, action="download", model=download.model.name)
    except ApplicationError as exc:
        download.fail(exc.message, code="other_node")
        download.save()
        logger.warning("download %s of %s refused on this node: %s", download.pk, download.model.name, exc.message)
        return download.status
    try:
        weight_download(model=download.model, fmt=download.format, download=download)
    except ApplicationError as exc:
        # The row holds the error for the API and web pages; the queue need not retry a domain failure.
        logger.warning("download %s of %s failed: %s", download.pk, download.model.name, exc.message)
    return download.status


def management_run(run_id: int) -> str:
    """Carry out a queued ManagementRun (verify, convert, optimize); the row records the outcome."""
    from models_registry.models import ManagementRun
    from models_registry.services.runs import management_run_execute

    run = ManagementRun.objects.select_related("model").filter(pk=run_id).first()
    if run is None:
        logger.warning("management run %s no longer exists; nothing to do", run_id)
        return "missing"
    return management_run_execute(run=run).status
