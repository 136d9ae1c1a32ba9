"""Downloading a model's weights into this node's cache: at most once per node (single flight under the model's
lock), recorded in a WeightDownload row, checked against the pin before it gets its final name.

The bytes themselves come from `models_registry.fetch` (Django-free: HTTP with resume and retries, file://
copies); this module chooses the source and the limits, words the failures for people, and accepts the file.
The chain that picks the file a model is loaded from is `services/resolve.py`."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

import depthsite
from depthsite.units import format_size
from models_registry import cachefs, fetch
from models_registry.catalogue import key_layout
from depthsite.choices import RunStatus
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import (
    ApplicationError,
    ConflictError,
    DiskFullError,
    DownloadError,
    DigestMismatchError,
    NotFoundError,
    OfflineError,
    InvalidRequestError,
    WeightFileError,
)
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.selectors import download_active, weight_files_usable
from models_registry.services.catalogue import model_pin
from models_registry.services.licences import model_license_check
from models_registry.services.export import weight_convert
from models_registry.services.inspection import weights_functional_check, weights_inspect
from models_registry.services.records import (
    best_first,
    cache_file_path,
    weight_mark_corrupt,
    weight_pin_problem,
    weight_record,
)
from models_registry.services.verify import weight_quick_problem

logger = logging.getLogger(__name__)

# Module constants rather than settings: operators never need them, tests shrink them. The transfer's own
# (timeouts, retries, chunk size) are models_registry.fetch's.
DISK_MARGIN_BYTES = 128 * 1024 * 1024
# A body may exceed the catalogue's estimate of the file (fp32 tensors) by this much before it is cut off:
# a server that sends no Content-Length (or an endless body) must not be able to fill the disk.
SIZE_MARGIN_RATIO = 0.25
SIZE_MARGIN_BYTES = 64 * 1024 * 1024
PROGRESS_INTERVAL_SECONDS = 0.5
LOCK_WAIT_SECONDS = 3 * 3600
QUEUED_STALE_SECONDS = 24 * 3600

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


def download_url(*, model: RegisteredModel) -> str:
    """Where the model's file comes from: DEPTHSITE_MODEL_MIRROR + "/" + file name, else the catalogue URL."""
    mirror = (settings.DEPTHSITE_MODEL_MIRROR or "").strip()
    if mirror:
        # One plain name, quoted whole: "../x" or "a/b" cannot walk out of the mirror's folder.
        file_name = cachefs.safe_name(model.file_name or Path(urlsplit(model.source_url).path).name,
                                      what=f"the file name of {model.name}")
        scheme = urlsplit(mirror).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise InvalidRequestError(
                f"DEPTHSITE_MODEL_MIRROR={mirror!r} is not an http(s):// base URL or a file:// folder",
                extra={"setting": "DEPTHSITE_MODEL_MIRROR"},
            )
        return f"{mirror.rstrip('/')}/{quote(file_name, safe='')}"
    if not model.source_url:
        raise NotFoundError(f"{model.name} has no download URL; set DEPTHSITE_MODEL_MIRROR or import a local copy",
                            extra={"kind": "no_url", "model": model.name})
    if urlsplit(model.source_url).scheme.lower() not in ("http", "https"):
        # Only the operator's DEPTHSITE_MODEL_MIRROR may name a local folder; a catalogue entry's URL
        # (admin-editable) must not make the server copy its own files.
        raise InvalidRequestError(f"the download URL of {model.name} is not an http(s):// URL",
                              extra={"model": model.name, "field": "source_url"})
    return model.source_url


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


# --- the transfer: where, how much, and what a failure means for people -------------------------------


def _partial_path(model: RegisteredModel) -> Path:
    # A stable name per (model, file), so an interrupted transfer is found and resumed by the next one.
    file_name = cachefs.safe_name(model.file_name or f"{model.name}.pt", what=f"the file name of {model.name}")
    return cachefs.contained(cachefs.model_dir(model.name), f"{file_name}{cachefs.PARTIAL_SUFFIX}")


def _check_disk(model: RegisteredModel, folder: Path, remaining: int) -> None:
    free = cachefs.disk_free(folder)
    needed = max(remaining, 0) + DISK_MARGIN_BYTES
    if free < needed:
        raise DiskFullError(
            f"not enough free disk space to download {model.name}: {format_size(remaining)} to write plus a "
            f"{format_size(DISK_MARGIN_BYTES)} margin, but only {format_size(free)} free on the disk of {folder}; "
            "free some space (optimize the cache to a smaller size) or set DEPTHSITE_CACHE_DIR to a bigger disk",
            extra={"kind": "disk_full", "needed": needed, "free": free, "path": str(folder)},
        )


def _byte_cap(model: RegisteredModel) -> tuple[int, str]:
    """The most bytes a transfer of the model's file may bring, and where that number comes from."""
    if model.expected_size:
        return model.expected_size, "the pinned size"
    try:
        approx = key_layout(model.architecture).approx_bytes
    except KeyError:
        approx = 0
    if approx:
        return int(approx * (1 + SIZE_MARGIN_RATIO)) + SIZE_MARGIN_BYTES, "the catalogue's size plus a margin"
    return settings.DEPTHSITE_MAX_IMPORT_BYTES, "DEPTHSITE_MAX_IMPORT_BYTES"


def _pin_hint(sha256: str = "") -> str:
    # The facts for a re-pin travel in extra (kind pin_differs, model, sha256); the command line adds its commands.
    return "reset the pin (the next download pins again)" + (f" or pin sha256 {sha256}" if sha256 else "")


def _ways_out(model: RegisteredModel) -> str:
    # The same three ways out in every door (CLI, API, dashboard); the command line adds its own commands for them.
    return (f"Ways out: set DEPTHSITE_MODEL_MIRROR to a mirror that has {model.file_name or 'the file'}, import a "
            "file you have, or work from the cache only (DEPTHSITE_OFFLINE)")


def _unreachable_error(model: RegisteredModel, url: str, *, code: str, what: str, attempts: int,
                       partial: int = 0, status: int | None = None) -> DownloadError:
    """One line: what failed, what was tried, and the ways out; `code` is stable for scripts and the API."""
    tried = f"tried {fetch.host_of(url)} ({fetch.shown_url(url)})"
    if attempts > 1:
        tried = f"giving up after {attempts} failed attempts; {tried}"
    kept = f"; {format_size(partial)} are kept and the next download resumes from there" if partial else ""
    extra: dict[str, Any] = {"kind": "unreachable", "model": model.name, "code": code,
                             "url": fetch.shown_url(url), "host": fetch.host_of(url),
                             "attempts": attempts, "resumable": bool(partial), "partial_bytes": partial,
                             "hint": _ways_out(model).removeprefix("Ways out: ")}
    if status is not None:
        extra["status"] = status
    return DownloadError(f"cannot download {model.name}: {what} ({tried}){kept}. {_ways_out(model)}",
                         extra=extra)


def _fetch_failure(model: RegisteredModel, url: str, failure: fetch.FetchError, cap_source: str) -> ApplicationError:
    """The fetcher's facts, worded for the person who asked for the model."""
    if failure.kind in ("unreachable", "http"):
        return _unreachable_error(model, url, code=failure.code, what=failure.what, attempts=failure.attempts,
                                  partial=failure.partial, status=failure.status)
    if failure.kind == "not_found":
        return DownloadError(f"{failure.what} ({url})", extra={"url": url, "status": 404})
    if failure.kind == "html":
        return DownloadError(
            f"{url} answered with an HTML page where weights were expected ({failure.what}): the server sent an "
            "error, login or landing page; check the URL or DEPTHSITE_MODEL_MIRROR. Nothing was cached.",
            extra={"url": url, "kind": "html"},
        )
    if failure.kind == "encoded":
        # Identity was asked for; a compressed body is never decoded (a small body must not become a big file).
        return DownloadError(
            f"{url} sent its body with Content-Encoding {failure.encoding} although identity was asked; refused, "
            "nothing was cached. Serve the file as it is (no compression) or check DEPTHSITE_MODEL_MIRROR",
            extra={"url": url, "kind": "encoded", "encoding": failure.encoding},
        )
    if failure.kind == "size_mismatch":
        return DigestMismatchError(
            f"{url} offers {failure.size} bytes but the pinned file of {model.name} has {failure.limit} "
            f"(pinned sha256 {model.expected_sha256}); nothing was cached. To accept a different file, "
            + _pin_hint(),
            extra={"kind": "pin_differs", "model": model.name, "url": url, "size": failure.size,
                   "expected_size": failure.limit},
        )
    if failure.kind == "too_large":
        what = f"declares {format_size(failure.size)}" if failure.declared else f"sent more than {format_size(failure.limit)}"
        return DownloadError(
            f"{url} {what}, beyond the {format_size(failure.limit)} a file of {model.name} may have ({cap_source}); "
            "the transfer was stopped and nothing was cached. Check the URL or DEPTHSITE_MODEL_MIRROR",
            extra={"url": url, "kind": "too_large", "limit": failure.limit},
        )
    return DownloadError(f"cannot download {model.name}: {failure.what}", extra={"url": url, "code": failure.code})


def _row_progress(download: WeightDownload | None, also: fetch.Progress | None) -> fetch.Progress:
    """A progress callback that saves bytes done/total on the row (at most every PROGRESS_INTERVAL) and passes
    them on to the caller's own callback (a terminal bar in the command)."""
    state = {"saved_at": 0.0, "first": True}

    def report(done: int, total: int | None) -> None:
        if download is not None:
            now = time.monotonic()
            if state["first"]:
                state["first"] = False
                download.resumed_from = done
                WeightDownload.objects.filter(pk=download.pk).update(resumed_from=done)
            if now - state["saved_at"] >= PROGRESS_INTERVAL_SECONDS or (total is not None and done >= total):
                state["saved_at"] = now
                download.bytes_done, download.bytes_total = done, total
                WeightDownload.objects.filter(pk=download.pk).update(bytes_done=done, bytes_total=total)
        if also is not None:
            also(done, total)

    return report


def _fetch(*, model: RegisteredModel, url: str, part: Path, on_progress: fetch.Progress) -> fetch.Fetched:
    cap, cap_source = _byte_cap(model)
    limits = fetch.Limits(max_bytes=cap, exact_size=model.expected_size or None,
                          ensure_room=lambda folder, needed: _check_disk(model, folder, needed))
    try:
        with cachefs.disk_full_as_error(part):
            return fetch.fetch(url, part, limits=limits, on_progress=on_progress,
                               user_agent=f"depthsite/{depthsite.__version__}")
    except fetch.FetchError as failure:
        raise _fetch_failure(model, url, failure, cap_source) from None


# --- acceptance ------------------------------------------------------------------------------------


def _accept(*, model: RegisteredModel, part: Path, fetched: fetch.Fetched, url: str,
            requested_by: str = "") -> tuple[WeightFile, bool]:
    """Check the complete partial file, then rename it to its final name and record it, together."""
    if model.expected_sha256 and fetched.sha256 != model.expected_sha256:
        raise DigestMismatchError(
            f"the bytes from {url} differ from the pinned sha256 of {model.name}: downloaded {fetched.sha256}, "
            f"pinned {model.expected_sha256} (pinned from {model.sha256_pinned_from or 'the catalogue'}); "
            f"nothing was cached. If the new file is legitimate, {_pin_hint(fetched.sha256)}",
            extra={"kind": "pin_differs", "model": model.name, "url": url, "sha256": fetched.sha256,
                   "pinned": model.expected_sha256},
        )
    if model.expected_size and fetched.size != model.expected_size:
        raise DigestMismatchError(f"{url} gave {fetched.size} bytes but the pinned file of {model.name} has "
                             f"{model.expected_size}; nothing was cached", extra={"url": url})
    try:
        inspection = weights_inspect(path=part, architecture=model.architecture)
        functional_hash = weights_functional_check(model, inspection.loaded, digest=inspection.digest)
    except WeightFileError as exc:
        raise WeightFileError(f"the file from {url} is not usable weights of {model.name}: {exc.message}; "
                              "nothing was cached", extra={**exc.extra, "url": url}) from None
    if inspection.sha256 != fetched.sha256:
        raise DigestMismatchError(f"{part.name} changed on disk while it was being checked; nothing was cached")
    if model.expected_content_digest and inspection.digest != model.expected_content_digest:
        raise DigestMismatchError(
            f"the weights from {url} differ from the pinned weights of {model.name} (content digest "
            f"{inspection.digest[:16]}..., pinned {model.expected_content_digest[:16]}...); nothing was cached. "
            f"To accept them, {_pin_hint()}",
            extra={"kind": "pin_differs", "model": model.name, "url": url, "content_digest": inspection.digest},
        )
    dest = cache_file_path(model=model, fmt=inspection.format)
    inspection.path = dest
    pin_now = not model.expected_sha256
    renamed = False
    try:
        with transaction.atomic():
            weight_file = weight_record(model=model, fmt=inspection.format, path=dest, inspection=inspection,
                                        functional_hash=functional_hash, origin="download",
                                        origin_source=fetch.shown_url(url), origin_by=requested_by)
            if pin_now:
                model_pin(model=model, sha256=fetched.sha256, size=fetched.size, content_digest=inspection.digest,
                          source=url)
            elif not model.expected_content_digest:
                model.expected_content_digest = inspection.digest
                model.save(update_fields=["expected_content_digest", "updated_at"])
            # Last inside the transaction: if the rename fails, the record is rolled back with it.
            os.replace(part, dest)
            renamed = True
            cachefs.fsync_dir(dest.parent)
    except BaseException:
        if renamed:
            cachefs.remove_file(dest)  # the record did not commit: no final file without its record
        raise
    fetch.sidecar_path(part).unlink(missing_ok=True)
    return weight_file, pin_now


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


# --- services --------------------------------------------------------------------------------------


def _transfer(*, model: RegisteredModel, url: str, download: WeightDownload | None,
              on_progress: fetch.Progress | None) -> tuple[fetch.Fetched, WeightFile, bool]:
    part = _partial_path(model)
    try:
        fetched = _fetch(model=model, url=url, part=part, on_progress=_row_progress(download, on_progress))
    except ApplicationError as exc:
        # Bad bytes are never kept; only a transfer that gave up on a flaky server keeps them to resume.
        if not exc.extra.get("resumable"):
            fetch.discard(part)
        raise
    try:
        weight_file, pinned = _accept(model=model, part=part, fetched=fetched, url=url,
                                      requested_by=download.requested_by if download is not None else "")
    except Exception:
        # Whatever way the complete bytes failed acceptance (a clear error, or a reader that tripped over a
        # malformed header), they are never resumed into: the next download starts from zero.
        fetch.discard(part)
        raise
    return fetched, weight_file, pinned


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
                download.start(source_url=url)
                download.save()
                fetched, weight_file, pinned = _transfer(model=model, url=url, download=download,
                                                         on_progress=on_progress)
                download.finish(weight_file)
                download.bytes_done = fetched.size
                download.save()
                result = DownloadResult(weight_file=weight_file, transferred=True, source_url=url,
                                        bytes_transferred=fetched.size - fetched.resumed_from,
                                        resumed_from=fetched.resumed_from, pinned=pinned, waited=waited,
                                        download=download)
                logger.info("downloaded %s from %s (%d bytes%s)", model.name, url, fetched.size,
                            f", resumed at {fetched.resumed_from}" if fetched.resumed_from else "")
    except BaseException as exc:
        if download is not None and download.status in RunStatus.ACTIVE:
            code = exc.extra.get("code", "") if isinstance(exc, ApplicationError) else ""
            download.fail(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}", code=code)
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
