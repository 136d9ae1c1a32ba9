"""DepthJob.task_id leaves the model, not yet the database.

Nothing read the id, and writing it cost the upload request an UPDATE. The column stays in this release with a
database default of '' so that the release before keeps working beside this one while a fleet rolls over: its
processes still insert and read task_id, and this release's inserts, which no longer name it, get the default.
(Dropping the column here failed every upload and every job of a process of the release before the moment it
ran.) A later release, once no such process runs, drops it; a database where an earlier draft of this
migration already dropped it is then left as it is.
"""
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('inference', '0008_depthjob_pixels_sha256'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.AlterField(
                    model_name='depthjob',
                    name='task_id',
                    field=models.CharField(blank=True, db_default='', max_length=64,
                                           help_text='django-q2 task id, for debugging only.'),
                ),
            ],
            state_operations=[
                migrations.RemoveField(
                    model_name='depthjob',
                    name='task_id',
                ),
            ],
        ),
    ]
