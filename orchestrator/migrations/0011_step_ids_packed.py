"""A step's token ids and logprobs stored packed (orchestrator/packed.py) instead of as jsonb.

PostgreSQL cannot cast jsonb to bytea, so each column is added packed beside the old one, the rows that have ids
are copied over in chunks, and the old column is dropped and the new one takes its name. Reversible.
"""

from django.db import migrations
from django.db.models import Q

import orchestrator.packed

FIELDS = ("prompt_ids", "completion_ids", "logprobs")
CHUNK = 2000


def _copy(apps, source: str, target: str) -> None:
    Step = apps.get_model("orchestrator", "Step")
    with_ids = Q()
    for field in FIELDS:
        with_ids |= Q(**{f"{field}{source}__isnull": False})
    names = [f"{field}{suffix}" for field in FIELDS for suffix in (source, target)]
    batch = []
    for step in Step.objects.filter(with_ids).only("id", *names).iterator(chunk_size=CHUNK):
        for field in FIELDS:
            setattr(step, f"{field}{target}", getattr(step, f"{field}{source}"))
        batch.append(step)
        if len(batch) >= CHUNK:
            Step.objects.bulk_update(batch, [f"{field}{target}" for field in FIELDS])
            batch = []
    if batch:
        Step.objects.bulk_update(batch, [f"{field}{target}" for field in FIELDS])


def pack_ids(apps, schema_editor) -> None:
    _copy(apps, "", "_packed")


def unpack_ids(apps, schema_editor) -> None:
    _copy(apps, "_packed", "")


class Migration(migrations.Migration):
    dependencies = [
        ("orchestrator", "0010_run_max_staleness"),
    ]

    operations = [
        migrations.AddField(
            model_name="step",
            name="prompt_ids_packed",
            field=orchestrator.packed.PackedArrayField(
                blank=True, help_text="Ids appended after the shared prefix.", null=True, typecode="i"
            ),
        ),
        migrations.AddField(
            model_name="step",
            name="completion_ids_packed",
            field=orchestrator.packed.PackedArrayField(blank=True, null=True, typecode="i"),
        ),
        migrations.AddField(
            model_name="step",
            name="logprobs_packed",
            field=orchestrator.packed.PackedArrayField(
                blank=True, help_text="Sampling logprob of every completion id.", null=True, typecode="d"
            ),
        ),
        migrations.RunPython(pack_ids, unpack_ids, elidable=True),
        migrations.RemoveField(model_name="step", name="prompt_ids"),
        migrations.RemoveField(model_name="step", name="completion_ids"),
        migrations.RemoveField(model_name="step", name="logprobs"),
        migrations.RenameField(model_name="step", old_name="prompt_ids_packed", new_name="prompt_ids"),
        migrations.RenameField(model_name="step", old_name="completion_ids_packed", new_name="completion_ids"),
        migrations.RenameField(model_name="step", old_name="logprobs_packed", new_name="logprobs"),
    ]
