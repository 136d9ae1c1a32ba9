"""Downloading a model's weights into this node's cache: at most once per node (single flight under the model's
lock), recorded in a WeightDownload row, queued or run now; offline rules and the cache's usable files.

Where the bytes come from, how they are fetched and how the complete file is accepted is `services/transfer.py`.
The chain that picks the file a model is loaded from is `services/resolve.py`."""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from models_registry import cachefs, fetch
from depthsite.choices import RunStatus
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import ApplicationError, ConflictError, OfflineError, InvalidRequestError
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.selectors import download_active, weight_files_usable
from models_registry.services.licences import model_license_check
from models_registry.services.export import weight_convert
from models_registry.services.records import best_first, weight_mark_corrupt, weight_pin_problem
from models_registry.services.transfer import _transfer, download_url
from models_registry.services.verify import weight_quick_problem

logger = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 3 * 3600
QUEUED_STALE_SECONDS = 24 * 3600
# The preview formats/sniff.py adds to an unknown file's error: "; first bytes: 3c 21 44 ..." (hex pairs).
FIRST_BYTES = re.compile(r";? *first bytes: [0-9a-f]{2}(?: [0-9a-f]{2})*")

Notify = Callable[[str], None]


@dataclass
class DownloadResult:
    """What `weight_download` did: the file to use, and whether bytes moved, from where, and what was pinned."""

    weight_file: WeightFile  # in the requested format (converted when asked), else the downloaded one
    transferred: bool
    source_url: str = ""
    bytes_transferred: int = 0
    resumed_from: int = 0
    pinned: bool = False  # this download pinned the model's sha256 (trust on first use)
    waited: bool = False  # another process held the model's lock first
    download: WeightDownload | None = None
    converted: bool = False

    @property
    def path(self) -> Path:
        return cachefs.absolute(self.weight_file.path)

    def as_dict(self) -> dict[str, Any]:
        weight_file = self.weight_file
        return {
            "model": weight_file.model.name,
            "format": weight_file.format,
            "path": str(self.path),
            "size": weight_file.size,
            "sha256": weight_file.sha256,
            "content_digest": weight_file.content_digest,
            "transferred": self.transferred,
            "source_url": self.source_url,
            "bytes_transferred": self.bytes_transferred,
            "resumed_from": self.resumed_from,
            "pinned": self.pinned,
            "pinned_sha256": weight_file.model.expected_sha256,
            "waited": self.waited,
            "converted": self.converted,
            "download": self.download.pk if self.download is not None else None,
        }


# --- settings ------------------------------------------------------------------------------------


def _is_offline(offline: bool | None) -> bool:
    # An explicit offline=False cannot override the setting: offline sites must never open a socket.
    return bool(settings.DEPTHSITE_OFFLINE) or bool(offline)


def wanted_format(fmt: str | None) -> str | None:
    if fmt:
        return WeightFormat.parse(fmt).value
    if settings.DEPTHSITE_CACHE_FORMAT:
        return WeightFormat.parse(settings.DEPTHSITE_CACHE_FORMAT).value
    return None


def _offline_error(model: RegisteredModel) -> OfflineError:
    why = "DEPTHSITE_OFFLINE is set" if settings.DEPTHSITE_OFFLINE else "offline mode was asked for"
    return OfflineError(
        f"{model.name} is not cached on this node and {why}, so nothing is downloaded. Copy "
        f"{model.file_name or 'its weight file'} from a machine that has it"
        f"{f' (released at {model.source_url})' if model.source_url else ''} and import it "
        "(or point DEPTHSITE_MODEL_MIRROR at a file:// folder that holds it)",
        extra={"kind": "offline", "model": model.name, "offline": True},
    )


# --- the cache as it is --------------------------------------------------------------------------


def healthy_files(model: RegisteredModel) -> list[WeightFile]:
    """Usable cached files of the model, best first; files found missing or damaged are marked so on the way."""
    healthy = []
    for weight_file in weight_files_usable(model=model):
        try:
            path = cachefs.absolute(weight_file.path)
        except InvalidRequestError:
            # A record whose path leads outside the cache is never read; a good download re-uses its row.
            weight_mark_corrupt(weight_file=weight_file, reason="its recorded path leads outside the cache")
            continue
        problem = weight_quick_problem(weight_file, path)
        if problem is not None:
            health, reason = problem
            if health == Health.CORRUPT:
                weight_mark_corrupt(weight_file=weight_file, reason=reason)
            else:
                weight_file.set_health(health, reason)
                weight_file.save(update_fields=["health", "health_reason", "verified_at"])
                logger.warning("%s marked %s: %s", weight_file, health, reason)
            continue
        if not weight_pin_problem(model=model, weight_file=weight_file):
            healthy.append(weight_file)
    return best_first(healthy)


# --- single flight ---------------------------------------------------------------------------------


def _single_flight(model: RegisteredModel, notify: Notify | None) -> contextlib.AbstractContextManager[bool]:
    """Hold the model's lock for the whole download; yields whether another process held it first."""
    def waiting() -> None:
        message = f"waiting for another download of {model.name} on this node"
        logger.info(message)
        if notify is not None:
            notify(message)

    return cachefs.locked(model.name, LOCK_WAIT_SECONDS, on_wait=waiting)


def _fail_interrupted(model: RegisteredModel, keep: WeightDownload | None) -> None:
    """Rows left running by a process that died; only called with the model's lock held, so none is alive."""
    stale = WeightDownload.objects.filter(model=model, node=cachefs.node_name(), status=RunStatus.RUNNING)
    if keep is not None:
        stale = stale.exclude(pk=keep.pk)
    count = stale.update(status=RunStatus.FAILED, finished_at=timezone.now(),
                         error="interrupted: the process running it stopped; the next download resumes its partial file")
    if count:
        logger.warning("marked %d interrupted download(s) of %s as failed", count, model.name)


def download_is_running_elsewhere(*, download: WeightDownload) -> bool:
    """Whether a live process is carrying out this row now (it is running and its model's lock is held).

    The broker hands a task out again after the job retry time, which a long download outlives: such a
    second delivery must leave the transfer to the process that runs it, not queue up behind its lock.
    """
    return download.status == RunStatus.RUNNING and not _is_stale(download)


def _is_stale(download: WeightDownload) -> bool:
    if download.status == RunStatus.RUNNING:
        return cachefs.lock_is_free(cachefs.lock_path(download.model.name))  # running rows hold the lock; a free lock means the holder died
    return (timezone.now() - download.created_at).total_seconds() > QUEUED_STALE_SECONDS


def _recorded_error(message: str) -> str:
    """The error as the download row keeps it, which every signed-in user can read: without the first bytes of
    the fetched file that the format sniffer quotes (they may be a server's private answer), and without the
    mirror's password should any message still carry it. The exception itself keeps the full wording for the
    operator who ran the download."""
    message = FIRST_BYTES.sub("", message)
    try:
        password = urlsplit(settings.DEPTHSITE_MODEL_MIRROR or "").password
    except ValueError:  # a malformed setting: download_url has said so, in its own words
        password = None
    return message.replace(f":{password}@", ":***@") if password else message


# --- services --------------------------------------------------------------------------------------


def weight_download(
    *,
    model: RegisteredModel,
    fmt: str | None = None,
    offline: bool | None = None,
    on_progress: fetch.Progress | None = None,
    download: WeightDownload | None = None,
    requested_by: str = "",
    notify: Notify | None = None,
) -> DownloadResult:
    """Make sure the model's weights are cached on this node, downloading them at most once per node.

    `fmt` (default DEPTHSITE_CACHE_FORMAT) also keeps a converted copy; `offline` (or DEPTHSITE_OFFLINE)
    forbids the network; `on_progress(done, total)` hears the bytes as they arrive (the command draws a bar
    with it; the row is updated either way); `download` is the row to report on (one is created when bytes
    must move); `notify` receives messages a user should see.
    """
    model_license_check(model=model)
    wanted = wanted_format(fmt)
    is_offline = _is_offline(offline)
    try:
        with _single_flight(model, notify) as waited:
            _fail_interrupted(model, keep=download)
            model.refresh_from_db()  # the first of several callers may just have pinned it
            cached = healthy_files(model)
            if cached:
                result = DownloadResult(weight_file=cached[0], transferred=False, waited=waited, download=download)
                if download is not None:
                    download.finish(cached[0])
                    download.save()
            else:
                url = download_url(model=model)
                if is_offline and not url.startswith("file:"):
                    raise _offline_error(model)
                if download is None:
                    download = WeightDownload.objects.create(model=model, node=cachefs.node_name(),
                                                             format=wanted or WeightFormat.PT,
                                                             requested_by=requested_by)
                shown = fetch.shown_url(url)  # the request alone uses the credentials a mirror URL may carry
                download.start(source_url=shown)
                download.save()
                fetched, weight_file, pinned = _transfer(model=model, url=url, download=download,
                                                         on_progress=on_progress)
                download.finish(weight_file)
                download.bytes_done = fetched.size
                download.save()
                result = DownloadResult(weight_file=weight_file, transferred=True, source_url=shown,
                                        bytes_transferred=fetched.size - fetched.resumed_from,
                                        resumed_from=fetched.resumed_from, pinned=pinned, waited=waited,
                                        download=download)
                logger.info("downloaded %s from %s (%d bytes%s)", model.name, shown, fetched.size,
                            f", resumed at {fetched.resumed_from}" if fetched.resumed_from else "")
    except BaseException as exc:
        if download is not None and download.status in RunStatus.ACTIVE:
            code = exc.extra.get("code", "") if isinstance(exc, ApplicationError) else ""
            download.fail(_recorded_error(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"),
                          code=code)
            download.save()
        raise
    if wanted and result.weight_file.format != wanted:
        # After the lock is released: weight_convert takes it itself, and a second flock on it would wait forever.
        result.weight_file = weight_convert(model=model, fmt=wanted)
        result.converted = True
    return result


def download_enqueue(*, model: RegisteredModel, fmt: str | None = None, requested_by: str = "") -> WeightDownload:
    """Record a download and queue it (the task gets the row's id); ConflictError when one is active on this node."""
    model_license_check(model=model)
    wanted = wanted_format(fmt) or WeightFormat.PT
    if _is_offline(None) and not healthy_files(model) and not download_url(model=model).startswith("file:"):
        raise _offline_error(model)
    with transaction.atomic():
        # Serialises enqueues of one model, so two requests cannot both find no active download.
        RegisteredModel.objects.select_for_update().filter(pk=model.pk).first()
        active = download_active(model=model)
        if active is not None:
            if not _is_stale(active):
                raise ConflictError(f"a download of {model.name} is already {active.status} on this node "
                                    f"(download {active.pk})", extra={"download": active.pk})
            active.fail("interrupted: its worker stopped before it finished")
            active.save()
        download = WeightDownload.objects.create(model=model, node=cachefs.node_name(), format=wanted,
                                                 requested_by=requested_by)
        transaction.on_commit(partial(_queue_download, download.pk))
    return download


def _queue_download(download_id: int) -> None:
    from django_q.tasks import async_task

    # Downloads get their own timeout: 1.4 GB on a 5 Mbit/s link takes ~40 min, far past a depth job's. A
    # worker stopped at the timeout keeps the partial file, and the next attempt resumes it.
    task_id = async_task("models_registry.tasks.download_run", download_id, task_name=f"download-{download_id}",
                         group="downloads", timeout=settings.DEPTHSITE_DOWNLOAD_TIMEOUT)
    WeightDownload.objects.filter(pk=download_id).update(task_id=task_id or "")
