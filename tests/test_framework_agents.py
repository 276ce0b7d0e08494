"""Framework agents: real mini-swe-agent, unchanged, running MegaFlow episodes through the episode-bound gateway
(the live server), the model queue (the replay policy) and the Environment Service (real Docker sandboxes)."""

from __future__ import annotations

import json

import openai
import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from orchestrator import sessions
from orchestrator.models import Episode, Run
from tests.test_episode_loop import make_run, start_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def framework_worker(celery_workers, live_server):
    """The framework worker, pointed at this session's live server (the gateway its episodes' URLs name)."""
    queue = "agent.framework"
    if celery_workers.queue_env.get(queue, {}).get("MEGAFLOW_GATEWAY_URL") != live_server.url:
        celery_workers.queue_env[queue] = {"MEGAFLOW_GATEWAY_URL": live_server.url}
        celery_workers.restart(queue)
    return live_server.url


def assert_solved_by_the_framework(run: Run, tool_calls: bool) -> None:
    assert run.status == Run.Status.COMPLETED
    for episode in run.episodes.all():
        assert (episode.status, episode.reward) == (Episode.Status.SUCCEEDED, 1.0), episode.failure_reason
        assert episode.session_key  # a session was opened, and only its hash is kept
        [step] = episode.steps.all()
        assert "git apply" in step.action and "MEGAFLOW_SUBMIT" in step.observation
        assert step.model_name == "replay" and step.model_version == "base" and step.completed_at
        assert step.model_input[0]["role"] == "system"  # mini-swe-agent's own prompt, as the model saw it
        assert "Please solve this issue" in step.model_input[1]["content"]
        assert step.prompt_ids is None and step.completion_ids is None  # replay gives no ids; none are invented
        assert episode.step_count == 1 and episode.completion_tokens > 0
        if tool_calls:
            [call] = step.tool_calls
            assert call["function"]["name"] == "bash" and step.finish_reason == "tool_calls"
            assert "git apply" in json.loads(call["function"]["arguments"])["command"]
            assert step.sampling["tools"][0]["function"]["name"] == "bash"
        else:
            assert step.tool_calls is None and "```bash" in step.model_output


def test_mini_swe_agent_solves_swe_mini_with_tool_calls(framework_worker, swe_mini):
    run = make_run(swe_mini, ["kvconf-4", "textkit-1"], agent_name="mini-swe-agent")
    assert_solved_by_the_framework(start_and_wait(run), tool_calls=True)


def test_mini_swe_agent_solves_swe_mini_in_text_mode(framework_worker, swe_mini):
    run = make_run(swe_mini, ["ledger-3"], agent_name="mini-swe-agent", agent_config={"mode": "text"})
    assert_solved_by_the_framework(start_and_wait(run), tool_calls=False)


def episode_url(base: str, secret: str) -> str:
    return f"{base}/v1/episodes/{secret}"


def test_an_episode_bound_url_refuses_what_it_does_not_grant(framework_worker, swe_mini):
    """Driven with the openai SDK as a framework would: a running episode answers, a wrong model, n > 1, a
    foreign secret and an ended episode are refused in OpenAI's error shape, and nothing is half-recorded."""
    run = make_run(swe_mini, ["kvconf-4"], max_steps=2)
    run.status = Run.Status.RUNNING
    run.save()
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=0, status=Episode.Status.RUNNING)
    secret = sessions.open_session(episode.pk, episode.attempt)
    client = openai.OpenAI(base_url=episode_url(framework_worker, secret), api_key="ignored", max_retries=0)
    messages = [{"role": "user", "content": "Fix it."}]

    completion = client.chat.completions.create(model="replay", messages=messages)
    assert "git apply" in completion.choices[0].message.content
    assert [model.id for model in client.models.list()] == ["replay"]

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sim", messages=messages)
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="replay", messages=messages, n=2)
    assert caught.value.body["param"] == "n"

    foreign = openai.OpenAI(base_url=episode_url(framework_worker, "not-a-secret"), api_key="x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        foreign.chat.completions.create(model="replay", messages=messages)
    assert caught.value.body["code"] == "invalid_episode_token"

    # The second turn uses the last of its two: the third is refused before anything is generated.
    client.chat.completions.create(model="replay", messages=messages)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="replay", messages=messages)
    assert caught.value.body["code"] == "episode_budget_exhausted"

    Episode.objects.filter(pk=episode.pk).update(status=Episode.Status.CANCELLED)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="replay", messages=messages)
    assert caught.value.body["code"] == "episode_ended"
    episode.refresh_from_db()
    assert episode.step_count == 2 and list(episode.steps.values_list("index", flat=True)) == [0, 1]
    assert episode.steps.get(index=1).prefix_consistent is False  # the framework sent the first prompt again


def test_session_turns_grow_token_in_token_out_across_tool_calls(framework_worker, tiny_model, swe_mini):
    """A tokenizing backend behind an episode-bound URL: each call's prompt ids extend the previous call's
    prompt + completion (a tool call and its answer included), with logprobs recorded for the trainer whether
    or not the framework asked for them, and only what it asked for in the answer."""
    run = make_run(swe_mini, ["kvconf-4"], model_name="tiny-hf", max_steps=5)
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=0, status=Episode.Status.RUNNING)
    secret = sessions.open_session(episode.pk, episode.attempt)
    client = openai.OpenAI(base_url=episode_url(framework_worker, secret), api_key="ignored", max_retries=0)
    tools = [{"type": "function", "function": {"name": "bash", "description": "Run a command",
              "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]  # fmt: skip
    messages = [{"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "Fix kvconf."}]
    first = client.chat.completions.create(model="tiny-hf", messages=messages, tools=tools, max_tokens=6)
    assert first.choices[0].logprobs is None  # not asked for
    # The framework hands back the reply as it got it, then its tool call's answer, as agents do.
    call = {"id": "call_0", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    reply = {"role": "assistant", "content": first.choices[0].message.content, "tool_calls": [call]}
    step = episode.steps.get(index=0)
    step.tool_calls = [call]  # as if the model had called it: the next prompt must extend this turn exactly
    step.save()
    messages += [reply, {"role": "tool", "tool_call_id": "call_0", "content": "kvconf.py"}]
    second = client.chat.completions.create(model="tiny-hf", messages=messages, tools=tools, max_tokens=6,
                                            logprobs=True)  # fmt: skip
    assert len(second.choices[0].logprobs.content) == second.usage.completion_tokens

    turn0, turn1 = episode.steps.order_by("index")
    assert turn0.prompt_ids and turn0.completion_ids and len(turn0.logprobs) == len(turn0.completion_ids)
    assert turn1.prefix_consistent is True
    assert turn1.prompt_prefix_len == len(turn0.prompt_ids) + len(turn0.completion_ids)
    assert [message["role"] for message in turn1.model_input] == ["tool"]  # only what the call added
    assert turn1.model_name == "tiny-hf" and turn1.sampling["tools"] == tools
    episode.refresh_from_db()
    assert episode.step_count == 2
    assert episode.prompt_tokens == turn0.prompt_tokens + turn1.prompt_tokens > 0


def test_a_bad_mini_swe_agent_configuration_is_a_400_naming_the_field(db, swe_mini):
    api = APIClient()
    api.force_authenticate(User.objects.create_user("trainer"))
    base = {"dataset": swe_mini.name, "model_name": "replay", "agent_name": "mini-swe-agent"}
    for config, field in [({"mode": "chat"}, "mode"), ({"agent": {"step_limt": 3}}, "agent.step_limt"),
                          ({"model": {"model_name": "gpt-4"}}, "model.model_name")]:  # fmt: skip
        response = api.post("/api/v1/runs/", {**base, "agent_config": config}, format="json")
        assert response.status_code == 400, response.content
        assert field in json.dumps(response.json())


def test_a_session_secret_is_stored_only_as_its_hash_and_one_attempt_opens_one(db, swe_mini):
    run = make_run(swe_mini, ["kvconf-4"])
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=0, status=Episode.Status.RUNNING)
    secret = sessions.open_session(episode.pk, episode.attempt)
    episode.refresh_from_db()
    assert secret and secret not in episode.session_key and episode.session_key == sessions.session_key(secret)
    assert sessions.open_session(episode.pk, episode.attempt) is None  # a redelivery finds it open
    assert sessions.find_session(secret).episode_id == episode.pk
    assert sessions.find_session("") is None and sessions.find_session(secret + "x") is None
