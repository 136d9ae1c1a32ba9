"""Cached files' records: write, mark used or corrupt, prove the pin, refuse another node's, pick the next usable."""
from __future__ import annotations

import errno
import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from django.utils import timezone

from depthsite.exceptions import ApplicationError, ConflictError, NotFoundError, WeightFileError
from models_registry import cachefs
from models_registry.choices import Health, WeightFormat
from models_registry.formats import LoadedWeights, read_weights
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_files_usable
from models_registry.services.inspection import Inspection

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Formats tried first as a conversion source: the ones that load fastest.
SOURCE_PREFERENCE = ("safetensors", "pt", "h5", "pkl")


def best_first(files: Iterable[WeightFile]) -> list[WeightFile]:
    """Cached files in the order they are loaded from: verified ok before unverified, then by format
    (SOURCE_PREFERENCE: the cheapest to read first)."""
    return sorted(files, key=lambda f: (f.health != Health.OK, SOURCE_PREFERENCE.index(f.format)))


def cache_file_path(*, model: RegisteredModel, fmt: str) -> Path:
    stem = Path(model.file_name).stem if model.file_name else model.name
    return cachefs.model_dir(model.name) / f"{stem}{WeightFormat.extension(fmt)}"


def weight_record(
    *,
    model: RegisteredModel,
    fmt: str,
    path: Path,
    inspection: Inspection,
    health: str = Health.OK,
    reason: str = "",
    functional_hash: str = "",
    origin: str = "",
    origin_source: str = "",
    origin_by: str = "",
) -> WeightFile:
    """Create or replace the record of a file that is already in its final place in the cache.

    `origin` (download, import, convert), `origin_source` and `origin_by` record where its bytes came from."""
    values = {
        "origin": origin,
        "origin_source": origin_source[:500],
        "origin_by": origin_by[:150],
        "path": cachefs.relative(path),
        "size": inspection.size,
        "sha256": inspection.sha256,
        "content_digest": inspection.digest,
        "dtype": inspection.dtype,
        "health": health,
        "health_reason": reason,
        "functional_hash": functional_hash,
        "license": model.license,
        "verified_at": timezone.now(),
        "created_at": timezone.now(),
    }
    weight_file, _ = WeightFile.objects.update_or_create(
        model=model, format=fmt, node=cachefs.node_name(), defaults=values
    )
    return weight_file


# The cache's pruning evicts the least recently used files first: to the minute is precise enough, and a
# busy worker then writes a file's row once a minute, not once a job.
USED_RESOLUTION = timedelta(minutes=1)


def weight_mark_used(*, weight_file: WeightFile) -> None:
    """Record that the file was just used, unless the record read already says so to within USED_RESOLUTION."""
    now = timezone.now()
    if weight_file.last_used_at is not None and timedelta(0) <= now - weight_file.last_used_at < USED_RESOLUTION:
        return
    WeightFile.objects.filter(pk=weight_file.pk).update(last_used_at=now)
    weight_file.last_used_at = now


def weight_mark_corrupt(*, weight_file: WeightFile, reason: str) -> WeightFile:
    weight_file.set_health(Health.CORRUPT, reason)
    weight_file.save(update_fields=["health", "health_reason", "verified_at"])
    logger.warning("%s marked corrupt: %s", weight_file, reason)
    return weight_file


def weight_pin_problem(*, model: RegisteredModel, weight_file: WeightFile) -> str:
    """Why a cached copy cannot be proven to hold the model's pinned weights ('' when it can).

    A pinned sha256 names one released file: a pt copy proves itself by that sha256, any other copy
    only by the content digest recorded from a file that had it. Without that digest nothing else
    is proven, so nothing else is served.
    """
    if not model.expected_sha256 and not model.expected_content_digest:
        return ""
    if weight_file.format == WeightFormat.PT and model.expected_sha256 and weight_file.sha256 == model.expected_sha256:
        return ""
    if model.expected_content_digest:
        if weight_file.content_digest == model.expected_content_digest:
            return ""
        return (f"holds other weights than the pinned ones of {model.name} (content digest "
                f"{(weight_file.content_digest or '?')[:16]}..., pinned {model.expected_content_digest[:16]}...)")
    return (f"cannot be proven to hold the weights pinned for {model.name} (sha256 {model.expected_sha256[:16]}...): "
            "no cached file with that sha256 is known; download the pinned file again")


def weight_files_proven(*, model: RegisteredModel) -> list[WeightFile]:
    """Usable cached files of the model whose weights are proven to be the pinned ones."""
    return [f for f in weight_files_usable(model=model) if not weight_pin_problem(model=model, weight_file=f)]


def node_check(*, node: str, action: str, model: str = "", fmt: str = "") -> None:
    """ConflictError (409, kind other_node) when `node` is not this one: a node's cache is only changed on that
    node's machine. The facts travel in `extra`; each door says in its own words how to act there."""
    here = cachefs.node_name()
    if not node or node == here:
        return
    what = f"{model} [{fmt}]" if model and fmt else (model or "that cache")
    raise ConflictError(
        f"{what} is on node {node}, not on this node ({here}): {action} it on that node's machine",
        extra={"kind": "other_node", "node": node, "this_node": here, "action": action, "model": model,
               "format": fmt})


def _best_source(model: RegisteredModel, exclude: Iterable[str] = ()) -> WeightFile:
    files = [f for f in weight_files_proven(model=model) if f.format not in exclude]
    if not files:
        raise NotFoundError(f"no healthy cached weights of {model.name} on this node; download or import them first",
                            extra={"kind": "not_cached", "model": model.name})
    return best_first(files)[0]


# Errors of the moment, not of the bytes: the process or the machine ran short (file descriptors, memory, a
# read interrupted or refused for now, an I/O error of the disk or the network filesystem). A file that meets one
# keeps its health (marking it corrupt would have `models optimize` delete what may be the only copy); the caller
# is told to try again. EIO is counted here on purpose: a failing sector makes the file unreadable every time, and
# `models verify` (the operator's deliberate check) is what condemns it then, not one load under pressure.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR,
                             errno.EIO, errno.ENOBUFS, errno.EBUSY, errno.ETIMEDOUT})
# torch reports a failed open or map of a file in its own words (a RuntimeError): "unable to mmap N bytes from
# file <PATH>: Cannot allocate memory (12)", "unable to open file <PATH> in read-write mode: ... (24)".
_TORCH_FILE_ERROR = re.compile(r"^unable to (?:mmap|open) .*\((\d+)\)\s*$", re.DOTALL)


class WeightsUnavailableNowError(ApplicationError):
    """Cached weights could not be opened because of a shortage of the moment (file descriptors, memory, I/O);
    the file is left as it was. 503: the same request may work in a moment."""

    status = 503
    code = "temporary"
    hint = "try again in a moment; if it keeps happening, the machine is short of memory or file descriptors"


def resource_error_code(exc: BaseException) -> int | None:
    """The errno when `exc` (or what it was raised from) is a shortage of the moment rather than bad bytes:
    an OSError with an errno of RESOURCE_ERRNOS, torch's failed map or open with one, or a MemoryError (ENOMEM).
    None otherwise. Only the OS's and torch's own errors are read, never a message that may quote the file."""
    for link in cachefs.error_chain(exc):
        if isinstance(link, MemoryError):
            return errno.ENOMEM
        if isinstance(link, OSError):
            if link.errno in RESOURCE_ERRNOS:
                return link.errno
            continue
        if type(link) is RuntimeError:
            match = _TORCH_FILE_ERROR.match(str(link))
            if match and int(match.group(1)) in RESOURCE_ERRNOS:
                return int(match.group(1))
    return None


def _no_space(exc: BaseException) -> bool:
    return any(isinstance(link, OSError) and link.errno in cachefs.NO_SPACE_ERRNOS
               for link in cachefs.error_chain(exc))


def weights_unavailable_now(what: str, code: int, *, doing: str = "opened", file: str = "",
                            **extra) -> WeightsUnavailableNowError:
    """The temporary error for `what` that could not be `doing` because of errno `code` (its text, never a path)."""
    name = errno.errorcode.get(code, str(code))
    return WeightsUnavailableNowError(
        f"{what} could not be {doing} now ({os.strerror(code)}, {name}); try again",
        extra={"kind": "temporary", "errno": name, **extra}, file=file)


def weights_first_usable(*, model: RegisteredModel, pick: Callable[[], WeightFile],
                         use: Callable[[WeightFile], T], rounds: int = len(SOURCE_PREFERENCE) + 1) -> tuple[WeightFile, T]:
    """`use` applied to the file `pick` chooses; a file whose bytes fail there (WeightFileError, or the OS cannot
    read it) is marked corrupt, so the next `pick` passes it over. The one "try the next file" loop: loading,
    converting and building an estimator all go through it.

    A failure of the moment instead (too many open files, no memory to map it, an I/O error: resource_error_code)
    leaves the file as it was and raises WeightsUnavailableNowError (503); no space left raises DiskFullError."""
    last_error = ""
    for _ in range(rounds):
        weight_file = pick()
        try:
            return weight_file, use(weight_file)
        except (WeightFileError, OSError) as exc:
            code = resource_error_code(exc)
            if code is not None:
                logger.warning("%s could not be used now (%s); its health is left as it was", weight_file,
                               os.strerror(code))
                raise weights_unavailable_now(f"the weights of {model.name} [{weight_file.format}]", code,
                                              model=model.name, format=weight_file.format) from exc
            if _no_space(exc):
                raise cachefs.disk_full_error(cachefs.absolute(weight_file.path), exc) from exc
            last_error = getattr(exc, "message", None) or str(exc)
            weight_mark_corrupt(weight_file=weight_file, reason=last_error)
    raise WeightFileError(f"no cached file of {model.name} is usable (last error: {last_error}); each is marked "
                          "with what is wrong", extra={"model": model.name, "kind": "none_usable"})


def weights_read(weight_file: WeightFile) -> LoadedWeights:
    """The tensors of one cached file (WeightFileError or OSError when they do not load)."""
    return read_weights(cachefs.absolute(weight_file.path), weight_file.format,
                        architecture=weight_file.model.architecture)


def weights_load_usable(*, model: RegisteredModel, exclude: Iterable[str] = ()) -> tuple[WeightFile, LoadedWeights]:
    """The first healthy cached file that really loads (formats in `exclude` left out)."""
    return weights_first_usable(model=model, pick=lambda: _best_source(model, exclude=exclude), use=weights_read)
