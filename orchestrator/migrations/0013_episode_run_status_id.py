"""A run's episodes by status, then in id order: admission takes the oldest queued ones a page at a time from this
index (orchestrator/runs._ready) instead of reading every queued episode of the run on each pass."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestrator", "0012_episode_hot_updates"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="episode",
            name="episode_run_status",
        ),
        migrations.AddIndex(
            model_name="episode",
            index=models.Index(fields=["run", "status", "id"], name="episode_run_status_id"),
        ),
    ]
