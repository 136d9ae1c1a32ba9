"""DepthJob.dtype records the number format each result was computed in; the task_id column leaves the database.

dtype: DEPTHSITE_FP16 can now run a CPU worker with AMX in bfloat16, and result reuse must not hand that result to a
caller who did not accept 16-bit floats. A database default of '' lets the release before keep inserting jobs.

task_id: 0009 took it out of the model and left the column, so that the release before 0009, which still wrote
it, kept working beside 0009's release. The release before this one is 0009's, which never names it: the column
goes now. On SQLite it had to: any later change that rebuilds the table from the model (this AddField does) would
drop it silently anyway. A database where an early draft of 0009 already dropped it is left as it is.

A fleet must not skip 0009's release: from a release before it, roll over to 0009's first (or stop the old
processes before `release`), as docs/deploy.md says.
"""
from django.db import migrations, models

TABLE = "inference_depthjob"


def _has_task_id(schema_editor) -> bool:
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        return "task_id" in {column.name for column in connection.introspection.get_table_description(cursor, TABLE)}


def drop_task_id(apps, schema_editor):
    # SQLite before 3.35.5 has no usable DROP COLUMN: there the AddField below, which rebuilds the table from the
    # model, leaves the column out anyway.
    # (The flag is SQLite's own; every other backend drops columns.)
    if getattr(schema_editor.connection.features, "can_alter_table_drop_column", True) and _has_task_id(schema_editor):
        quote = schema_editor.quote_name
        schema_editor.execute(f"ALTER TABLE {quote(TABLE)} DROP COLUMN {quote('task_id')}")


def restore_task_id(apps, schema_editor):
    # What 0009 left: the column, empty by default, unknown to the model.
    if not _has_task_id(schema_editor):
        quote = schema_editor.quote_name
        schema_editor.execute(f"ALTER TABLE {quote(TABLE)} ADD COLUMN {quote('task_id')} varchar(64) NOT NULL DEFAULT ''")


class Migration(migrations.Migration):

    dependencies = [
        ('inference', '0009_depthjob_remove_task_id'),
    ]

    operations = [
        migrations.RunPython(drop_task_id, restore_task_id, elidable=False),
        migrations.AddField(
            model_name='depthjob',
            name='dtype',
            field=models.CharField(blank=True, db_default='', default='', help_text='The number format the network ran in: float32, or the 16-bit float DEPTHSITE_FP16 chose; empty for jobs from before it was recorded.', max_length=16),
        ),
    ]
