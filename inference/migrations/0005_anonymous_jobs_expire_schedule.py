"""A django-q2 schedule that deletes anonymous jobs (and their files) older than DEPTHSITE_ANON_RETENTION."""
from django.db import migrations

NAME = "depth-jobs-expire-anonymous"


def add_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.using(schema_editor.connection.alias).update_or_create(
        name=NAME,
        defaults={"func": "inference.tasks.depth_jobs_expire_task", "schedule_type": "I", "minutes": 60,
                  "repeats": -1},
    )


def remove_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.using(schema_editor.connection.alias).filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0004_depthjob_quota_and_preview"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(add_schedule, remove_schedule)]
