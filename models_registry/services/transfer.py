"""One download's bytes: where they come from, the partial file fetched within limits, failures worded for people,
and acceptance (pin, inspection, then the rename to the final name together with the file's record).

The bytes themselves come from `models_registry.fetch` (Django-free: HTTP with resume and retries, file://
copies); the service that decides whether to download at all, under the model's lock and with a
WeightDownload row, is `services/download.py`."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from django.conf import settings
from django.db import transaction

import depthsite
from depthsite.units import format_size
from models_registry import cachefs, fetch
from models_registry.catalogue import key_layout
from depthsite.exceptions import (
    ApplicationError,
    DiskFullError,
    DownloadError,
    DigestMismatchError,
    NotFoundError,
    InvalidRequestError,
    WeightFileError,
)
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.services.catalogue import model_pin
from models_registry.services.inspection import weights_functional_check, weights_inspect
from models_registry.services.records import cache_file_path, weight_record

# Module constants rather than settings: operators never need them, tests shrink them. The transfer's own
# (timeouts, retries, chunk size) are models_registry.fetch's.
DISK_MARGIN_BYTES = 128 * 1024 * 1024
# A body may exceed the catalogue's estimate of the file (fp32 tensors) by this much before it is cut off:
# a server that sends no Content-Length (or an endless body) must not be able to fill the disk.
SIZE_MARGIN_RATIO = 0.25
SIZE_MARGIN_BYTES = 64 * 1024 * 1024
PROGRESS_INTERVAL_SECONDS = 0.5


# --- the transfer: where, how much, and what a failure means for people -------------------------------


def download_url(*, model: RegisteredModel) -> str:
    """Where the model's file comes from: DEPTHSITE_MODEL_MIRROR + "/" + file name, else the catalogue URL.

    The URL the request needs, credentials included; whatever is shown or stored is `fetch.shown_url` of it."""
    mirror = (settings.DEPTHSITE_MODEL_MIRROR or "").strip()
    if mirror:
        # One plain name, quoted whole: "../x" or "a/b" cannot walk out of the mirror's folder.
        file_name = cachefs.safe_name(model.file_name or Path(urlsplit(model.source_url).path).name,
                                      what=f"the file name of {model.name}")
        scheme = urlsplit(mirror).scheme.lower()
        if scheme not in ("http", "https", "file"):
            # Quoted without user:password (the message reaches the download row); a value without "://" is not
            # quoted at all, since whatever follows its first colon may be a password.
            shown = repr(fetch.shown_url(mirror)) if "://" in mirror else "(no scheme://)"
            raise InvalidRequestError(
                f"DEPTHSITE_MODEL_MIRROR={shown} is not an http(s):// base URL or a file:// folder",
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


def _pinned_from(model: RegisteredModel) -> str:
    # A pin recorded before sources were stored in their shown form may still hold a mirror's user:password.
    source = model.sha256_pinned_from
    return fetch.shown_url(source) if "://" in source else source or "the catalogue"


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
    """The fetcher's facts, worded for the person who asked for the model.

    Every message and `extra` names the URL as `fetch.shown_url` shows it: a mirror's user:password must not
    reach a download row or an API answer, which every signed-in user can read."""
    if failure.kind in ("unreachable", "http", "redirect"):
        return _unreachable_error(model, url, code=failure.code, what=failure.what, attempts=failure.attempts,
                                  partial=failure.partial, status=failure.status)
    url = fetch.shown_url(url)
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
    """Check the complete partial file, then rename it to its final name and record it, together.

    `url` is only named and recorded, so it is the shown form throughout (the pin's source included)."""
    url = fetch.shown_url(url)
    if model.expected_sha256 and fetched.sha256 != model.expected_sha256:
        raise DigestMismatchError(
            f"the bytes from {url} differ from the pinned sha256 of {model.name}: downloaded {fetched.sha256}, "
            f"pinned {model.expected_sha256} (pinned from {_pinned_from(model)}); "
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
                                        origin_source=url, origin_by=requested_by)
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
