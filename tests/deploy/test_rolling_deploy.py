"""A fleet rolls over one machine at a time: the release before must keep working on today's schema."""
from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations import operations as ops
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

# Migrations that drop or rename a column or a table in the database, made before a fleet could run two releases
# side by side. A new one must keep what the release before reads and writes (leave the model first, the
# database in a later release), or be added here with the stop-first procedure in its release notes.
CONTRACTIONS_BEFORE_ROLLING = {("models_registry", "0003_licences_warm_bytes_architecture_facts")}
CONTRACTING = (ops.RemoveField, ops.RenameField, ops.DeleteModel, ops.RenameModel)


def database_operations(operation):
    """What an operation does to the database: SeparateDatabaseAndState's state-only part does nothing there."""
    if isinstance(operation, ops.SeparateDatabaseAndState):
        for inner in operation.database_operations:
            yield from database_operations(inner)
    else:
        yield operation


def test_no_migration_drops_what_the_release_before_still_uses():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    ours = {"inference", "models_registry"}
    dropping = sorted(key for key, migration in loader.disk_migrations.items() if key[0] in ours
                      and any(isinstance(op, CONTRACTING) for operation in migration.operations
                              for op in database_operations(operation)))
    assert set(dropping) <= CONTRACTIONS_BEFORE_ROLLING, dropping


@pytest.mark.django_db(transaction=True)
def test_the_release_before_0009_still_writes_and_reads_jobs():
    # Its DepthJob still names task_id in every INSERT and SELECT; 0009 used to drop the column, which failed
    # every upload and every job of a process not yet replaced.
    executor = MigrationExecutor(connection)
    assert executor.migration_plan(executor.loader.graph.leaf_nodes()) == []  # the schema is today's
    old_apps = executor.loader.project_state(("inference", "0008_depthjob_pixels_sha256")).apps
    OldJob = old_apps.get_model("inference", "DepthJob")
    fields = {"image": "uploads/x.jpg", "image_sha256": "0" * 64, "image_size": 1, "model_name": "MiDaS_small",
              "colormap": "inferno"}
    old = OldJob.objects.create(task_id="abc", **fields)
    OldJob.objects.filter(pk=old.pk).update(task_id="def")  # what the release before did after the enqueue
    from inference.models import DepthJob

    new = DepthJob.objects.create(**fields)  # today's insert leaves the column out: its default fills it
    assert {job.pk: job.task_id for job in OldJob.objects.all()} == {old.pk: "def", new.pk: ""}
    assert DepthJob.objects.get(pk=old.pk).model_name == "MiDaS_small"

