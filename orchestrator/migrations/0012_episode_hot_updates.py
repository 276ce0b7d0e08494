"""Episodes updated in place: every hop moves an episode's ``updated_at`` (and its holder, its counts), and while
``updated_at`` was in an index (episode_status_updated) none of those updates could be heap-only (HOT), so each
wrote an entry into every index of the table and left a dead row version for every later lookup to walk past. The
status index now leaves ``updated_at`` out, and on PostgreSQL the table keeps 30% of each page free for the next
version of its rows (fillfactor 70), where a HOT update puts it. The foreign keys' own indexes go too: a composite
index leads with each. agents/README.md, "Where a step's time goes"."""

import django.db.models.deletion
from django.db import migrations, models

FILLFACTOR = 70


def fillfactor(value):
    def set_fillfactor(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            table = schema_editor.quote_name(apps.get_model("orchestrator", "Episode")._meta.db_table)
            schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = {value})")

    return set_fillfactor


class Migration(migrations.Migration):
    dependencies = [
        ("orchestrator", "0011_step_ids_packed"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="episode",
            name="episode_status_updated",
        ),
        migrations.AddIndex(
            model_name="episode",
            index=models.Index(fields=["status"], name="episode_status"),
        ),
        migrations.AlterField(
            model_name="episode",
            name="run",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="episodes",
                to="orchestrator.run",
            ),
        ),
        migrations.AlterField(
            model_name="step",
            name="episode",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="steps",
                to="orchestrator.episode",
            ),
        ),
        migrations.RunPython(fillfactor(FILLFACTOR), fillfactor(100)),
    ]
