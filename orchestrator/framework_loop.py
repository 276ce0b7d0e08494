"""Episodes driven by an agent framework's own loop (mini-swe-agent; agents/agent.py, ``FrameworkAgent``).

A built-in agent is a library that orchestrator/episode_loop.py calls at each hop; a framework owns its loop and
blocks in it. So a framework episode is one long task on the ``agent.framework`` queue, and the framework reaches
MegaFlow only through two seams, each a message to the service that holds the data:

    envs.episode_start          env        sandbox up → agents.framework_episode (instead of the first model turn)
    agents.framework_episode    framework  open the episode-bound session, run the framework's loop, then
                                           evaluate, or record why it stopped
    modelserving.session_turn   model      one call through the episode-bound URL (modelserving/episode_gateway.py):
                                           prompt ids, generate, a Step row with the turn's tokens
    envs.session_exec           env        one of the framework's commands in the sandbox, added to the last step
    envs.framework_evaluate     env        grade the final tree (episode_loop.evaluate), release the sandbox

Each framework episode holds a framework worker's thread for its life (idle while the model or the sandbox
works) and each model call in flight a gateway thread; both must be sized to what is admitted, and then what bounds
how many run at once is CPU per turn (agents/README.md, "Framework agents", measured by ``make bench-frameworks``).
The hops borrow the episode loop's helpers (``_current``: the attempt fence and the hold; ``_over_time``;
``_sandbox_failed``), so that both kinds of episode end the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from django.conf import settings
from django.db import IntegrityError
from django.db.models import F
from django.utils import timezone

from agents.agent import CommandResult, EpisodeStopped, FrameworkEpisode, TaskView
from envs import service as env_service
from envs.backend import SandboxError
from megaflow_site import liveness
from modelserving import service as model_service
from modelserving.backend import Generation, GenerationRequest
from modelserving.token_prompts import PreviousTurn, TurnPrompt
from orchestrator import replies, sessions, transitions
from orchestrator.db import release_connection
from orchestrator.episode_loop import (
    Live,
    _current,
    _over_time,
    _sandbox_failed,
    agent_of_run,
    evaluate,
    finished,
    read_live,
    release,
    send,
)
from orchestrator.models import Episode, Step

logger = logging.getLogger("megaflow.frameworks")

# A command's reply may take its time limit, then the Environment Service's own time to answer.
EXEC_REPLY_MARGIN_S = 60


# --- the turns of a session ------------------------------------------------------------------------------------


def previous_turn(episode_id: int) -> PreviousTurn | None:
    """The session's last turn as the model saw and answered it: its whole conversation (rebuilt from each
    step's added messages), its reply as an assistant message, and its prompt + completion ids (None where a
    turn had none). None before the first turn."""
    rows = Step.objects.filter(episode_id=episode_id).order_by("index")
    messages: list[dict] = []
    ids: list[int] | None = []
    last = None
    for added, consistent, reply, calls, prefix_len, appended, completion in rows.values_list(
        "model_input", "prefix_consistent", "model_output", "tool_calls", "prompt_prefix_len", "prompt_ids",
        "completion_ids",
    ):  # fmt: skip
        if consistent and last is not None:
            messages = [*messages, last.reply_message, *added]
        else:
            messages = list(added)  # the first turn, or one rendered whole
        ids = None if ids is None or appended is None or completion is None else ids[: prefix_len or 0] + appended
        ids = None if ids is None else ids + completion
        last = PreviousTurn(messages, reply, None, tool_calls=calls)
    if last is None:
        return None
    return dataclasses.replace(last, ids=ids)


def record_turn(
    episode_id: int,
    attempt: int,
    prompt: TurnPrompt,
    generation: Generation,
    sampling: dict,
    model: str,
    tools: list | None,
) -> int | None:
    """The call as the next step of the episode, and its tokens counted against the episode's budget; None when
    the episode stopped running meanwhile (nothing is recorded then)."""
    now = timezone.now()
    fields = dict(
        model_input=prompt.new_messages,
        model_output=generation.text,
        tool_calls=generation.tool_calls or None,
        prompt_prefix_len=prompt.prefix_len,
        prompt_ids=prompt.appended_ids,
        completion_ids=generation.token_ids,
        logprobs=generation.logprobs,
        prefix_consistent=prompt.consistent,
        finish_reason=generation.finish_reason,
        sampling={**sampling, **({"tools": tools} if tools else {})},
        model_name=model,
        model_version=generation.model_version,
        model_latency_s=generation.latency_s,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        completed_at=now,  # a turn is whole once recorded; the commands it asks for add to it
    )
    for _ in range(3):  # two calls of one session at once race for the next index; the unique index decides
        index = Step.objects.filter(episode_id=episode_id).count()
        try:
            Step.objects.create(episode_id=episode_id, index=index, **fields)
            break
        except IntegrityError:
            continue
    else:
        return None
    counted = Episode.objects.filter(pk=episode_id, status=Episode.Status.RUNNING, attempt=attempt).update(
        step_count=F("step_count") + 1,
        prompt_tokens=F("prompt_tokens") + generation.prompt_tokens,
        completion_tokens=F("completion_tokens") + generation.completion_tokens,
        cost_prompt_tokens=F("cost_prompt_tokens") + generation.prompt_tokens,
        cost_completion_tokens=F("cost_completion_tokens") + generation.completion_tokens,
        model_s=F("model_s") + generation.latency_s,
        updated_at=now,
    )
    if not counted:
        Step.objects.filter(episode_id=episode_id, index=index).delete()
        return None
    return index


def record_command(episode_id: int, attempt: int, command: str, output: str, exit_code: int | None, seconds: float):
    """A command the framework ran, added to the episode's last turn (a reply with several tool calls runs
    several); False when the episode no longer runs this attempt."""
    step = Step.objects.filter(episode_id=episode_id).order_by("-index").only("pk", "action", "observation").first()
    if step is None or not Episode.objects.filter(pk=episode_id, attempt=attempt, status=Episode.Status.RUNNING).update(
        updated_at=timezone.now(), env_worker_s=F("env_worker_s") + seconds
    ):
        return False
    Step.objects.filter(pk=step.pk).update(
        action="\n".join(filter(None, [step.action, command])),
        observation="\n".join(filter(None, [step.observation, output])),
        exit_code=exit_code,
        env_latency_s=F("env_latency_s") + seconds if step.action else seconds,
        completed_at=timezone.now(),
    )
    return True


# --- queue agent.framework ---------------------------------------------------------------------------------------


def framework_episode(episode_id: int, attempt: int | None = None) -> None:
    episode = _current(episode_id, attempt)
    if episode is None or episode.status != Episode.Status.RUNNING:
        return
    secret = sessions.open_session(episode_id, episode.attempt)
    if secret is None:
        if _held_elsewhere(episode_id):
            return  # a redelivery (the visibility timeout) while the first delivery's framework still runs
        # A redelivery: the worker that ran this attempt's framework died with the framework's state in it.
        outcome = transitions.fail_or_retry(episode_id, "the worker running its framework agent died", True,
                                            attempt=episode.attempt)  # fmt: skip
        release(episode)
        if outcome is not transitions.Outcome.UNCHANGED:
            finished(episode_id)
        return
    run, task = episode.run, episode.task
    agent = agent_of_run(run.pk)
    seams = FrameworkEpisode(
        task=TaskView(task.instance_id, task.problem_statement, task.workdir),
        model=run.model_name,
        base_url=f"{settings.MEGAFLOW_GATEWAY_URL.rstrip('/')}/v1/episodes/{secret}",
        api_key=secret,
        max_steps=run.max_steps,
        time_limit_s=run.episode_time_limit_s,
        execute=lambda command, timeout_s=None: _execute(episode, command, timeout_s, agent.output_limit),
    )
    release_connection()  # the framework's loop holds no database connection while it thinks
    outcome = agent.run_episode(seams)
    logger.info("episode %s: %s ended its loop: %s %s", episode_id, agent.name, outcome.exit_status, outcome.error)
    _conclude(episode_id, episode.attempt, agent.name, outcome.error)


def _held_elsewhere(episode_id: int) -> bool:
    """Whether another task still runs this episode's framework: in this process (a redelivery can land on the
    worker that runs the first delivery) or in another living one."""
    if liveness.tasks_holding(episode_id) > 1:
        return True
    fleet = liveness.read_fleet()
    return any(episode_id in held for name, held in fleet.alive.items() if name != liveness.incarnation())


def _conclude(episode_id: int, attempt: int, agent: str, error: str) -> None:
    """After the framework's loop: grade the tree (it submitted or ran out of steps), or record why it stopped."""
    episode = read_live(episode_id)
    if episode is None or episode.is_terminal or episode.attempt != attempt:
        return  # cancelled, failed by a sandbox error, or retried while the framework ran
    run = episode.run
    if _over_time(episode):
        if transitions.fail(episode_id, f"wall-clock budget of {run.episode_time_limit_s} s exhausted",
                            Episode.Status.TIMED_OUT, attempt=attempt):  # fmt: skip
            finished(episode_id)
        release(episode)
    elif error and not _budget_spent(episode):
        if transitions.fail(episode_id, f"{agent}: {error}", attempt=attempt):
            finished(episode_id)
        release(episode)
    else:  # it submitted, or a budget ended it: the tree is graded as it stands
        send("envs.framework_evaluate", episode_id=episode_id, attempt=attempt, pool=run.env_pool,
             host=episode.env_host)  # fmt: skip


def _budget_spent(episode: Live) -> bool:
    """Whether the gateway refused the framework's call because the episode used its turns or tokens."""
    run = episode.run
    steps = Episode.objects.filter(pk=episode.id).values_list("step_count", flat=True).first() or 0
    tokens = episode.prompt_tokens + episode.completion_tokens
    return steps >= run.max_steps or (bool(run.max_episode_tokens) and tokens >= run.max_episode_tokens)


def _execute(episode: Live, command: str, timeout_s: int | None, output_limit: int | None) -> CommandResult:
    """The framework's command, run in the sandbox by the env worker on the host that holds it. The output limit
    travels with it, so that env workers never import a framework to learn it."""
    timeout_s = min(timeout_s or settings.MEGAFLOW_EXEC_TIMEOUT_S, settings.MEGAFLOW_EXEC_TIMEOUT_S)
    inbox = replies.new_inbox()
    send("envs.session_exec", episode_id=episode.id, attempt=episode.attempt, command=command, timeout_s=timeout_s,
         output_limit=output_limit, reply_to=inbox, pool=episode.run.env_pool, host=episode.env_host)  # fmt: skip
    reply = replies.wait_for_reply(inbox, timeout_s + EXEC_REPLY_MARGIN_S)
    if reply is None:
        raise EpisodeStopped(f"the Environment Service did not answer within {timeout_s + EXEC_REPLY_MARGIN_S} s")
    if reply.get("stopped"):
        raise EpisodeStopped(reply["stopped"])
    return CommandResult(reply["output"], reply["exit_code"], reply["note"])


# --- queue env.<pool> ------------------------------------------------------------------------------------------


def session_exec(
    episode_id: int, attempt: int, command: str, timeout_s: int, reply_to: str, output_limit: int | None = None
) -> None:
    """Run a framework's command in the episode's sandbox, record it on the episode's last turn, and answer."""
    began = time.monotonic()
    episode = _current(episode_id, attempt)
    if episode is None or episode.status != Episode.Status.RUNNING:
        replies.deliver(reply_to, {"stopped": f"episode {episode_id} no longer runs (attempt {attempt})"})
        return
    task = episode.task
    try:
        result = env_service.run_command(
            episode.container_id, command, min(timeout_s, task.timeout_s), task.workdir, output_limit
        )
    except SandboxError as error:
        replies.deliver(reply_to, {"stopped": f"the sandbox failed: {error.reason}"})
        _sandbox_failed(episode, error, episode.container_id)
        return
    if not record_command(episode_id, attempt, command, result.output, result.exit_code,
                                   time.monotonic() - began):  # fmt: skip
        replies.deliver(reply_to, {"stopped": f"episode {episode_id} stopped while the command ran"})
        return
    replies.deliver(reply_to, {"output": result.output, "exit_code": result.exit_code, "note": result.note})


def framework_evaluate(episode_id: int, attempt: int) -> None:
    episode = _current(episode_id, attempt)
    if episode is not None:
        evaluate(episode)


# --- queue model.<name> ----------------------------------------------------------------------------------------


def session_turn(model: str, episode_id: int, attempt: int, request: dict, reply_to: str) -> None:
    """One call through an episode-bound URL: its prompt as ids grown from the session's last turn (token in,
    token out, as for a built-in agent), the generation, and the turn recorded before the caller sees it."""
    episode = _current(episode_id, attempt)
    if episode is None or episode.status != Episode.Status.RUNNING:
        stopped = f"episode {episode_id} no longer runs: its session takes no more calls"
        replies.deliver(reply_to, [Generation(request["request_id"], finish_reason="error", error=stopped).as_dict()])
        return
    asked = GenerationRequest.from_dict(request)
    prompt = model_service.turn_prompt(model, asked.messages, previous_turn(episode_id), tools=asked.tools)
    # A trainer needs the sampling logprobs wherever the backend gives ids, whether or not the framework asked.
    sampling = dataclasses.replace(asked.sampling, logprobs=asked.sampling.logprobs or prompt.ids is not None)
    generation_request = dataclasses.replace(
        asked, sampling=sampling, context={"task_id": episode.task_id}, prompt_token_ids=prompt.ids
    )
    release_connection()  # nothing needs the database while the model works
    [generation] = model_service.generate(model, [generation_request])
    if not generation.error:
        recorded = record_turn(episode_id, attempt, prompt, generation, sampling.as_dict(), model, asked.tools)
        if recorded is None:
            generation = Generation(generation.request_id, finish_reason="error",
                                    error=f"episode {episode_id} stopped while the model worked")  # fmt: skip
    if not asked.sampling.logprobs:
        generation = dataclasses.replace(generation, logprobs=None)  # recorded for the trainer, not asked for here
    replies.deliver(reply_to, [generation.as_dict()])
