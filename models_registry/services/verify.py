"""Verify recorded files against their bytes, their layout, the pin and the functional check."""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.utils import timezone

from depthsite.exceptions import WeightFileError
from models_registry import cachefs
from models_registry.choices import Health, RuntimeFormat
from models_registry.formats import extension_format, file_sha256, sniff_format
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_files
from models_registry.services.inspection import Inspection, weights_functional_check, weights_inspect
from models_registry.services.records import (
    WeightsUnavailableNowError,
    node_check,
    resource_error_code,
    weight_pin_problem,
    weights_unavailable_now,
)

logger = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    weight_file: WeightFile
    health: str
    reason: str
    path: str
    checked: bool = True  # False: a shortage of the moment stopped the check, the health is the one recorded before

    @property
    def ok(self) -> bool:
        return self.health == Health.OK and self.checked

    @property
    def summary(self) -> str:
        """One line for people: "MiDaS_small [pt]: corrupt - why"."""
        line = self.weight_file.label(self.health if self.checked else "not checked")
        return f"{line} - {self.reason}" if self.reason else line

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.weight_file.model.name,
            "format": self.weight_file.format,
            "path": self.path,
            "health": self.health,
            "checked": self.checked,  # False: not judged this time (a shortage of the moment); health as recorded
            "ok": self.ok,
            "reason": self.reason,
            "sha256": self.weight_file.sha256,
            "functional_hash": self.weight_file.functional_hash,
        }


# path -> (inode identity and times, format) of the files this process sniffed, so that a worker's every job does
# not open the same checkpoint again (a .pt's zip directory: 4 % of a MiDaS_small job, docs/performance.md).
_SNIFFED: dict[str, tuple[tuple[int, ...], str]] = {}
_SNIFFED_MAX = 256


def _sniffed_format(path: Path, stat: os.stat_result) -> str:
    """sniff_format, remembered while the file is the same inode with the same size and times: a write, a
    replace or a truncation changes one of them, and the file is sniffed again. Failures are not remembered,
    nor files changed within CTIME_MARGIN_S (the kernel's clock for those times is coarse: a second write in
    the same tick would keep them)."""
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    known = _SNIFFED.get(str(path))
    if known is not None and known[0] == identity:
        return known[1]
    sniffed = sniff_format(path)
    if time.time() - stat.st_ctime < CTIME_MARGIN_S:
        return sniffed
    if len(_SNIFFED) >= _SNIFFED_MAX:
        _SNIFFED.clear()
    _SNIFFED[str(path)] = (identity, sniffed)
    return sniffed


def weight_quick_problem(weight_file: WeightFile, path: Path) -> tuple[str, str] | None:
    """(health, reason) when a recorded file is visibly unusable, else None. Cheap (a stat and a sniff of its
    first bytes, no hashing): the resolution chain runs it before every load; `models verify` starts with it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return Health.MISSING, (f"file not found at {path}: download or import {weight_file.model.name} again, "
                                "or run `models optimize` to drop the record")
    size = stat.st_size
    try:
        sniffed = _sniffed_format(path, stat)
    except WeightFileError as exc:
        return Health.CORRUPT, exc.message
    claimed = extension_format(path)
    if sniffed != weight_file.format or (claimed and claimed != sniffed):
        return Health.CORRUPT, (f"{path.name} holds {sniffed} content but is recorded as {weight_file.format}"
                                f"{f' and named {path.suffix}' if claimed and claimed != sniffed else ''}; "
                                "it was overwritten by another file")
    if size != weight_file.size:
        return Health.CORRUPT, (f"{path.name} has {size} bytes but {weight_file.size} were recorded: "
                                "the file was truncated or replaced")
    return None


def _verify_problems(weight_file: WeightFile, path: Path) -> tuple[str, str, Inspection | None]:
    """(health, reason, inspection) of a recorded file, checking everything `models verify` promises."""
    quick = weight_quick_problem(weight_file, path)
    if quick is not None:
        return (*quick, None)
    try:
        inspection = weights_inspect(path=path, architecture=weight_file.model.architecture, fmt=weight_file.format)
    except WeightFileError as exc:  # a raw OSError is judged by weight_verify (_unreadable)
        _temporary_check(weight_file, exc)
        return Health.CORRUPT, exc.message, None
    if inspection.sha256 != weight_file.sha256:
        return Health.CORRUPT, (f"{path.name} sha256 {inspection.sha256[:16]}... differs from the recorded "
                                f"{weight_file.sha256[:16]}...: the file changed after it was cached"), inspection
    if weight_file.content_digest and inspection.digest != weight_file.content_digest:
        return Health.CORRUPT, "content digest differs from the record", inspection
    problem = weight_pin_problem(model=weight_file.model, weight_file=weight_file)
    if problem:
        return Health.CORRUPT, f"{path.name} {problem}", inspection
    return Health.OK, "", inspection


# The kernel stamps an inode's change time from a coarse clock: a change within this many seconds of the
# hashing is hashed again.
CTIME_MARGIN_S = 5.0


def _changed_since_hashed(stat: os.stat_result, weight_file: WeightFile) -> bool:
    """Whether the file's inode changed (written, replaced, renamed, chmod) after its bytes were last hashed.
    Every change sets the change time, which no call can set back."""
    if weight_file.verified_at is None:
        return True
    return stat.st_ctime >= weight_file.verified_at.timestamp() - CTIME_MARGIN_S


def artifact_bytes_problem(weight_file: WeightFile, path: Path, stat: os.stat_result, *,
                           trust_unchanged: bool = False) -> str | None:
    """Why a runtime artifact's bytes are not the recorded ones (size or sha256), else None. With
    `trust_unchanged`, a file whose inode has not changed since it was last hashed is not read again (opening
    DPT_Large's artifact otherwise hashed 1.37 GB first, 1.2-1.3 s here); `models verify` always hashes."""
    reason = (f"{path.name} is not the artifact that was built and checked (size or sha256 changed); it is "
              "rebuilt on next use")
    if stat.st_size != weight_file.size:
        return reason
    if trust_unchanged and not _changed_since_hashed(stat, weight_file):
        return None
    started = timezone.now()
    if file_sha256(path) != weight_file.sha256:
        return reason
    if trust_unchanged:
        # Intact when the hash began: recorded, so later lookups trust it until its inode changes again.
        # Without this, an artifact hashed within the margin of its own rename was hashed at every open.
        WeightFile.objects.filter(pk=weight_file.pk).update(verified_at=started)
        weight_file.verified_at = started
    return None


def _temporary_check(weight_file: WeightFile, exc: BaseException) -> None:
    """A check that failed for a shortage of the moment (file descriptors, memory, I/O) says nothing of the bytes:
    WeightsUnavailableNowError (503), the file's health left as it was, as when a job loads it (records)."""
    code = resource_error_code(exc)
    # An I/O error is the one a deliberate check condemns: a failing sector fails every read, and a file only ever
    # answered "try again" would never be replaced (loading a file leaves it alone, records.RESOURCE_ERRNOS).
    if code is not None and code != errno.EIO:
        raise weights_unavailable_now(f"the weights of {weight_file.model.name} [{weight_file.format}]", code,
                                      doing="checked", model=weight_file.model.name,
                                      format=weight_file.format) from exc


def _unreadable(weight_file: WeightFile, path: Path, exc: OSError) -> tuple[str, str]:
    """An OSError anywhere in a check: a shortage of the moment is WeightsUnavailableNowError (the file unjudged),
    an I/O error condemns the file, anything else (a permission, say) is raised as it was."""
    _temporary_check(weight_file, exc)
    if resource_error_code(exc) == errno.EIO:
        return Health.CORRUPT, f"{path.name} cannot be read: {exc.strerror or exc}"
    raise exc


def _artifact_problem(weight_file: WeightFile, path: Path) -> tuple[str, str]:
    """A runtime artifact's bytes against its record; its output was compared with eager when it was built."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return Health.MISSING, f"file not found at {path}"
    reason = artifact_bytes_problem(weight_file, path, stat)
    if reason is not None:
        return Health.CORRUPT, reason
    return Health.OK, weight_file.health_reason if weight_file.health == Health.OK else ""


def weight_verify(*, weight_file: WeightFile, functional: bool = True) -> VerifyResult:
    """Check one recorded file of this node; ConflictError for another node's record (its file is not here)."""
    node_check(node=weight_file.node, action="verify", model=weight_file.model.name, fmt=weight_file.format)
    path = cachefs.absolute(weight_file.path)
    if weight_file.format in RuntimeFormat.values:
        try:
            health, reason = _artifact_problem(weight_file, path)
        except OSError as exc:
            health, reason = _unreadable(weight_file, path, exc)
        if health == Health.OK and weight_file.health != Health.OK:
            health, reason = weight_file.health, weight_file.health_reason  # bytes intact, but it failed its check
        weight_file.set_health(health, reason)
        weight_file.save(update_fields=["health", "health_reason", "verified_at"])
        return VerifyResult(weight_file=weight_file, health=health, reason=reason, path=str(path))
    try:
        health, reason, inspection = _verify_problems(weight_file, path)
    except OSError as exc:  # the quick check's stat and sniff, or the inspection, could not read the file
        (health, reason), inspection = _unreadable(weight_file, path, exc), None
    if health == Health.OK and functional and inspection is not None:
        try:
            weight_file.functional_hash = weights_functional_check(weight_file.model, inspection.loaded,
                                                                   digest=inspection.digest)
        except WeightFileError as exc:
            _temporary_check(weight_file, exc)
            health, reason = Health.CORRUPT, exc.message
    weight_file.set_health(health, reason)
    weight_file.save(update_fields=["health", "health_reason", "verified_at", "functional_hash"])
    if health != Health.OK:
        logger.info("verify %s: %s: %s", weight_file, health, reason)
    return VerifyResult(weight_file=weight_file, health=health, reason=reason, path=str(path))


def weights_verify(*, model: RegisteredModel | None = None, fmt: str | None = None,
                   functional: bool = True) -> list[VerifyResult]:
    queryset = weight_files(model=model)
    if fmt:
        queryset = queryset.filter(format=fmt)
    results = []
    for weight_file in queryset:
        try:
            results.append(weight_verify(weight_file=weight_file, functional=functional))
        except WeightsUnavailableNowError as exc:  # this file could not be checked now; the others still are
            results.append(VerifyResult(weight_file=weight_file, health=weight_file.health, reason=exc.message,
                                        path=str(cachefs.absolute(weight_file.path)), checked=False))
    return results


def verify_nothing_summary(*, model: RegisteredModel | None = None) -> str:
    """The line for a verify that found no file of this node to check (VerifyResult.summary is the line for one)."""
    return f"no cached files{f' of {model.name}' if model else ''} on this node to verify"
