"""optimize under concurrent writers: between the plan and its execution, files are replaced and rows are
re-recorded; executing re-checks every item under the model's lock and deletes nothing good."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from models_registry import cachefs
from models_registry.choices import Health
from models_registry.models import WeightFile
from models_registry.services.cache import STALE_AFTER_SECONDS, cache_optimize_execute, cache_optimize_plan

pytestmark = pytest.mark.django_db


def _write(rel: str, data: bytes, *, age: float = 0) -> Path:
    path = cachefs.cache_root() / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with cachefs.atomic_write(path) as tmp:  # a new inode, as every writer of the cache makes
        tmp.write_bytes(data)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def _record(model, fmt: str, rel: str, data: bytes, health: str = Health.OK) -> WeightFile:
    """What weight_record does once a file is in place: update_or_create on (model, format, node)."""
    weight_file, _ = WeightFile.objects.update_or_create(
        model=model, format=fmt, node=cachefs.node_name(),
        defaults={"path": rel, "size": len(data), "sha256": f"{hash(data) & (2**64 - 1):064x}", "health": health,
                  "health_reason": "" if health == Health.OK else "marked by the test",
                  "created_at": timezone.now(), "verified_at": timezone.now()})
    return weight_file


def _items(plan, kind: str):
    return [item for item in plan.items if item.kind == kind]


def test_unchanged_items_are_all_deleted(small_model):
    """The control: with nothing racing, every planned item goes (so the skips below mean something)."""
    _write("MiDaS_small/orphan.h5", b"o" * 10)
    _record(small_model, "h5", "MiDaS_small/gone.h5", b"g" * 20)
    _write("MiDaS_small/bad.pkl", b"b" * 30)
    _record(small_model, "pkl", "MiDaS_small/bad.pkl", b"b" * 30, health=Health.CORRUPT)
    _write(".locks/Old.lock", b"", age=2 * STALE_AFTER_SECONDS)
    plan = cache_optimize_plan()
    assert sorted(item.kind for item in plan.items) == ["corrupt", "missing", "orphan", "stale_lock"]
    cache_optimize_execute(plan=plan)
    assert [item.outcome for item in plan.items] == ["deleted"] * 4
    assert plan.freed_bytes == 40 and plan.errors == []
    assert not WeightFile.objects.exists()
    left = sorted(str(p.relative_to(cachefs.cache_root())) for p in cachefs.cache_root().rglob("*") if p.is_file())
    assert left == [".locks/MiDaS_small.lock"]  # the lock execute took itself; Old.lock is gone


def test_an_orphan_recorded_after_the_plan_is_kept(small_model):
    # A download renamed its file into place just before the plan looked, and recorded it just after.
    path = _write("MiDaS_small/midas_v21_small_256.safetensors", b"weights" * 10)
    plan = cache_optimize_plan()
    assert [item.path for item in _items(plan, "orphan")] == ["MiDaS_small/midas_v21_small_256.safetensors"]
    _record(small_model, "safetensors", "MiDaS_small/midas_v21_small_256.safetensors", b"weights" * 10)

    cache_optimize_execute(plan=plan)
    assert path.exists()
    assert _items(plan, "orphan")[0].outcome == "skipped: the file has a record now"
    assert plan.freed_bytes == 0


def test_an_orphan_replaced_after_the_plan_is_kept(small_model):
    path = _write("MiDaS_small/x.h5", b"old")
    plan = cache_optimize_plan()
    _write("MiDaS_small/x.h5", b"a new file with the same name")
    cache_optimize_execute(plan=plan)
    assert path.read_bytes() == b"a new file with the same name"
    assert _items(plan, "orphan")[0].outcome.startswith("skipped")


def test_a_missing_row_reused_for_a_fresh_file_is_kept(small_model):
    _record(small_model, "pt", "MiDaS_small/midas_v21_small_256.pt", b"the old file, now gone")
    plan = cache_optimize_plan()
    (missing,) = _items(plan, "missing")
    # A download arrives: its file is renamed into place and update_or_create re-uses the very same row.
    good = b"fresh good weights"
    path = _write("MiDaS_small/midas_v21_small_256.pt", good)
    row = _record(small_model, "pt", "MiDaS_small/midas_v21_small_256.pt", good)
    assert row.pk == missing.weight_file_id

    cache_optimize_execute(plan=plan)
    assert WeightFile.objects.filter(pk=row.pk, size=len(good)).exists()
    assert path.read_bytes() == good
    assert missing.outcome.startswith("skipped")


def test_a_corrupt_row_reused_for_a_fresh_file_is_kept(small_model):
    _write("MiDaS_small/w.h5", b"damaged")
    _record(small_model, "h5", "MiDaS_small/w.h5", b"damaged", health=Health.CORRUPT)
    plan = cache_optimize_plan()
    (corrupt,) = _items(plan, "corrupt")
    path = _write("MiDaS_small/w.h5", b"converted again, good")
    _record(small_model, "h5", "MiDaS_small/w.h5", b"converted again, good")

    cache_optimize_execute(plan=plan)
    assert path.exists() and path.read_bytes() == b"converted again, good"
    assert WeightFile.objects.get(pk=corrupt.weight_file_id).health == Health.OK
    assert corrupt.outcome.startswith("skipped")


def test_a_corrupt_file_replaced_under_an_unchanged_row_is_kept(small_model):
    _write("MiDaS_small/w.h5", b"damaged")
    _record(small_model, "h5", "MiDaS_small/w.h5", b"damaged", health=Health.CORRUPT)
    plan = cache_optimize_plan()
    path = _write("MiDaS_small/w.h5", b"someone put another file here")
    cache_optimize_execute(plan=plan)
    assert path.exists() and WeightFile.objects.count() == 1
    assert plan.items[0].outcome == "skipped: the file changed since the plan"


def test_eviction_skips_a_model_pinned_or_used_since_the_plan(small_model):
    _write("MiDaS_small/a.h5", b"a" * 100)
    row = _record(small_model, "h5", "MiDaS_small/a.h5", b"a" * 100)
    plan = cache_optimize_plan(max_bytes=0)
    assert [item.kind for item in plan.items] == ["evict"]
    WeightFile.objects.filter(pk=row.pk).update(last_used_at=timezone.now())  # loaded in the meantime
    cache_optimize_execute(plan=plan)
    assert cachefs.absolute(row.path).exists() and plan.items[0].outcome.startswith("skipped")

    plan = cache_optimize_plan(max_bytes=0)
    small_model.pinned = True
    small_model.save()
    cache_optimize_execute(plan=plan)
    assert plan.items[0].outcome == "skipped: the model was pinned since the plan"
    assert WeightFile.objects.filter(pk=row.pk).exists() and cachefs.absolute(row.path).exists()


def test_eviction_skips_a_file_used_in_the_minute_before_the_plan(small_model):
    # Uses are stamped at most once a minute: one after the plan may leave the stamp the plan saw.
    from datetime import timedelta

    from models_registry.services.records import USED_RESOLUTION, weight_mark_used

    _write("MiDaS_small/a.h5", b"a" * 100)
    row = _record(small_model, "h5", "MiDaS_small/a.h5", b"a" * 100)
    WeightFile.objects.filter(pk=row.pk).update(last_used_at=timezone.now() - USED_RESOLUTION / 2)
    plan = cache_optimize_plan(max_bytes=0)
    assert [item.kind for item in plan.items] == ["evict"]
    row.refresh_from_db()
    weight_mark_used(weight_file=row)  # a job loads it now: no new stamp within the minute
    cache_optimize_execute(plan=plan)
    assert cachefs.absolute(row.path).exists() and plan.items[0].outcome == "skipped: used in the last minute"

    WeightFile.objects.filter(pk=row.pk).update(last_used_at=timezone.now() - timedelta(hours=1))
    plan = cache_optimize_plan(max_bytes=0)
    cache_optimize_execute(plan=plan)
    assert plan.items[0].outcome == "deleted" and not cachefs.absolute(row.path).exists()


def test_a_stale_lock_taken_again_is_not_deleted(small_model):
    path = _write(".locks/MiDaS_small.lock", b"", age=2 * STALE_AFTER_SECONDS)
    plan = cache_optimize_plan()
    assert [item.kind for item in plan.items] == ["stale_lock"]
    with cachefs.locked("MiDaS_small"):
        cache_optimize_execute(plan=plan)
        assert path.exists()
    assert plan.items[0].outcome == "skipped: the lock is in use now"


@pytest.mark.django_db(transaction=True)
def test_execute_waits_for_the_model_lock_before_judging_an_orphan(small_model):
    """A writer holds the lock while its file is in place but not yet recorded: execute waits for it."""
    rel = "MiDaS_small/midas_v21_small_256.h5"
    path = _write(rel, b"converted")
    plan = cache_optimize_plan()
    assert [item.kind for item in plan.items] == ["orphan"]
    holding, done = threading.Event(), threading.Event()

    def writer():
        try:
            with cachefs.locked("MiDaS_small"):
                holding.set()
                time.sleep(0.5)
                _record(small_model, "h5", rel, b"converted")
        finally:
            connection.close()
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert holding.wait(10)
    cache_optimize_execute(plan=plan)
    thread.join(10)
    assert done.is_set()
    assert path.exists() and WeightFile.objects.filter(path=rel).exists()
    assert plan.items[0].outcome == "skipped: the file has a record now"
