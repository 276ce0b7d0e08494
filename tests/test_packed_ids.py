"""A step's token ids and logprobs are stored packed (orchestrator/packed.py): 4 bytes an id, 8 a logprob, read
back through the ORM as the same lists, written by the hot path from the message's bytes without a list between.
Real database (PostgreSQL in CI), real migrations."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from orchestrator import episode_loop, hot_sql, packed
from orchestrator.models import Step
from tests.support.records import new_episode

pytestmark = pytest.mark.django_db

IDS = [0, 1, 151_643, 2**31 - 1, 7]
LOGPROBS = [-0.1234567890123456, 0.0, -1e-300, -23.5]


@pytest.fixture
def episode():
    return new_episode()


def stored_bytes(step_id: int, column: str) -> bytes:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM orchestrator_step WHERE id = %s", [step_id])
        return bytes(cursor.fetchone()[0])


def test_the_orm_reads_back_the_lists_it_wrote_and_stores_them_packed(episode):
    step = Step.objects.create(episode=episode, index=0, prompt_ids=IDS, completion_ids=[], logprobs=LOGPROBS)
    again = Step.objects.get(pk=step.pk)
    assert again.prompt_ids == IDS and again.completion_ids == [] and again.logprobs == LOGPROBS  # exact floats
    assert Step.objects.filter(pk=step.pk).values_list("prompt_ids", flat=True).get() == IDS
    assert len(stored_bytes(step.pk, "prompt_ids")) == 4 * len(IDS)
    assert len(stored_bytes(step.pk, "logprobs")) == 8 * len(LOGPROBS)
    assert Step.objects.create(episode=episode, index=1).prompt_ids is None
    assert Step.objects.get(episode=episode, index=1).logprobs is None


def test_what_a_turn_message_carries_is_stored_as_it_came_and_read_as_lists(episode):
    turn = {"prompt_ids": packed.to_wire(IDS, packed.INT32), "completion_ids": packed.to_wire([5, 6], packed.INT32),
            "logprobs": packed.to_wire([-0.5, -0.25], packed.FLOAT64), "model_name": "sim"}  # fmt: skip
    assert all(isinstance(turn[key], str) for key in episode_loop.PACKED_FIELDS)  # JSON-safe text on the wire
    values = episode_loop._turn(turn)
    assert values["prompt_ids"] == packed.pack(IDS, packed.INT32)  # bytes, never a list in between
    step_id = hot_sql.insert_step(episode.created_at, episode_id=episode.pk, index=0, **values)
    step = Step.objects.get(pk=step_id)
    assert (step.prompt_ids, step.completion_ids, step.logprobs) == (IDS, [5, 6], [-0.5, -0.25])
    assert hot_sql.turn_ids(episode.pk, 1) == IDS + [5, 6]  # what the next turn's prompt extends


def test_a_turns_ids_are_the_last_prompt_cut_to_its_prefix_then_what_it_added(episode):
    turns = [(None, [1, 2, 3], [4, 5]), (4, [6], [7, 8]), (2, [9], [10])]  # the second kept 4, the third 2
    for index, (prefix_len, appended, completion) in enumerate(turns):
        Step.objects.create(episode=episode, index=index, prompt_prefix_len=prefix_len, prompt_ids=appended,
                            completion_ids=completion)  # fmt: skip
    assert hot_sql.turn_ids(episode.pk, 1) == [1, 2, 3, 4, 5]
    assert hot_sql.turn_ids(episode.pk, 2) == [1, 2, 3, 4, 6, 7, 8]
    assert hot_sql.turn_ids(episode.pk, 3) == [1, 2, 9, 10]
    Step.objects.filter(episode=episode, index=1).update(completion_ids=None)  # a turn without ids
    assert hot_sql.turn_ids(episode.pk, 3) is None


def test_a_turn_published_before_ids_were_packed_is_still_recorded(episode):
    values = episode_loop._turn({"prompt_ids": [1, 2, 3], "completion_ids": [4], "logprobs": [-1.0]})
    step_id = hot_sql.insert_step(episode.created_at, episode_id=episode.pk, index=0, **values)
    assert Step.objects.get(pk=step_id).prompt_ids == [1, 2, 3]


def test_an_id_that_does_not_fit_and_bytes_that_are_not_base64_are_errors():
    with pytest.raises(OverflowError):
        packed.pack([2**31], packed.INT32)
    with pytest.raises(TypeError):
        packed.pack(["1"], packed.INT32)
    with pytest.raises(ValueError):
        packed.from_wire("not base64!")
    with pytest.raises(ValueError, match="typecode"):
        packed.PackedArrayField(typecode="q")


@pytest.mark.django_db(transaction=True)
def test_the_migration_packs_the_ids_of_existing_steps_and_unpacks_them_going_back():
    executor = MigrationExecutor(connection)
    before, after = [("orchestrator", "0010_run_max_staleness")], [("orchestrator", "0011_step_ids_packed")]
    executor.migrate(before)
    try:
        apps = executor.loader.project_state(before).apps
        old = apps.get_model("orchestrator", "Step")
        dataset = apps.get_model("orchestrator", "Dataset").objects.create(name="m")
        task = apps.get_model("orchestrator", "Task").objects.create(dataset=dataset, instance_id="t", test_command="x")
        run = apps.get_model("orchestrator", "Run").objects.create(model_name="sim")
        episode = apps.get_model("orchestrator", "Episode").objects.create(run=run, task=task, sample_index=0)
        old.objects.create(episode=episode, index=0, prompt_ids=IDS, completion_ids=[9], logprobs=LOGPROBS)
        old.objects.create(episode=episode, index=1)  # a turn without ids

        executor = MigrationExecutor(connection)
        executor.migrate(after)
        steps = {step.index: step for step in Step.objects.filter(episode_id=episode.pk)}
        assert (steps[0].prompt_ids, steps[0].completion_ids, steps[0].logprobs) == (IDS, [9], LOGPROBS)
        assert steps[1].prompt_ids is None and steps[1].logprobs is None

        executor = MigrationExecutor(connection)
        executor.migrate(before)
        apps = executor.loader.project_state(before).apps
        back = apps.get_model("orchestrator", "Step").objects.get(episode_id=episode.pk, index=0)
        assert (back.prompt_ids, back.completion_ids, back.logprobs) == (IDS, [9], LOGPROBS)
    finally:
        MigrationExecutor(connection).migrate(executor.loader.graph.leaf_nodes())
