"""A fleet rolls over one machine at a time: the release before must keep working on today's schema."""
from __future__ import annotations

import re

import pytest
from django.db import connection
from django.db.migrations import operations as ops
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

# Migrations that the release before them could not run beside, made before a fleet could run two releases side by
# side: they drop or rename a column or a table, or add a NOT NULL column without a database default (the release
# before inserts rows without it). A new one must keep what the release before reads and writes (leave the
# model first and the database in a later release; give a new column a db_default or null=True), or be added
# here with the stop-first procedure in its release notes.
BEFORE_ROLLING = {
    ("inference", "0003_depthjob_fov_degrees"), ("inference", "0004_depthjob_quota_and_preview"),
    ("inference", "0008_depthjob_pixels_sha256"), ("models_registry", "0003_licences_warm_bytes_architecture_facts"),
    ("models_registry", "0005_weight_provenance_and_download_codes"),
}
# RunPython can do anything to the database, and the check cannot read it: each is listed here once someone has
# read it and judged it safe beside the release before it, with why.
REVIEWED_RUNPYTHON = {
    ("inference", "0002_depth_jobs_recover_schedule"): "writes a django-q2 schedule row",
    ("inference", "0005_anonymous_jobs_expire_schedule"): "writes a django-q2 schedule row",
    ("models_registry", "0003_licences_warm_bytes_architecture_facts"): "fills rows (and is in BEFORE_ROLLING)",
    ("models_registry", "0009_redact_stored_credentials"): "rewrites stored URLs and errors without userinfo or a "
                                                           "query; the release before reads them as plain text",
    ("inference", "0010_depthjob_dtype_drop_task_id"): "drops DepthJob.task_id, which the release before it (0009's) "
                                                        "no longer names; 0009's own release kept it for 0008's",
    ("inference", "0011_session_key_digest"): "rewrites raw session keys to their digests, same column; the release "
                                              "before reads them as opaque text (its visitors' lookups miss until "
                                              "they are served by this release)",
    ("inference", "0012_redact_job_errors"): "rewrites failed jobs' errors to fixed sentences, same column; the "
                                             "release before shows them as plain text",
}
CONTRACTING = (ops.RemoveField, ops.RenameField, ops.DeleteModel, ops.RenameModel, ops.AlterModelTable)
# In raw SQL: a rename, a column made NOT NULL, or a DROP of anything but what only relaxes (an index, a default, a
# constraint, a NOT NULL). PostgreSQL's ALTER TABLE t DROP c needs no COLUMN keyword.
CONTRACTING_SQL = re.compile(r"\bRENAME\b|\bSET\s+NOT\s+NULL\b|\bDROP\b(?!\s+(INDEX|DEFAULT|CONSTRAINT|NOT\s+NULL)\b)",
                             re.IGNORECASE)


def database_operations(operation):
    """What an operation does to the database: SeparateDatabaseAndState's state-only part does nothing there."""
    if isinstance(operation, ops.SeparateDatabaseAndState):
        for inner in operation.database_operations:
            yield from database_operations(inner)
    else:
        yield operation


def _column(field) -> str:
    return field.db_column or (f"{field.name}_id" if field.many_to_one else field.name)


def breaks_the_release_before(op, old_field=None) -> bool:
    """Whether the release before `op` fails on the schema after it; for an AlterField, `old_field` is the field
    it alters (the same field renamed in the database, made NOT NULL, or losing its database default breaks it)."""
    from django.db.models import NOT_PROVIDED

    if isinstance(op, CONTRACTING):
        return True
    if isinstance(op, ops.RunSQL):  # the only way to drop a column the model no longer has
        statements = op.sql if isinstance(op.sql, (list, tuple)) else [op.sql]
        return any(CONTRACTING_SQL.search(str(statement)) for statement in statements)
    if isinstance(op, ops.AddField):  # a Python default is dropped from the column once the rows are filled
        return not op.field.null and op.field.db_default is NOT_PROVIDED and not op.field.many_to_many
    if isinstance(op, ops.AlterField) and old_field is not None:
        new = op.field
        keeps_a_default = new.null or new.db_default is not NOT_PROVIDED
        return (_column(old_field) != _column(new) or (old_field.null and not keeps_a_default)
                or (old_field.db_default is not NOT_PROVIDED and not keeps_a_default))
    return False


def breaking_operations(loader: MigrationLoader, key: tuple[str, str]):
    """The database operations of one migration that break the release before it, each judged on the state it
    finds (an AlterField against the field as the operations before it left it)."""
    app = key[0]
    state = loader.project_state(key, at_end=False)
    for operation in loader.disk_migrations[key].operations:
        for op in database_operations(operation):
            old = state.models[app, op.model_name_lower].get_field(op.name) if isinstance(op, ops.AlterField) else None
            if breaks_the_release_before(op, old) or (isinstance(op, ops.RunPython) and key not in REVIEWED_RUNPYTHON):
                yield op
        operation.state_forwards(app, state)


def test_no_migration_breaks_the_release_before_it():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    ours = {"inference", "models_registry"}
    breaking = sorted(key for key in loader.disk_migrations if key[0] in ours
                      and any(True for _ in breaking_operations(loader, key)))
    assert set(breaking) <= BEFORE_ROLLING, breaking
    # A RunPython nobody has read is flagged like a DROP.
    unread = ("inference", "0010_depthjob_dtype_drop_task_id")
    reason = REVIEWED_RUNPYTHON.pop(unread)
    try:
        assert list(breaking_operations(loader, unread))
    finally:
        REVIEWED_RUNPYTHON[unread] = reason


def test_the_check_sees_what_would_break_a_rolling_deploy():
    from django.db import models

    assert breaks_the_release_before(ops.RunSQL("ALTER TABLE inference_depthjob DROP COLUMN task_id"))
    assert breaks_the_release_before(ops.AddField("depthjob", "x", models.CharField(max_length=4, default="")))
    assert not breaks_the_release_before(ops.AddField("depthjob", "x", models.CharField(max_length=4,
                                                                                          db_default="")))
    assert not breaks_the_release_before(ops.AddField("depthjob", "x", models.IntegerField(null=True)))
    assert breaks_the_release_before(ops.AlterModelTable("depthjob", "jobs"))
    assert breaks_the_release_before(ops.RunSQL("ALTER TABLE inference_depthjob DROP task_id"))  # PostgreSQL's form
    assert breaks_the_release_before(ops.RunSQL("ALTER TABLE t ALTER COLUMN c SET NOT NULL"))
    for relaxing in ("DROP INDEX i", "ALTER TABLE t ALTER COLUMN c DROP DEFAULT", "ALTER TABLE t DROP CONSTRAINT k",
                     "ALTER TABLE t ALTER COLUMN c DROP NOT NULL"):
        assert not breaks_the_release_before(ops.RunSQL(relaxing)), relaxing
    text = models.CharField(max_length=4, db_default="")
    for old, new, breaks in [
        (text, models.CharField(max_length=4, db_default="", db_column="renamed"), True),  # a column rename
        (models.CharField(max_length=4, null=True), models.CharField(max_length=4, default=""), True),  # NOT NULL now
        (text, models.CharField(max_length=4, default=""), True),  # its database default gone
        (text, models.CharField(max_length=8, db_default=""), False),  # wider
        (models.CharField(max_length=4), models.CharField(max_length=4, null=True), False),  # relaxed
    ]:
        old.set_attributes_from_name("x")
        new.set_attributes_from_name("x")
        assert breaks_the_release_before(ops.AlterField("depthjob", "x", new), old) is breaks, (old, new)


# The last migration of the release before this one: its processes run beside this release's while a fleet rolls over.
PREVIOUS_RELEASE = ("inference", "0009_depthjob_remove_task_id")


@pytest.mark.django_db(transaction=True)
def test_the_release_before_still_writes_and_reads_jobs_on_todays_schema():
    # 0009 once dropped task_id while the release before still wrote it, which failed every upload and every job
    # of a process not yet replaced. Today's schema must take the previous release's inserts, updates and reads.
    executor = MigrationExecutor(connection)
    assert executor.migration_plan(executor.loader.graph.leaf_nodes()) == []  # the schema is today's
    OldJob = executor.loader.project_state(PREVIOUS_RELEASE).apps.get_model("inference", "DepthJob")
    fields = {"image": "uploads/x.jpg", "image_sha256": "0" * 64, "image_size": 1, "model_name": "MiDaS_small",
              "colormap": "inferno"}
    old = OldJob.objects.create(**fields)
    OldJob.objects.filter(pk=old.pk).update(device="cpu", weights_format="pt")  # what its worker writes
    from inference.models import DepthJob

    new = DepthJob.objects.create(dtype="bfloat16", **fields)
    assert {job.pk: job.device for job in OldJob.objects.all()} == {old.pk: "cpu", new.pk: ""}
    assert {job.pk: job.dtype for job in DepthJob.objects.all()} == {old.pk: "", new.pk: "bfloat16"}


@pytest.mark.django_db(transaction=True)
def test_the_task_id_column_is_dropped_once_and_restored_on_the_way_back():
    """0010 drops what 0009 left in the database, and leaves a database that has no such column as it is."""
    import importlib

    migration = importlib.import_module("inference.migrations.0010_depthjob_dtype_drop_task_id")
    with connection.schema_editor() as editor:
        assert not migration._has_task_id(editor)
        migration.drop_task_id(None, editor)  # already gone (today's schema): nothing to do
        migration.restore_task_id(None, editor)
        assert migration._has_task_id(editor)
        migration.restore_task_id(None, editor)  # there: nothing to do
        features = connection.features
        if hasattr(features, "can_alter_table_drop_column"):  # SQLite before 3.35.5: the rebuild drops it instead
            saved = features.can_alter_table_drop_column
            features.can_alter_table_drop_column = False
            try:
                migration.drop_task_id(None, editor)
                assert migration._has_task_id(editor)
            finally:
                features.can_alter_table_drop_column = saved
        migration.drop_task_id(None, editor)
        assert not migration._has_task_id(editor)
