"""Rows that data migrations write, read by tests that may run after a transactional test in the same worker."""
from __future__ import annotations

from importlib import import_module
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
    module.add_schedule(apps, SimpleNamespace(connection=connection))
    return Schedule.objects.get(name=module.NAME)
