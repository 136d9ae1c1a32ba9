"""A django-q2 schedule that re-queues depth jobs no worker is running (dead workers, lost tasks)."""
from django.db import migrations

NAME = "depth-jobs-recover"


def add_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.using(schema_editor.connection.alias).update_or_create(
        name=NAME,
        defaults={"func": "inference.tasks.depth_jobs_recover_task", "schedule_type": "I", "minutes": 2,
                  "repeats": -1},
    )


def remove_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.using(schema_editor.connection.alias).filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(add_schedule, remove_schedule)]
