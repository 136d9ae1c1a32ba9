"""Rows that data migrations write, read by tests that may run after a transactional test in the same worker."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from types import SimpleNamespace


def migrated_schedule(migration: str):
    """The django-q2 schedule that `inference.migrations.<migration>` writes.

    A transactional test (a live server, a lease race) flushes every table when it ends, the migrations' rows
    with them, and which test files share a pytest-xdist worker changes from run to run: a test that ran after
    one found no schedule. The migration's own function (idempotent: update_or_create) writes it again first,
    so the row read is the one that function writes, whatever ran before."""
    from django.apps import apps
    from django.db import connection
    from django_q.models import Schedule

    module = import_module(f"inference.migrations.{migration}")
    # Writing the row here must not hide a migration that stopped writing it, or a later one that removes it.
    assert any(getattr(operation, "code", None) is module.add_schedule for operation in module.Migration.operations), \
        f"{migration} no longer runs add_schedule"
    folder = Path(module.__file__).parent
    later = [path.name for path in sorted(folder.glob("[0-9]*.py")) if path.name > f"{migration}.py"
             and module.NAME in path.read_text(encoding="utf-8")]
    assert not later, f"later migrations touch the schedule {module.NAME!r}: {later}"
    module.add_schedule(apps, SimpleNamespace(connection=connection))
    return Schedule.objects.get(name=module.NAME)
