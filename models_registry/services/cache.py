"""Freeing the cache: optimize (plan, then execute) and clear; files and records always go together."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from depthsite.units import format_size
from models_registry import cachefs
from models_registry.choices import Health, WeightFormat
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_files

logger = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 3600


@dataclass
class PlanItem:
    kind: str  # corrupt | missing | orphan | temporary | stale_lock | evict
    path: str
    bytes: int
    reason: str
    model: str = ""
    format: str = ""
    weight_file_id: int | None = None

    @property
    def description(self) -> str:
        what = f"{self.model} [{self.format}]" if self.model else self.path
        return f"{self.kind:<10} {format_size(self.bytes):>10}  {what}: {self.reason}"


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
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


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

    for record in records:
        path = cachefs.absolute(record.path)
        if not path.exists():
            plan.items.append(PlanItem("missing", record.path, 0, "record of a file that is gone",
                                       record.model.name, record.format, record.pk))
            doomed.add(record.pk)
        elif record.health == Health.CORRUPT:
            plan.items.append(PlanItem("corrupt", record.path, path.stat().st_size,
                                       record.health_reason or "marked corrupt", record.model.name, record.format,
                                       record.pk))
            doomed.add(record.pk)

    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        age = now - path.stat().st_mtime
        if rel.startswith(cachefs.LOCK_DIR + "/"):
            if age > STALE_AFTER_SECONDS and cachefs.lock_is_free(path):
                plan.items.append(PlanItem("stale_lock", rel, path.stat().st_size,
                                           f"lock file unused for {age / 3600:.1f} h"))
            continue
        if cachefs.is_temporary(path) or rel.startswith(".exports/"):
            if age > STALE_AFTER_SECONDS:
                plan.items.append(PlanItem("temporary", rel, path.stat().st_size,
                                           f"temporary or partial file left {age / 3600:.1f} h ago"))
            continue
        if rel not in known_paths:
            plan.items.append(PlanItem("orphan", rel, path.stat().st_size, "file with no record in the registry"))

    if limit is not None:
        remaining = plan.bytes_after
        candidates = [
            record for record in records
            if record.pk not in doomed and not record.model.pinned and cachefs.absolute(record.path).exists()
        ]
        candidates.sort(key=lambda r: (r.last_used_at or r.created_at, r.created_at))
        for record in candidates:
            if remaining <= limit:
                break
            used = record.last_used_at.isoformat(timespec="seconds") if record.last_used_at else "never"
            plan.items.append(PlanItem("evict", record.path, record.size,
                                       f"least recently used (last used {used}) to fit {format_size(limit)}",
                                       record.model.name, record.format, record.pk))
            remaining -= record.size
        if remaining > limit:
            plan.errors.append(f"the cache still holds {format_size(remaining)} after the plan: the rest "
                               "belongs to pinned models")
    return plan


def cache_optimize_execute(*, plan: OptimizePlan) -> OptimizePlan:
    """Carry out a plan; each file and its record go together, under the model's lock."""
    root = cachefs.cache_root()
    for item in plan.items:
        path = root / item.path
        try:
            if item.weight_file_id is not None:
                with cachefs.locked(item.model, timeout=30):
                    with transaction.atomic():
                        WeightFile.objects.filter(pk=item.weight_file_id).delete()
                        plan.freed_bytes += cachefs.remove_file(path)
            else:
                plan.freed_bytes += cachefs.remove_file(path)
        except Exception as exc:  # keep going: one stuck file must not stop the rest of the clean-up
            plan.errors.append(f"{item.path}: {exc}")
    plan.executed = True
    logger.info("optimize freed %s in %d items", format_size(plan.freed_bytes), len(plan.items))
    return plan


@dataclass
class ClearResult:
    files: int
    bytes: int
    models: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_clear(*, model: RegisteredModel | None = None, fmt: str | None = None) -> ClearResult:
    """Remove one model, one format of it, or every model from this node's cache, files and records together."""
    fmt = WeightFormat.parse(fmt).value if fmt else None
    models = [model] if model is not None else list(RegisteredModel.objects.all())
    result = ClearResult(files=0, bytes=0, models=[])
    for current in models:
        records = weight_files(model=current)
        if fmt:
            records = records.filter(format=fmt)
        with cachefs.locked(current.name, timeout=60):
            touched = False
            for record in list(records):
                with transaction.atomic():
                    record.delete()
                    result.bytes += cachefs.remove_file(cachefs.absolute(record.path))
                result.files += 1
                touched = True
            if fmt is None:
                folder = cachefs.cache_root() / current.name
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
