"""Freeing the cache: optimize (plan, then execute) and clear; files and records always go together."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from filelock import FileLock, Timeout

from depthsite.units import format_size
from models_registry import cachefs
from models_registry.choices import Health, WeightFormat
from depthsite.exceptions import InvalidRequestError
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_files
from models_registry.services.records import USED_RESOLUTION

logger = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 3600
LOCK_TIMEOUT_SECONDS = 30  # an item whose model stays busy longer is skipped, not waited for


@dataclass
class PlanItem:
    """One thing optimize would delete, with the identity of what the plan saw, so that executing can tell
    the same file (or record) from one that replaced it since."""

    kind: str  # corrupt | missing | orphan | temporary | stale_lock | evict
    path: str
    bytes: int
    reason: str
    model: str = ""
    format: str = ""
    weight_file_id: int | None = None
    inode: int | None = None  # of the file seen (None: no file, as for a "missing" record)
    mtime_ns: int | None = None
    record: str = ""  # the record as seen (see _record_marker); "" for items without a record
    outcome: str = ""  # after execute: "deleted", "skipped: why" or "failed: why"

    @property
    def description(self) -> str:
        what = f"{self.model} [{self.format}]" if self.model else self.path
        line = f"{self.kind:<10} {format_size(self.bytes):>10}  {what}: {self.reason}"
        return line + (f" ({self.outcome})" if self.outcome and self.outcome != "deleted" else "")

    @property
    def identity(self) -> tuple[int, int, int] | None:
        return None if self.inode is None else (self.inode, self.bytes, self.mtime_ns)


@dataclass
class OptimizePlan:
    cache_dir: str
    node: str
    max_bytes: int | None
    bytes_before: int
    items: list[PlanItem] = field(default_factory=list)
    executed: bool = False
    freed_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_to_free(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.bytes_to_free

    @property
    def skipped(self) -> list[PlanItem]:
        return [item for item in self.items if item.outcome.startswith("skipped")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "cache_dir": self.cache_dir,
            "node": self.node,
            "max_bytes": self.max_bytes,
            "bytes_before": self.bytes_before,
            "bytes_to_free": self.bytes_to_free,
            "bytes_after": self.bytes_after,
            "executed": self.executed,
            "freed_bytes": self.freed_bytes,
            "errors": self.errors,
            "items": [asdict(item) for item in self.items],
        }


def _disk_bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        identity = cachefs.file_identity(path)
        if identity is not None and path.is_file():
            total += identity[1]
    return total


def _record_marker(record: WeightFile) -> str:
    """What a record says about its file; update_or_create reusing the row for a new file changes it."""
    used = record.last_used_at.isoformat() if record.last_used_at else ""
    return "|".join([record.path, str(record.size), record.sha256, record.health, record.created_at.isoformat(),
                     used])


def _record_item(kind: str, record: WeightFile, path: Path, reason: str) -> PlanItem:
    identity = cachefs.file_identity(path)
    inode, size, mtime_ns = identity if identity is not None else (None, 0, None)
    return PlanItem(kind, record.path, size, reason, record.model.name, record.format, record.pk,
                    inode=inode, mtime_ns=mtime_ns, record=_record_marker(record))


def _file_item(kind: str, rel: str, identity: tuple[int, int, int], reason: str) -> PlanItem:
    inode, size, mtime_ns = identity
    return PlanItem(kind, rel, size, reason, inode=inode, mtime_ns=mtime_ns)


def cache_optimize_plan(*, max_bytes: int | None = None, now: float | None = None) -> OptimizePlan:
    """What optimize would delete and why, with the bytes each item frees; touches nothing."""
    root = cachefs.cache_root()
    node = cachefs.node_name()
    now = now or time.time()
    limit = max_bytes if max_bytes is not None else settings.DEPTHSITE_CACHE_MAX_BYTES
    plan = OptimizePlan(cache_dir=str(root), node=node, max_bytes=limit, bytes_before=_disk_bytes(root))
    records = list(weight_files(node=node))
    known_paths = {record.path for record in records}
    doomed: set[int] = set()
    present: dict[int, Path] = {}

    for record in records:
        try:
            path = cachefs.absolute(record.path)
        except InvalidRequestError as exc:
            # A record forced in with a path outside the cache: never touch that path, only report it.
            plan.errors.append(f"{record.model.name} [{record.format}]: {exc.message}")
            doomed.add(record.pk)
            continue
        if cachefs.file_identity(path) is None:
            plan.items.append(_record_item("missing", record, path, "record of a file that is gone"))
            doomed.add(record.pk)
        elif record.health == Health.CORRUPT:
            plan.items.append(_record_item("corrupt", record, path, record.health_reason or "marked corrupt"))
            doomed.add(record.pk)
        else:
            present[record.pk] = path

    for path in sorted(root.rglob("*")):
        identity = cachefs.file_identity(path)
        if identity is None or not path.is_file():
            continue  # gone since the listing, or a folder
        rel = str(path.relative_to(root))
        age = now - identity[2] / 1e9
        if rel.startswith(cachefs.LOCK_DIR + "/"):
            if age > STALE_AFTER_SECONDS and cachefs.lock_is_free(path):
                plan.items.append(_file_item("stale_lock", rel, identity, f"lock file unused for {age / 3600:.1f} h"))
            continue
        if cachefs.is_temporary(path) or rel.startswith(".exports/"):
            if age > STALE_AFTER_SECONDS:
                plan.items.append(_file_item("temporary", rel, identity,
                                             f"temporary or partial file left {age / 3600:.1f} h ago"))
            continue
        if rel not in known_paths:
            plan.items.append(_file_item("orphan", rel, identity, "file with no record in the registry"))

    if limit is not None:
        remaining = plan.bytes_after
        candidates = [record for record in records
                      if record.pk not in doomed and not record.model.pinned and record.pk in present]
        candidates.sort(key=lambda r: (r.last_used_at or r.created_at, r.created_at))
        for record in candidates:
            if remaining <= limit:
                break
            used = record.last_used_at.isoformat(timespec="seconds") if record.last_used_at else "never"
            item = _record_item("evict", record, present[record.pk],
                                f"least recently used (last used {used}) to fit {format_size(limit)}")
            plan.items.append(item)
            remaining -= item.bytes
        if remaining > limit:
            plan.errors.append(f"the cache still holds {format_size(remaining)} after the plan: the rest "
                               "belongs to pinned models")
    return plan


class _Changed(Exception):
    """What a plan item saw is not what is there now: the item is skipped, nothing is deleted."""


def _owner(item: PlanItem) -> str | None:
    """The model whose lock guards the item's path: records and files in a model folder; None elsewhere."""
    if item.model:
        return item.model
    parts = Path(item.path).parts
    if len(parts) >= 2 and not cachefs.name_problem(parts[0]):
        return parts[0]
    return None


@contextlib.contextmanager
def _guard(item: PlanItem, path: Path) -> Iterator[None]:
    """Hold what keeps writers of the item's path away while it is checked and deleted."""
    if item.kind == "stale_lock":
        # The lock is the item itself: take it without waiting (a holder means it is not stale), delete it
        # while holding it; filelock's waiters on the deleted inode notice and lock the new file instead.
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise _Changed("the lock is in use now") from None
        try:
            yield
        finally:
            lock.release()
        return
    owner = _owner(item)
    if owner is None:
        yield
        return
    lock = cachefs.model_lock(owner, timeout=LOCK_TIMEOUT_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise _Changed(f"{owner} stayed busy for {LOCK_TIMEOUT_SECONDS} s") from None
    try:
        yield
    finally:
        lock.release()


def _execute_item(item: PlanItem, path: Path) -> int:
    """Delete one item if it is still what the plan saw; the bytes freed. Called under `_guard`."""
    current = cachefs.file_identity(path)
    if item.weight_file_id is None:
        if item.kind == "stale_lock":
            same = current is not None and current[0] == item.inode  # taking the lock may touch its times
        else:
            same = current == item.identity
        if not same:
            raise _Changed("the file changed since the plan")
        if item.kind == "orphan" and WeightFile.objects.filter(path=item.path).exists():
            raise _Changed("the file has a record now")  # renamed into place just before the plan saw it
        return cachefs.remove_file(path)
    with transaction.atomic():
        record = (WeightFile.objects.select_for_update().select_related("model")
                  .filter(pk=item.weight_file_id).first())
        if record is None:
            raise _Changed("the record is gone")
        if _record_marker(record) != item.record:
            raise _Changed("the record now describes another file")  # re-recorded (update_or_create) since
        if current != item.identity:
            raise _Changed("the file is back" if item.kind == "missing" else "the file changed since the plan")
        if item.kind == "evict" and record.model.pinned:
            raise _Changed("the model was pinned since the plan")
        if item.kind == "evict" and record.last_used_at and record.last_used_at > timezone.now() - USED_RESOLUTION:
            # A use is stamped at most once per USED_RESOLUTION: one since the plan may have left no new stamp.
            raise _Changed("used in the last minute")
        record.delete()
        return cachefs.remove_file(path) if current is not None else 0


def cache_optimize_execute(*, plan: OptimizePlan) -> OptimizePlan:
    """Carry out a plan: each item is checked again under its model's lock and skipped if it changed."""
    for item in plan.items:
        try:
            path = cachefs.absolute(item.path)
            with _guard(item, path):
                plan.freed_bytes += _execute_item(item, path)
            item.outcome = "deleted"
        except _Changed as exc:
            item.outcome = f"skipped: {exc}"
            logger.info("optimize skipped %s: %s", item.path, exc)
        except Exception as exc:  # keep going: one stuck file must not stop the rest of the clean-up
            message = getattr(exc, "message", None) or str(exc)
            item.outcome = f"failed: {message}"
            plan.errors.append(f"{item.path}: {message}")
    plan.executed = True
    logger.info("optimize freed %s in %d items (%d skipped)", format_size(plan.freed_bytes), len(plan.items),
                len(plan.skipped))
    return plan


@dataclass
class ClearResult:
    files: int
    bytes: int
    models: list[str]  # those that had something here to remove
    scope: str = ""  # what was asked: "MiDaS_small [pt]", "MiDaS_small", "every model"
    node: str = ""
    elsewhere: list[str] = field(default_factory=list)  # other nodes that still cache it, left alone

    @property
    def summary(self) -> str:
        """One line for people, the same in every door."""
        line = f"cleared {self.scope}: {self.files} file(s), {format_size(self.bytes)} freed on {self.node}"
        if self.elsewhere:
            line += f"; left alone on node(s) {', '.join(self.elsewhere)} (clear them on that node's machine)"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary}


def cache_clear(*, model: RegisteredModel | None = None, fmt: str | None = None,
                node: str | None = None) -> ClearResult:
    """Remove one model, one format of it, or every model from this node's cache, files and records together.

    `node`: the node the caller means (a selected row's); ConflictError unless it is this one."""
    from models_registry.services.records import node_check

    node_check(node=node or "", action="clear", model=model.name if model else "", fmt=fmt or "")
    fmt = WeightFormat.parse(fmt).value if fmt else None
    models = [model] if model is not None else list(RegisteredModel.objects.all())
    for current in models:
        # Checked for all before anything goes: a name forced into the database never leads outside the cache.
        cachefs.model_folder(current.name)
    here = cachefs.node_name()
    others = WeightFile.objects.filter(model__in=models).exclude(node=here)
    if fmt:
        others = others.filter(format=fmt)
    scope = (model.name if model is not None else "every model") + (f" [{fmt}]" if fmt else "")
    result = ClearResult(files=0, bytes=0, models=[], scope=scope, node=here,
                         elsewhere=sorted(set(others.values_list("node", flat=True))))
    for current in models:
        records = weight_files(model=current)
        if fmt:
            records = records.filter(format=fmt)
        with cachefs.locked(current.name, timeout=60):
            touched = False
            for record in list(records):
                path = cachefs.absolute(record.path)
                with transaction.atomic():
                    record.delete()
                    result.bytes += cachefs.remove_file(path)
                result.files += 1
                touched = True
            if fmt is None:
                folder = cachefs.model_folder(current.name)
                if folder.is_dir():
                    for leftover in folder.iterdir():
                        if leftover.is_file() and cachefs.is_temporary(leftover):
                            result.bytes += cachefs.remove_file(leftover)
                            touched = True
                    if not any(folder.iterdir()):
                        folder.rmdir()
            if touched:
                result.models.append(current.name)
    logger.info("cleared %d files (%s)", result.files, format_size(result.bytes))
    return result
