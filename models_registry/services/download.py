"""Acquiring weights: streamed, resumable, single-flight downloads that never leave a bad file in the cache,
and the resolution chain that finds (or fetches) the file a model is loaded from."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import quote, unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from filelock import Timeout
from tqdm import tqdm

import depthsite
from depthsite.units import format_size
from models_registry import cachefs
from models_registry.catalogue import key_layout
from models_registry.choices import DownloadStatus, Health, WeightFormat
from models_registry.exceptions import (
    ApplicationError,
    ConflictError,
    DiskFullError,
    DownloadError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    ValidationError,
    WeightFileError,
)
from models_registry.formats import LoadedWeights, read_weights, sniff_format
from models_registry.formats.sniff import HTML_STARTS
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.selectors import download_active, weight_files_usable
from models_registry.services.catalogue import model_pin
from models_registry.services.licences import model_license_check
from models_registry.services.weights import (
    SOURCE_PREFERENCE,
    weights_functional_check,
    cache_file_path,
    weight_convert,
    weight_mark_corrupt,
    weight_pin_problem,
    weight_record,
    weights_inspect,
)

logger = logging.getLogger(__name__)

# Module constants rather than settings: operators never need them, tests shrink them.
RETRY_ATTEMPTS = 4  # failed attempts in a row (without progress) before giving up
RETRY_BACKOFF_SECONDS = 1.0  # doubled after each failed attempt
CONNECT_TIMEOUT_SECONDS = 15
READ_TIMEOUT_SECONDS = 60  # a stalled server fails the attempt instead of holding the model's lock forever
CHUNK_BYTES = 1024 * 1024
DISK_MARGIN_BYTES = 128 * 1024 * 1024
# A body may exceed the catalogue's estimate of the file (fp32 tensors) by this much before it is cut off:
# a server that sends no Content-Length (or an endless body) must not be able to fill the disk.
SIZE_MARGIN_RATIO = 0.25
SIZE_MARGIN_BYTES = 64 * 1024 * 1024
PROGRESS_INTERVAL_SECONDS = 0.5
LOCK_WAIT_SECONDS = 3 * 3600
QUEUED_STALE_SECONDS = 24 * 3600
RESOLVE_ROUNDS = 4  # one per format, plus a fresh download
SIDECAR_SUFFIX = ".json"

Notify = Callable[[str], None]


class _TransientError(Exception):
    """A failure worth another attempt: connection errors, timeouts, 5xx, a body cut short.

    `code` and `what` describe it for the one-line error given when the attempts run out."""

    def __init__(self, message: str, *, code: str = "download_interrupted", what: str = "",
                 status: int | None = None):
        super().__init__(message)
        self.code = code
        self.what = what or message
        self.status = status


@dataclass
class _Fetched:
    sha256: str
    size: int
    resumed_from: int


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


def _wanted_format(fmt: str | None) -> str | None:
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
            raise ValidationError(
                f"DEPTHSITE_MODEL_MIRROR={mirror!r} is not an http(s):// base URL or a file:// folder",
                extra={"setting": "DEPTHSITE_MODEL_MIRROR"},
            )
        return f"{mirror.rstrip('/')}/{quote(file_name, safe='')}"
    if not model.source_url:
        raise NotFoundError(
            f"{model.name} has no download URL; set DEPTHSITE_MODEL_MIRROR or import a local copy "
            f"(python manage.py models import PATH --model {model.name})",
            extra={"model": model.name},
        )
    if urlsplit(model.source_url).scheme.lower() not in ("http", "https"):
        # Only the operator's DEPTHSITE_MODEL_MIRROR may name a local folder; a catalogue entry's URL
        # (admin-editable) must not make the server copy its own files.
        raise ValidationError(f"the download URL of {model.name} is not an http(s):// URL",
                              extra={"model": model.name, "field": "source_url"})
    return model.source_url


def _offline_error(model: RegisteredModel) -> OfflineError:
    why = "DEPTHSITE_OFFLINE is set" if settings.DEPTHSITE_OFFLINE else "--offline was given"
    return OfflineError(
        f"{model.name} is not cached on this node and {why}, so nothing is downloaded. Copy "
        f"{model.file_name or 'its weight file'} from a machine that has it"
        f"{f' (released at {model.source_url})' if model.source_url else ''} and import it: "
        f"python manage.py models import PATH --model {model.name} "
        "(or point DEPTHSITE_MODEL_MIRROR at a file:// folder that holds it)",
        extra={"model": model.name, "offline": True},
    )


# --- the cache as it is --------------------------------------------------------------------------


def _quick_problem(weight_file: WeightFile, path: Path) -> tuple[str, str] | None:
    """(health, reason) when a recorded file is visibly unusable; cheap: stat and a sniff, no hashing."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Health.MISSING, f"file not found at {path}"
    if size != weight_file.size:
        return Health.CORRUPT, (f"{path.name} has {size} bytes but {weight_file.size} were recorded: "
                                "the file was truncated or replaced")
    try:
        sniffed = sniff_format(path)
    except WeightFileError as exc:
        return Health.CORRUPT, exc.message
    if sniffed != weight_file.format:
        return Health.CORRUPT, f"{path.name} holds {sniffed} content but is recorded as {weight_file.format}"
    return None


def _healthy_files(model: RegisteredModel) -> list[WeightFile]:
    """Usable cached files of the model, best first; files found missing or damaged are marked so on the way."""
    healthy = []
    for weight_file in weight_files_usable(model=model):
        try:
            path = cachefs.absolute(weight_file.path)
        except ValidationError:
            # A record whose path leads outside the cache is never read; a good download re-uses its row.
            weight_mark_corrupt(weight_file=weight_file, reason="its recorded path leads outside the cache")
            continue
        problem = _quick_problem(weight_file, path)
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
    healthy.sort(key=lambda f: (f.health != Health.OK, SOURCE_PREFERENCE.index(f.format)))
    return healthy


# --- files of a transfer ---------------------------------------------------------------------------


def _partial_path(model: RegisteredModel) -> Path:
    # A stable name per (model, file), so an interrupted transfer is found and resumed by the next one.
    file_name = cachefs.safe_name(model.file_name or f"{model.name}.pt", what=f"the file name of {model.name}")
    return cachefs.contained(cachefs.model_dir(model.name), f"{file_name}{cachefs.PARTIAL_SUFFIX}")


def _sidecar_path(part: Path) -> Path:
    return part.with_name(part.name + SIDECAR_SUFFIX)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _sidecar_path(part).unlink(missing_ok=True)


def _read_sidecar(part: Path) -> dict[str, Any]:
    try:
        data = json.loads(_sidecar_path(part).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_sidecar(part: Path, **values: Any) -> None:
    with cachefs.atomic_write(_sidecar_path(part)) as tmp:
        tmp.write_text(json.dumps({**values, "written": timezone.now().isoformat()}))


def _resume_point(part: Path, url: str) -> tuple[int, str]:
    """(offset, If-Range validator) for continuing a partial file; (0, "") and no partial when it cannot be."""
    size = _size(part)
    if not size:
        return 0, ""
    meta = _read_sidecar(part)
    etag = meta.get("etag") or ""
    # If-Range needs a strong validator: a weak ETag or none at all falls back to Last-Modified.
    validator = etag if etag and not etag.startswith("W/") else meta.get("last_modified") or ""
    total = meta.get("total")
    if meta.get("url") != url or not validator or (total is not None and size > total):
        logger.info("%s: cannot resume (different source or no validator); starting again", part.name)
        _discard(part)
        return 0, ""
    if total is not None and size == total:
        # Complete but never accepted (the process died while checking it): fetch the last byte again,
        # which proves with If-Range that the server's file is still the one these bytes came from.
        with open(part, "rb+") as handle:
            handle.truncate(total - 1)
        size = total - 1
    return size, validator


def _hash_prefix(part: Path, length: int) -> "hashlib._Hash":
    digest = hashlib.sha256()
    if length:
        with open(part, "rb") as handle:
            while chunk := handle.read(min(CHUNK_BYTES * 4, length - handle.tell())):
                digest.update(chunk)
    return digest


def _append(handle: BinaryIO, chunk: bytes) -> None:
    handle.write(chunk)


def _check_disk(model: RegisteredModel, folder: Path, remaining: int) -> None:
    free = cachefs.disk_free(folder)
    needed = max(remaining, 0) + DISK_MARGIN_BYTES
    if free < needed:
        raise DiskFullError(
            f"not enough free disk space to download {model.name}: {format_size(remaining)} to write plus a "
            f"{format_size(DISK_MARGIN_BYTES)} margin, but only {format_size(free)} free on the disk of {folder}; "
            "free some space (python manage.py models optimize --max-size SIZE) or set DEPTHSITE_CACHE_DIR "
            "to a bigger disk",
            extra={"needed": needed, "free": free, "path": str(folder)},
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


def _too_large(model: RegisteredModel, url: str, size: int, cap: int, source: str, *, declared: bool) -> DownloadError:
    what = f"declares {format_size(size)}" if declared else f"sent more than {format_size(cap)}"
    return DownloadError(
        f"{url} {what}, beyond the {format_size(cap)} a file of {model.name} may have ({source}); the transfer "
        "was stopped and nothing was cached. Check the URL or DEPTHSITE_MODEL_MIRROR",
        extra={"url": url, "kind": "too_large", "limit": cap},
    )


def _pin_hint(model: RegisteredModel, sha256: str = "") -> str:
    hint = f"python manage.py models pin --model {model.name} --reset (the next download pins again)"
    if sha256:
        hint += f", or python manage.py models pin --model {model.name} --sha256 {sha256}"
    return hint


# --- progress --------------------------------------------------------------------------------------


class _Progress:
    """The terminal bar (when wanted) and the row's bytes done/total, saved at most every PROGRESS_INTERVAL."""

    def __init__(self, *, label: str, total: int | None, initial: int, show: bool,
                 download: WeightDownload | None):
        self.total = total
        self.done = initial
        self.download = download
        self._saved_at = 0.0
        # The size from shutil (with its 80x24 fallback), not tqdm's ioctl: a pseudo-terminal that reports
        # 0x0 (script, some CI runners) would make tqdm hide the bar entirely.
        screen = shutil.get_terminal_size()
        self.bar = tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1000,
                        file=sys.stderr, disable=not show, ncols=screen.columns, nrows=screen.lines,
                        mininterval=0.2)
        if download is not None:
            download.resumed_from = initial
            WeightDownload.objects.filter(pk=download.pk).update(resumed_from=initial)
        self._save()

    def advance(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        if time.monotonic() - self._saved_at >= PROGRESS_INTERVAL_SECONDS:
            self._save()

    def _save(self) -> None:
        self._saved_at = time.monotonic()
        if self.download is not None:
            self.download.bytes_done, self.download.bytes_total = self.done, self.total
            WeightDownload.objects.filter(pk=self.download.pk).update(bytes_done=self.done, bytes_total=self.total)

    def close(self) -> None:
        self._save()
        self.bar.close()


def _show_progress(progress: bool | None) -> bool:
    return progress if progress is not None else sys.stderr.isatty()


# --- HTTP ----------------------------------------------------------------------------------------


def _html_error(url: str, why: str) -> DownloadError:
    return DownloadError(
        f"{url} answered with an HTML page where weights were expected ({why}): the server sent an error, "
        "login or landing page; check the URL or DEPTHSITE_MODEL_MIRROR. Nothing was cached.",
        extra={"url": url, "kind": "html"},
    )


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total) of a `Content-Range: bytes a-b/total` header; (-1, None) when unreadable."""
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.split("-")[0])
        return (first, None if total == "*" else int(total)) if unit == "bytes" else (-1, None)
    except ValueError:
        return -1, None


def _host(url: str) -> str:
    """The host (and port) of a URL, without any user:password a mirror URL may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}"


def _shown_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{_host(url)}{parts.path}"


def _ways_out(model: RegisteredModel) -> str:
    # The same three ways out in every door (CLI, API, dashboard): the message is the one place they live.
    return (f"Ways out: set DEPTHSITE_MODEL_MIRROR to a mirror that has {model.file_name or 'the file'}, import a "
            f"file you have (python manage.py models import PATH --model {model.name}), or use --offline to work "
            "from the cache only")


def _unreachable_error(model: RegisteredModel, url: str, *, code: str, what: str, attempts: int,
                       partial: int = 0, status: int | None = None) -> DownloadError:
    """One line: what failed, what was tried, and the ways out; `code` is stable for scripts and the API."""
    tried = f"tried {_host(url)} ({_shown_url(url)})"
    if attempts > 1:
        tried = f"giving up after {attempts} failed attempts; {tried}"
    kept = f"; {format_size(partial)} are kept and the next download resumes from there" if partial else ""
    extra: dict[str, Any] = {"code": code, "url": _shown_url(url), "host": _host(url), "attempts": attempts,
                             "resumable": bool(partial), "partial_bytes": partial,
                             "hint": _ways_out(model).removeprefix("Ways out: ")}
    if status is not None:
        extra["status"] = status
    return DownloadError(f"cannot download {model.name}: {what} ({tried}){kept}. {_ways_out(model)}",
                         extra=extra)


def _connection_problem(exc: requests.RequestException, url: str) -> tuple[str, str, bool]:
    """(code, what failed, whether another attempt can help) for an error raised before any response came."""
    host = _host(url)
    if isinstance(exc, requests.exceptions.SSLError):
        return ("download_tls", f"the TLS handshake with {host} failed (certificate not trusted, or not a TLS "
                                "server)", False)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "download_timeout", f"connecting to {host} timed out after {CONNECT_TIMEOUT_SECONDS} s", True
    if isinstance(exc, requests.Timeout):
        return "download_timeout", f"{host} stopped answering for {READ_TIMEOUT_SECONDS} s", True
    # requests wraps urllib3's MaxRetryError, which wraps the socket's own error: look down the chain.
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (socket.gaierror, urllib3.exceptions.NameResolutionError)):
            return "download_dns", f"the host name {urlsplit(url).hostname} does not resolve (DNS)", False
        if isinstance(error, BaseException):
            pending.extend([getattr(error, "reason", None), error.__cause__, error.__context__,
                            *[arg for arg in error.args if isinstance(arg, BaseException)]])
    return "download_unreachable", f"cannot connect to {host} (connection refused, or no route to it)", True


def _http_attempt(session: requests.Session, *, model: RegisteredModel, url: str, part: Path,
                  show: bool, download: WeightDownload | None) -> _Fetched:
    offset, validator = _resume_point(part, url)
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if offset else {}
    try:
        response = session.get(url, headers=headers, stream=True,
                               timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
    except requests.RequestException as exc:
        code, what, heals = _connection_problem(exc, url)
        if not heals:
            # DNS and TLS failures do not heal in seconds: no retries; a partial file is kept for later.
            raise _unreachable_error(model, url, code=code, what=what, attempts=1, partial=_size(part)) from None
        raise _TransientError(f"cannot reach {_host(url)}: {what}", code=code, what=what) from None
    with response:
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise _TransientError(f"{url} answered {status} {response.reason}",
                                  code="download_http_5xx" if status >= 500 else f"download_http_{status}",
                                  what=f"{_shown_url(url)} answered {status} {response.reason}", status=status)
        if status == 416:
            _discard(part)  # the server has less than our partial: it is not the same file
            raise _TransientError(f"{url} could not resume at byte {offset} (416); starting again")
        if status not in (200, 206):
            missing = status in (401, 403, 404, 410)
            raise _unreachable_error(
                model, url, code=f"download_http_{status}", status=status, attempts=1,
                what=(f"{_shown_url(url)} answered {status} {response.reason}: "
                      + ("the file is not there or access is denied" if missing else "not a weight file")))
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise _html_error(url, f"Content-Type {content_type}")
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # Identity was asked for: lengths, ranges and the disk check count the file's own bytes, and a
            # small compressed body must not expand into a big file. The body is never decoded.
            raise DownloadError(
                f"{url} sent its body with Content-Encoding {encoding} although identity was asked; refused, "
                "nothing was cached. Serve the file as it is (no compression) or check DEPTHSITE_MODEL_MIRROR",
                extra={"url": url, "kind": "encoded", "encoding": encoding},
            )
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range", ""))
            if first != offset:
                _discard(part)
                raise _TransientError(f"{url} resumed at byte {first} instead of {offset}; starting again")
        else:
            if offset:
                logger.info("%s: the server sent the whole file (no Range support, or the file changed); "
                            "starting again from zero", url)
            offset = 0
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        if total is not None and model.expected_size and total != model.expected_size:
            raise IntegrityError(
                f"{url} offers {total} bytes but the pinned file of {model.name} has {model.expected_size} "
                f"(pinned sha256 {model.expected_sha256}); nothing was cached. To accept a different file: "
                + _pin_hint(model),
                extra={"url": url, "size": total, "expected_size": model.expected_size},
            )
        cap, cap_source = _byte_cap(model)
        if total is not None and total > cap:
            raise _too_large(model, url, total, cap, cap_source, declared=True)
        _check_disk(model, part.parent, (total if total is not None else cap) - offset)
        if offset == 0:
            # Written before the first body byte, so a transfer killed at any point can be resumed.
            _write_sidecar(part, url=url, etag=response.headers.get("ETag", ""),
                           last_modified=response.headers.get("Last-Modified", ""), total=total)
        digest = _hash_prefix(part, offset)
        progress = _Progress(label=model.name, total=total, initial=offset, show=show, download=download)
        try:
            with cachefs.disk_full_as_error(part), open(part, "rb+" if offset else "wb") as handle:
                handle.seek(offset)
                handle.truncate()
                sniff = offset == 0
                while True:
                    try:
                        # The raw stream, never decoded (see Content-Encoding above); chunked framing is undone.
                        chunk = response.raw.read(CHUNK_BYTES, decode_content=False)
                    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                        handle.flush()
                        raise _TransientError(
                            f"the connection broke after {format_size(progress.done)}: {exc}") from None
                    if not chunk:
                        break
                    if sniff:
                        if chunk.lstrip()[:64].lower().startswith(HTML_STARTS):
                            raise _html_error(url, "the body is HTML")
                        sniff = False
                    if progress.done + len(chunk) > cap:
                        raise _too_large(model, url, progress.done + len(chunk), cap, cap_source, declared=False)
                    _append(handle, chunk)
                    digest.update(chunk)
                    progress.advance(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            progress.close()
    size = _size(part)
    if total is not None and size != total:
        raise _TransientError(f"received {size} of {total} bytes")
    return _Fetched(sha256=digest.hexdigest(), size=size, resumed_from=offset)


def _http_fetch(*, model: RegisteredModel, url: str, part: Path, show: bool,
                download: WeightDownload | None) -> _Fetched:
    """Stream `url` into `part`, resuming and retrying with backoff; failures without progress are counted."""
    failures = 0
    furthest = _size(part)
    with requests.Session() as session:
        # identity: Content-Length and Range then count the file's own bytes, not a compressed stream.
        session.headers.update({"User-Agent": f"depthsite/{depthsite.__version__}", "Accept-Encoding": "identity"})
        while True:
            try:
                return _http_attempt(session, model=model, url=url, part=part, show=show, download=download)
            except _TransientError as exc:
                size = _size(part)
                if size > furthest:
                    furthest = size  # a dropped connection that still moved bytes forward is not counted
                else:
                    failures += 1
                if failures >= RETRY_ATTEMPTS:
                    raise _unreachable_error(model, url, code=exc.code, what=exc.what, attempts=failures,
                                             partial=size, status=exc.status) from None
                delay = RETRY_BACKOFF_SECONDS * 2 ** max(failures - 1, 0)
                logger.warning("download of %s: %s; retrying in %.1f s", model.name, exc, delay)
                time.sleep(delay)


def _file_copy(*, model: RegisteredModel, url: str, part: Path, show: bool,
               download: WeightDownload | None) -> _Fetched:
    """Copy from a file:// mirror into `part` with the same hashing and checks as a transfer (never resumed)."""
    folder_url, _, quoted_name = url.rpartition("/")
    folder = Path(url2pathname(urlsplit(folder_url).path))
    source = cachefs.contained(folder, cachefs.safe_name(unquote(quoted_name), what="the mirror file name"))
    if not source.is_file():
        raise DownloadError(f"the mirror folder {source.parent} has no file {source.name} ({url})",
                            extra={"url": url, "status": 404})
    total = source.stat().st_size
    cap, cap_source = _byte_cap(model)
    if total > cap:
        raise _too_large(model, url, total, cap, cap_source, declared=True)
    _discard(part)
    _check_disk(model, part.parent, total)
    digest = hashlib.sha256()
    progress = _Progress(label=model.name, total=total, initial=0, show=show, download=download)
    try:
        with cachefs.disk_full_as_error(part), open(source, "rb") as reader, open(part, "wb") as handle:
            while chunk := reader.read(CHUNK_BYTES):
                if progress.done + len(chunk) > cap:  # the file grew while it was copied
                    raise _too_large(model, url, progress.done + len(chunk), cap, cap_source, declared=False)
                _append(handle, chunk)
                digest.update(chunk)
                progress.advance(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        progress.close()
    return _Fetched(sha256=digest.hexdigest(), size=_size(part), resumed_from=0)


# --- acceptance ------------------------------------------------------------------------------------


def _accept(*, model: RegisteredModel, part: Path, fetched: _Fetched, url: str,
            requested_by: str = "") -> tuple[WeightFile, bool]:
    """Check the complete partial file, then rename it to its final name and record it, together."""
    if model.expected_sha256 and fetched.sha256 != model.expected_sha256:
        raise IntegrityError(
            f"the bytes from {url} differ from the pinned sha256 of {model.name}: downloaded {fetched.sha256}, "
            f"pinned {model.expected_sha256} (pinned from {model.sha256_pinned_from or 'the catalogue'}); "
            f"nothing was cached. If the new file is legitimate, re-pin: {_pin_hint(model, fetched.sha256)}",
            extra={"url": url, "sha256": fetched.sha256, "pinned": model.expected_sha256},
        )
    if model.expected_size and fetched.size != model.expected_size:
        raise IntegrityError(f"{url} gave {fetched.size} bytes but the pinned file of {model.name} has "
                             f"{model.expected_size}; nothing was cached", extra={"url": url})
    try:
        inspection = weights_inspect(path=part, architecture=model.architecture)
        functional_hash = weights_functional_check(model, inspection.loaded)
    except WeightFileError as exc:
        raise WeightFileError(f"the file from {url} is not usable weights of {model.name}: {exc.message}; "
                              "nothing was cached", extra={**exc.extra, "url": url}) from None
    if inspection.sha256 != fetched.sha256:
        raise IntegrityError(f"{part.name} changed on disk while it was being checked; nothing was cached")
    if model.expected_content_digest and inspection.digest != model.expected_content_digest:
        raise IntegrityError(
            f"the weights from {url} differ from the pinned weights of {model.name} (content digest "
            f"{inspection.digest[:16]}..., pinned {model.expected_content_digest[:16]}...); nothing was cached. "
            f"To accept them: {_pin_hint(model)}",
            extra={"url": url, "content_digest": inspection.digest},
        )
    dest = cache_file_path(model=model, fmt=inspection.format)
    inspection.path = dest
    pin_now = not model.expected_sha256
    renamed = False
    try:
        with transaction.atomic():
            weight_file = weight_record(model=model, fmt=inspection.format, path=dest, inspection=inspection,
                                        functional_hash=functional_hash, origin="download",
                                        origin_source=_shown_url(url), origin_by=requested_by)
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
    _sidecar_path(part).unlink(missing_ok=True)
    return weight_file, pin_now


# --- single flight ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_flight(model: RegisteredModel, notify: Notify | None) -> Iterator[bool]:
    """Hold the model's lock; yields whether another process held it first. flock dies with its holder."""
    lock = cachefs.model_lock(model.name)
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        message = f"waiting for another download of {model.name} on this node"
        logger.info(message)
        if notify is not None:
            notify(message)
        try:
            lock.acquire(timeout=LOCK_WAIT_SECONDS)
        except Timeout:
            raise ConflictError(
                f"another process has held the lock of {model.name} for over {LOCK_WAIT_SECONDS / 3600:.0f} h; "
                "try again later", extra={"lock": str(cachefs.lock_path(model.name))},
            ) from None
    try:
        yield waited
    finally:
        lock.release()


def _fail_interrupted(model: RegisteredModel, keep: WeightDownload | None) -> None:
    """Rows left running by a process that died; only called with the model's lock held, so none is alive."""
    stale = WeightDownload.objects.filter(model=model, node=cachefs.node_name(), status=DownloadStatus.RUNNING)
    if keep is not None:
        stale = stale.exclude(pk=keep.pk)
    count = stale.update(status=DownloadStatus.FAILED, finished_at=timezone.now(),
                         error="interrupted: the process running it stopped; the next download resumes its partial file")
    if count:
        logger.warning("marked %d interrupted download(s) of %s as failed", count, model.name)


def download_is_running_elsewhere(*, download: WeightDownload) -> bool:
    """Whether a live process is carrying out this row now (it is running and its model's lock is held).

    The broker hands a task out again after the job retry time, which a long download outlives: such a
    second delivery must leave the transfer to the process that runs it, not queue up behind its lock.
    """
    return download.status == DownloadStatus.RUNNING and not _is_stale(download)


def _is_stale(download: WeightDownload) -> bool:
    if download.status == DownloadStatus.RUNNING:
        return cachefs.lock_is_free(cachefs.lock_path(download.model.name))  # running rows hold the lock; a free lock means the holder died
    return (timezone.now() - download.created_at).total_seconds() > QUEUED_STALE_SECONDS


# --- services --------------------------------------------------------------------------------------


def _transfer(*, model: RegisteredModel, url: str, show: bool,
              download: WeightDownload | None) -> tuple[_Fetched, WeightFile, bool]:
    part = _partial_path(model)
    fetch = _file_copy if url.startswith("file:") else _http_fetch
    try:
        fetched = fetch(model=model, url=url, part=part, show=show, download=download)
    except ApplicationError as exc:
        # Bad bytes are never kept; only a transfer that gave up on a flaky server keeps them to resume.
        if not exc.extra.get("resumable"):
            _discard(part)
        raise
    try:
        weight_file, pinned = _accept(model=model, part=part, fetched=fetched, url=url,
                                      requested_by=download.requested_by if download is not None else "")
    except Exception:
        # Whatever way the complete bytes failed acceptance (a clear error, or a reader that tripped over a
        # malformed header), they are never resumed into: the next download starts from zero.
        _discard(part)
        raise
    return fetched, weight_file, pinned


def weight_download(
    *,
    model: RegisteredModel,
    fmt: str | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
    download: WeightDownload | None = None,
    requested_by: str = "",
    notify: Notify | None = None,
) -> DownloadResult:
    """Make sure the model's weights are cached on this node, downloading them at most once per node.

    `fmt` (default DEPTHSITE_CACHE_FORMAT) also keeps a converted copy; `offline` (or DEPTHSITE_OFFLINE)
    forbids the network; `progress` None shows a bar when stderr is a terminal; `download` is the row to
    report on (one is created when bytes must move); `notify` receives messages a user should see.
    """
    model_license_check(model=model)
    wanted = _wanted_format(fmt)
    is_offline = _is_offline(offline)
    show = _show_progress(progress)
    try:
        with _single_flight(model, notify) as waited:
            _fail_interrupted(model, keep=download)
            model.refresh_from_db()  # the first of several callers may just have pinned it
            cached = _healthy_files(model)
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
                fetched, weight_file, pinned = _transfer(model=model, url=url, show=show, download=download)
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
        if download is not None and download.status in DownloadStatus.ACTIVE:
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
    wanted = _wanted_format(fmt) or WeightFormat.PT
    if _is_offline(None) and not _healthy_files(model) and not download_url(model=model).startswith("file:"):
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


def weights_resolve(*, model: RegisteredModel, offline: bool | None = None, notify: Notify | None = None) -> WeightFile:
    """The file to load the model from: a healthy cached file in the preferred format, else any healthy
    format (converted when DEPTHSITE_CACHE_FORMAT asks), else a download unless offline, else a clear error."""
    model_license_check(model=model)
    preferred = _wanted_format(None)
    for _ in range(RESOLVE_ROUNDS):
        files = _healthy_files(model)
        if not files:
            break
        exact = [f for f in files if f.format == preferred]
        if exact or not preferred:
            return (exact or files)[0]
        try:
            return weight_convert(model=model, fmt=preferred)
        except ApplicationError as exc:
            # A conversion that fails (disk full, all sources damaged) must not stop loading what exists.
            logger.warning("could not convert %s to %s: %s", model.name, preferred, exc.message)
            files = _healthy_files(model)
            if files:
                return files[0]
    return weight_download(model=model, fmt=preferred, offline=offline, progress=False, notify=notify).weight_file


def weights_resolve_loaded(*, model: RegisteredModel, offline: bool | None = None,
                           notify: Notify | None = None) -> tuple[WeightFile, LoadedWeights]:
    """`weights_resolve`, then read the tensors; a file that fails to load is marked corrupt and the chain goes on."""
    last_error = ""
    for _ in range(RESOLVE_ROUNDS):
        weight_file = weights_resolve(model=model, offline=offline, notify=notify)
        try:
            return weight_file, read_weights(cachefs.absolute(weight_file.path), weight_file.format,
                                              architecture=model.architecture)
        except (WeightFileError, OSError) as exc:
            last_error = getattr(exc, "message", None) or str(exc)
            weight_mark_corrupt(weight_file=weight_file, reason=last_error)
    raise WeightFileError(f"no cached file of {model.name} loads (last error: {last_error}); "
                          f"run python manage.py models verify --model {model.name}",
                          extra={"model": model.name})
