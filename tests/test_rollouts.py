"""Trainer-grade rollouts (issue #15): token in / token out per turn, the streaming rollouts API with its
cursor and complete groups, model versions, and a toy GRPO loop through orchestrator/client.py run from
another process against the real stack (real workers, Redis, PostgreSQL, Docker, the tiny model in the hf
backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import docker
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from modelserving.backend import GenerationRequest, SamplingParams, get_backend
from modelserving.hf_backend import HFBackend
from modelserving.token_prompts import PreviousTurn, next_prompt
from orchestrator import rollouts
from orchestrator.models import Dataset, Episode, ModelVersion, Run, Step, Task
from tests.support.stream_cutter import StreamCutter
from tests.support.tiny_model import TINY_AGENT_CONFIG

REPO = Path(__file__).resolve().parent.parent
# The tiny model's agent config without the history cut: the conversation only grows, token in / token out.
GROWING_AGENT_CONFIG = {key: value for key, value in TINY_AGENT_CONFIG.items() if key != "max_history_turns"}
GROWING_AGENT_CONFIG["sampling"] = {"max_tokens": 8, "temperature": 1.0}


def token_for(user: User) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def api_for(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def checkpoint(base: Path, path: Path, seed: int) -> Path:
    """Another version of the tiny model: its weights perturbed, the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def assert_aligned(rollout: dict) -> None:
    """The invariants a trainer relies on: one position per token in ids, mask and logprobs; the mask sums to
    the completion tokens; logprobs on model tokens only; every turn's prompt extends the one before exactly, and
    the turns add up to the response."""
    response, mask, logprobs = rollout["response_token_ids"], rollout["loss_mask"], rollout["logprobs"]
    assert len(response) == len(mask) == len(logprobs) > 0
    turns = rollout["turns"]
    assert sum(mask) == sum(len(turn["completion_ids"]) for turn in turns)
    assert all((lp is None) == (m == 0) for lp, m in zip(logprobs, mask, strict=True))
    assert all(lp <= 0 for lp in logprobs if lp is not None)
    seen = list(rollout["prompt_token_ids"])
    ids, masks, lps = [], [], []
    for turn in turns:
        if turn["index"] > 0:
            assert turn["prefix_consistent"] is True and turn["prompt_prefix_len"] == len(seen)
            ids += turn["prompt_ids"]
            masks += [0] * len(turn["prompt_ids"])
            lps += [None] * len(turn["prompt_ids"])
            seen += turn["prompt_ids"]
        assert len(turn["completion_ids"]) == len(turn["logprobs"])
        ids += turn["completion_ids"]
        masks += [1] * len(turn["completion_ids"])
        lps += turn["logprobs"]
        seen += turn["completion_ids"]
    assert (ids, masks, lps) == (response, mask, logprobs)


# --- token in, token out (the hf backend in this process) ----------------------------------------------------


@pytest.fixture(scope="module")
def hf(tiny_model) -> HFBackend:
    return HFBackend("tiny-hf", model_path=str(tiny_model), version="v0")


def test_the_next_prompt_extends_the_previous_ids_and_never_re_renders(hf):
    messages = [{"role": "system", "content": "Reply with bash."}, {"role": "user", "content": "Fix it."}]
    first = next_prompt(hf, messages, None)
    assert first.ids == hf.chat_token_ids(messages) and first.prefix_len == 0 and first.consistent is None
    sampling = SamplingParams(max_tokens=12, temperature=1.0, logprobs=True, seed=3)
    [generation] = hf.generate([GenerationRequest("a", messages, sampling, prompt_token_ids=first.ids)])
    assert len(generation.token_ids) == len(generation.logprobs) == generation.completion_tokens
    assert generation.model_version == "v0"
    if generation.finish_reason == "stop":
        assert generation.token_ids[-1] == hf.tokenizer.eos_token_id, "the end-of-turn token the model sampled"
    seen = first.ids + generation.token_ids
    grown = [*messages, {"role": "assistant", "content": generation.text}, {"role": "user", "content": "ok"}]
    second = next_prompt(hf, grown, PreviousTurn(messages, generation.text, seen))
    assert second.consistent is True and second.ids[: len(seen)] == seen and second.prefix_len == len(seen)
    assert second.new_messages == [{"role": "user", "content": "ok"}]
    assert hf.tokenizer.decode(second.appended_ids).endswith("<s>user\nok</s>\n<s>assistant\n")
    # An agent that rewrites its history cannot be extended: rendered whole, and said so.
    rewritten = [messages[0], {"role": "user", "content": "[1 earlier turns omitted]"}]
    third = next_prompt(hf, rewritten, PreviousTurn(grown, "x", second.ids + [5]))
    assert third.consistent is False and third.ids == hf.chat_token_ids(rewritten)
    assert 0 < third.prefix_len < len(third.ids) and third.ids[: third.prefix_len] == second.ids[: third.prefix_len]


def test_new_weights_are_swapped_in_between_batches_and_a_bad_checkpoint_changes_nothing(hf, tmp_path, tiny_model):
    from modelserving.backend import ModelError

    with pytest.raises(ModelError, match="cannot load weights"):
        hf.load_version("v9", str(tmp_path / "missing"))
    assert hf.version == "v0"
    hf.load_version("v1", str(checkpoint(tiny_model, tmp_path / "v1", seed=1)))
    [generation] = hf.generate(
        [GenerationRequest("b", [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))]
    )
    assert generation.model_version == hf.version == "v1"


@pytest.mark.integration
def test_the_openai_backend_grows_prompts_token_in_token_out_exactly_as_hf_does(tiny_model, tiny_model_server):
    """The same tiny model behind hf_server, through the openai backend (the vLLM path: /tokenize, token-id prompts
    on /v1/completions): the same prompt ids, the same greedy completion ids and logprobs, the same delta."""
    hf = HFBackend("tiny-hf", model_path=str(tiny_model))  # the base weights, as the server has them
    tiny = get_backend("tiny")
    assert tiny.tokenizes, "hf_server answers /tokenize as vLLM does"
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Reply with bash."}, {"role": "user", "content": "Fix it."}]
    assert tiny.chat_token_ids(messages, tools=tools) == hf.chat_token_ids(messages, tools=tools)
    assert tiny.text_token_ids("Fix it.") == hf.text_token_ids("Fix it.")
    first = next_prompt(tiny, messages, None)
    assert first.ids == hf.chat_token_ids(messages) and first.prefix_len == 0
    sampling = SamplingParams(max_tokens=10, logprobs=True)  # greedy: both must pick the same tokens
    [served] = tiny.generate([GenerationRequest("a", messages, sampling, prompt_token_ids=first.ids)])
    [local] = hf.generate([GenerationRequest("a", messages, sampling, prompt_token_ids=first.ids)])
    assert served.token_ids == local.token_ids and len(served.token_ids) == served.completion_tokens > 0
    assert served.logprobs == pytest.approx(local.logprobs, abs=1e-4) and served.top_logprobs is None
    assert served.text == local.text and served.prompt_tokens == len(first.ids)
    seen = first.ids + served.token_ids
    grown = [*messages, {"role": "assistant", "content": served.text}, {"role": "user", "content": "ok"}]
    second = next_prompt(tiny, grown, PreviousTurn(messages, served.text, seen))
    assert second.consistent is True and second.prefix_len == len(seen) and second.ids[: len(seen)] == seen
    assert second.ids == next_prompt(hf, grown, PreviousTurn(messages, local.text, seen)).ids


# --- lines, cursors and the API's 4xx (rows written here, no workers) --------------------------------------------


def ended_episode(run: Run, task: Task, sample: int, reward: float | None, turns: list[tuple]) -> Episode:
    status = Episode.Status.SUCCEEDED if reward is not None else Episode.Status.FAILED
    episode = Episode.objects.create(run=run, task=task, sample_index=sample, status=status, reward=reward,
                                     failure_reason="" if reward is not None else "sandbox gone",
                                     finished_at=timezone.now())  # fmt: skip
    for index, (prefix, appended, completion, version) in enumerate(turns):
        Step.objects.create(
            episode=episode, index=index, model_output="x", action="echo MEGAFLOW_SUBMIT" if index else "ls",
            observation="MEGAFLOW_SUBMIT" if index else "", prompt_prefix_len=prefix, prompt_ids=appended,
            completion_ids=completion, logprobs=[-0.5] * len(completion), prefix_consistent=True if index else None,
            model_name="sim", model_version=version, completed_at=timezone.now(),
        )  # fmt: skip
    return episode


@pytest.fixture
def two_groups(db):
    dataset = Dataset.objects.create(name="lines")
    tasks = [Task.objects.create(dataset=dataset, instance_id=f"t{i}", problem_statement="p", test_command="true")
             for i in range(2)]  # fmt: skip
    owner = User.objects.create_user("trainer", password="x" * 12)
    run = Run.objects.create(dataset=dataset, model_name="sim", samples_per_task=2, owner=owner,
                             status=Run.Status.COMPLETED)  # fmt: skip
    for task in tasks:
        for sample in range(2):
            masked = task == tasks[1] and sample == 1
            turns = [(0, [1, 2, 3], [4, 5], "v0"), (5, [6, 7], [8, 2], "v1")]
            ended_episode(run, task, sample, None if masked else float(sample), turns)
    return run, owner


def test_rollout_lines_line_up_and_a_cursor_resumes_without_loss_or_duplicates(two_groups, settings):
    settings.MEGAFLOW_ROLLOUTS_SETTLE_S = 0
    run, owner = two_groups
    lines = [json.loads(line) for line in rollouts.stream(run, follow=False, settle_s=0)]
    assert len(lines) == 4
    for line in lines:
        assert_aligned(line)
        assert line["prompt_token_ids"] == [1, 2, 3] and line["response_token_ids"] == [4, 5, 6, 7, 8, 2]
        assert line["loss_mask"] == [1, 1, 0, 0, 1, 1] and line["model_versions"] == ["v0", "v1"]
    failed = [line for line in lines if line["status"] == "failed"]
    assert [(line["mask"], line["reward"], line["stop_reason"]) for line in failed] == [(True, None, "error")]
    assert {line["stop_reason"] for line in lines if not line["mask"]} == {"submitted"}
    for cut in range(4):
        resumed = rollouts.stream(run, rollouts.Cursor.decode(lines[cut]["cursor"], run, False), follow=False,
                                  settle_s=0)  # fmt: skip
        assert [json.loads(line)["episode_id"] for line in resumed] == [line["episode_id"] for line in lines[cut + 1 :]]
    groups = [json.loads(line) for line in rollouts.stream(run, group_complete=True, follow=False, settle_s=0)]
    assert [(line["group"], line["sample_index"]) for line in groups] == sorted(
        (line["group"], line["sample_index"]) for line in lines
    )
    after_first = rollouts.Cursor.decode(groups[1]["cursor"], run, True)
    assert len(list(rollouts.stream(run, after_first, group_complete=True, follow=False, settle_s=0))) == 2

    api = api_for(owner)
    response = api.get(f"/api/v1/runs/{run.pk}/rollouts?follow=false")
    assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
    streamed = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [line["episode_id"] for line in streamed] == [line["episode_id"] for line in lines]
    bad = api.get(f"/api/v1/runs/{run.pk}/rollouts", {"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and "cursor" in bad.json()
    other_mode = api.get(f"/api/v1/runs/{run.pk}/rollouts", {"cursor": lines[0]["cursor"], "group_complete": "true"})
    assert other_mode.status_code == 400 and "group" in other_mode.json()["cursor"][0]
    foreign = Run.objects.create(dataset=run.dataset, model_name="sim", owner=owner)
    assert api.get(f"/api/v1/runs/{foreign.pk}/rollouts", {"cursor": lines[0]["cursor"]}).status_code == 400
    stranger = api_for(User.objects.create_user("stranger", password="x" * 12))
    assert stranger.get(f"/api/v1/runs/{run.pk}/rollouts").status_code == 404


def test_model_versions_refuse_bad_input_and_answer_retries_from_the_record(db):
    api = api_for(User.objects.create_user("trainer", password="x" * 12))
    assert api.post("/api/v1/models/nope/versions", {"version": "v1", "checkpoint_path": "/x"},
                    format="json").status_code == 404  # fmt: skip
    assert api.post("/api/v1/models/sim/versions", {"version": "bad name", "checkpoint_path": "/x"},
                    format="json").json().keys() == {"version"}  # fmt: skip
    ModelVersion.objects.create(model_name="sim", version="v1", checkpoint_path="/a", status="serving")
    retried = api.post("/api/v1/models/sim/versions", {"version": "v1", "checkpoint_path": "/a"}, format="json")
    assert retried.status_code == 200 and retried.json()["status"] == "serving"
    conflict = api.post("/api/v1/models/sim/versions", {"version": "v1", "checkpoint_path": "/b"}, format="json")
    assert conflict.status_code == 409
    listed = api.get("/api/v1/models/sim/versions").json()
    assert listed["current"] == "base" and [v["version"] for v in listed["versions"]] == ["v1"]
    dataset = Dataset.objects.create(name="d")
    Task.objects.create(dataset=dataset, instance_id="t", problem_statement="p", test_command="true")
    unknown = api.post("/api/v1/runs/", {"dataset": "d", "model_name": "sim", "model_version": "v7"}, format="json")
    assert unknown.status_code == 400 and "publish it first" in unknown.json()["model_version"][0]


# --- the real stack ---------------------------------------------------------------------------------------------


def kill_one_sandbox(run_ids_seen: list[int], stop: threading.Event, killed: list[int]) -> None:
    """Kill the sandbox of an episode of the first run while it runs, and again on each retry, until it has failed
    for it (its last attempt included). A kill that lands just after the episode's grading changes nothing, and
    another episode is tried."""
    from django.db import connection

    client = docker.from_env()
    killed_containers: set[str] = set()
    try:
        while not stop.is_set():
            if killed and Episode.objects.filter(pk__in=killed, status=Episode.Status.FAILED).exists():
                return
            if run_ids_seen:
                running = (
                    Episode.objects.filter(run_id=run_ids_seen[0], status=Episode.Status.RUNNING, step_count__gte=1)
                    .exclude(container_id="")
                    .exclude(container_id__in=killed_containers)
                )
                if killed and not Episode.objects.filter(pk=killed[-1], status__in=Episode.TERMINAL).exists():
                    running = running.filter(pk=killed[-1])  # stay on it: its next attempt is killed too
                for episode in running[:1]:
                    try:
                        client.containers.get(episode.container_id).kill()
                    except docker.errors.APIError:
                        continue
                    killed_containers.add(episode.container_id)
                    if episode.pk not in killed:
                        killed.append(episode.pk)
            time.sleep(0.02)
    finally:
        connection.close()


@pytest.mark.integration
@pytest.mark.timeout(600)  # 48 episodes in real containers: about 3 minutes on an idle 2-core machine
@pytest.mark.django_db(transaction=True)
def test_a_toy_grpo_loop_through_the_client_from_another_process(
    celery_workers, tiny_model, live_server, swe_mini, tmp_path
):
    trainer = User.objects.create_user("grpo", password="x" * 12)
    tasks = ["kvconf-1", "ledger-1", "textkit-2", "taskgraph-3"]
    paths = [checkpoint(tiny_model, settings.DATA_DIR / f"tiny-model-ckpt{seed}", seed) for seed in (1, 2)]
    out = tmp_path / "rollouts.jsonl"
    run_fields = {"agent_config": GROWING_AGENT_CONFIG, "max_steps": 2, "max_attempts": 2}
    host, port = live_server.url.removeprefix("http://").split(":")
    stop, killed, seen = threading.Event(), [], []

    def watch_runs() -> None:
        from django.db import connection

        while not stop.is_set() and not seen:
            seen.extend(Run.objects.filter(owner=trainer).values_list("pk", flat=True)[:1])
            time.sleep(0.05)
        connection.close()

    killer = threading.Thread(target=kill_one_sandbox, args=(seen, stop, killed))
    watchers = [threading.Thread(target=watch_runs), killer]
    with StreamCutter(host, int(port), cut_after=5_000) as cutter:
        for watcher in watchers:
            watcher.start()
        argv = [sys.executable, "-m", "tests.support.toy_grpo", "--url", live_server.url, "--cut-url", cutter.url,
                "--token", token_for(trainer), "--tasks", ",".join(tasks), "--samples", "4",
                "--checkpoints", f"{paths[0]},{paths[1]},{paths[0]}", "--run-fields", json.dumps(run_fields),
                "--out", str(out)]  # fmt: skip
        env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
        try:
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
        finally:
            stop.set()
            for watcher in watchers:
                watcher.join()
        assert done.returncode == 0, done.stderr[-3000:]
        assert cutter.cut_done == 1, "iteration 1's stream was cut once, mid-way, and resumed"

    consumed = [json.loads(line) for line in out.read_text().splitlines()]
    runs = {iteration: Run.objects.get(owner=trainer, name=f"grpo {iteration}") for iteration in range(3)}
    # Nothing lost or duplicated, the cut stream included: every episode of every run exactly once.
    keys = Counter((rollout["run_id"], rollout["episode_id"]) for rollout in consumed)
    assert set(keys.values()) == {1}
    assert set(keys) == {(run.pk, pk) for run in runs.values() for pk in run.episodes.values_list("pk", flat=True)}
    assert len(consumed) == 3 * 4 * 4
    by_group = defaultdict(list)
    for rollout in consumed:
        by_group[(rollout["run_id"], rollout["group"])].append(rollout)
    assert all(sorted(r["sample_index"] for r in group) == [0, 1, 2, 3] for group in by_group.values())
    reasons = {r["episode_id"]: (r["stop_reason"], r["failure_reason"]) for r in consumed if r["mask"]}
    masked = set(reasons)
    assert masked and masked <= set(killed), f"only the sandboxes killed mid-episode are masked: {killed} {reasons}"
    # A second attempt absorbs a one-off infrastructure failure on a loaded machine (a 30 s hard time limit here);
    # one that needed it says so, since on an idle machine none should.
    retried = {r["episode_id"]: r["attempt"] for r in consumed if r["attempt"] > 1 and r["episode_id"] not in killed}
    if retried:
        warnings.warn(f"episodes retried though no sandbox of theirs was killed: {retried}", stacklevel=1)
    for rollout in consumed:
        assert rollout["turns"], rollout
        if rollout["mask"]:
            assert rollout["reward"] is None and rollout["advantage"] is None, "dropped, not learnt as a 0"
            assert rollout["status"] == "failed" and rollout["failure_reason"]
            continue
        assert rollout["mask"] is False and rollout["reward"] == 0.0, "the tiny model solves nothing: a real 0"
        assert rollout["stop_reason"] in {"submitted", "max_steps"}
        assert_aligned(rollout)
        versions = {turn["model_version"] for turn in rollout["turns"]}
        assert versions == {rollout["submitted_version"]} == set(rollout["model_versions"])
        assert rollout["submitted_version"] == f"v{rollout['iteration']}"
    assert [ModelVersion.objects.get(model_name="tiny-hf", version=f"v{i}").status for i in (1, 2, 3)] == [
        "serving"
    ] * 3
    # The rows behind the lines: Step.model_input holds what each turn added, linearly.
    step = Step.objects.filter(episode__run=runs[0], index=1).first()
    assert step.model_input and all(message["role"] == "user" for message in step.model_input)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_version_switch_during_a_run_shows_in_the_turns(celery_workers, tiny_model, live_server, swe_mini):
    from orchestrator import model_versions

    path = checkpoint(tiny_model, settings.DATA_DIR / "tiny-model-ckpt3", seed=3)
    # Long enough (a step takes about a second here) that the publish lands while the episodes run.
    run = Run.objects.create(dataset=swe_mini, model_name="tiny-hf", env_pool="default", samples_per_task=2,
                             max_steps=12, agent_config=GROWING_AGENT_CONFIG, max_attempts=1)  # fmt: skip
    run.tasks.set(swe_mini.tasks.filter(instance_id="calendarx-1"))
    from celery import current_app

    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    deadline = time.monotonic() + 120
    while not Step.objects.filter(episode__run=run, index__gte=1).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    record, created = model_versions.publish("tiny-hf", "mid-run", str(path))
    assert created and record.status == "serving"
    while run.status not in Run.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    lines = [json.loads(line) for line in rollouts.stream(run, follow=False, settle_s=0)]
    switched = [line for line in lines if len(line["model_versions"]) == 2]
    assert switched, [line["model_versions"] for line in lines]
    for line in switched:
        versions = [turn["model_version"] for turn in line["turns"]]
        first_new = versions.index("mid-run")
        assert versions[:first_new] == [line["model_versions"][0]] * first_new
        assert versions[first_new:] == ["mid-run"] * (len(versions) - first_new), "never back to the old weights"
        assert_aligned(line)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_an_episode_on_an_openai_compatible_server_records_token_in_token_out(
    celery_workers, tiny_model_server, swe_mini
):
    """Episodes of "tiny" (hf_server through the openai backend, as a vLLM server is reached) record what the
    tiny-hf episodes record: prompt ids that extend the previous prompt + completion exactly, completion ids and
    their logprobs."""
    from tests.test_episode_loop import make_run, start_and_wait

    run = start_and_wait(make_run(swe_mini, ["calendarx-1"], model_name="tiny", samples_per_task=2, max_steps=3,
                                  agent_config=GROWING_AGENT_CONFIG, max_attempts=1))  # fmt: skip
    lines = [json.loads(line) for line in rollouts.stream(run, follow=False, settle_s=0)]
    assert len(lines) == 2
    for line in lines:
        assert (line["status"], line["mask"], line["token_ids_note"]) == ("succeeded", False, None), line
        assert len(line["turns"]) == 3 and line["model_versions"] == ["base"]
        assert {turn["model_name"] for turn in line["turns"]} == {"tiny"}
        assert_aligned(line)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_replay_run_exports_rollouts_with_null_ids_and_says_why(celery_workers, swe_mini, tmp_path):
    from tests.test_episode_loop import make_run, start_and_wait

    run = start_and_wait(make_run(swe_mini, ["textkit-1"]))
    out = tmp_path / "rollouts.jsonl"
    call_command("megaflow", "export", str(run.pk), "--format", "rollouts", "--out", str(out))
    [line] = [json.loads(text) for text in out.read_text().splitlines()]
    assert (line["status"], line["reward"], line["mask"], line["stop_reason"]) == ("succeeded", 1.0, False, "submitted")
    for field in ("prompt_token_ids", "response_token_ids", "loss_mask", "logprobs"):
        assert line[field] is None
    assert "replay gave no token ids" in line["token_ids_note"]
    assert line["turns"][0]["completion_ids"] is None and line["model_versions"] == ["base"]
