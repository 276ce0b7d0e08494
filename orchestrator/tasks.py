"""Celery tasks of the control plane and the episode loop: thin wrappers over orchestrator/runs.py and
orchestrator/episode_loop.py.

The control plane runs on the ``agent`` queue. The episode loop's hops run where their data is: the name's
package prefix routes them (``envs.*`` to ``env.<pool>``, ``modelserving.*`` to ``model.<model>``), so they are
declared here, beside the loop they drive, while the service packages stay free of the episode lifecycle.
"""

from megaflow_site.megaflow_task import megaflow_task, queue_of, run_batch
from orchestrator import autoscale as autoscaler
from orchestrator import episode_loop, framework_loop, replies, runs

# --- control plane (queue agent) ---------------------------------------------------------------------------------


@megaflow_task("orchestrator.start_run")
def start_run(run_id: int) -> int:
    return runs.start_run(run_id)


@megaflow_task("orchestrator.episode_done")
def episode_done(episode_id: int) -> None:
    runs.episode_done(episode_id)


@megaflow_task("orchestrator.admit")
def admit() -> list[int]:
    return runs.admit()


@megaflow_task("orchestrator.watchdog")
def watchdog() -> list[int]:
    return runs.watchdog()


@megaflow_task("orchestrator.autoscale")
def autoscale() -> dict:
    return autoscaler.tick()


@megaflow_task("orchestrator.deliver_reply")
def deliver_reply(result, inbox: str) -> None:
    """Link callback: push the linked task's return value into ``inbox`` (see orchestrator/replies.py)."""
    replies.deliver(inbox, result)


# --- the episode loop (queues env.<pool> and model.<model>) ----------------------------------------------------


@megaflow_task("envs.episode_start")
def episode_start(episode_id: int, pool: str, attempt: int | None = None, host: str = "") -> None:
    episode_loop.episode_start(episode_id, pool, attempt)  # host= routes it (megaflow_site/topology.py)


@megaflow_task("envs.episode_step")
def episode_step(
    episode_id: int,
    step: int,
    reply: str,
    pool: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    model_latency_s: float = 0.0,
    attempt: int | None = None,
    turn: dict | None = None,
    host: str = "",
) -> None:
    episode_loop.episode_step(episode_id, step, reply, prompt_tokens, completion_tokens, model_latency_s, attempt, turn)


@megaflow_task("modelserving.episode_turn")
def episode_turn(episode_id: int, step: int, model: str, attempt: int | None = None) -> None:
    episode_loop.episode_turn(episode_id, step, model, attempt)


# Several of the hops above in one message (megaflow_site/hop_batches.py): [name, kwargs, queued_at] each.


@megaflow_task("envs.hop_batch", bind=True)
def env_hop_batch(task, hops: list, pool: str, host: str = "") -> int:
    return run_batch(hops, queue_of(task))


@megaflow_task("modelserving.hop_batch", bind=True)
def model_hop_batch(task, hops: list, model: str) -> int:
    return run_batch(hops, queue_of(task))


@megaflow_task("orchestrator.hop_batch", bind=True)
def agent_hop_batch(task, hops: list) -> int:
    return run_batch(hops, queue_of(task))


# --- framework episodes (queues agent.framework, env.<pool>, model.<model>; orchestrator/framework_loop.py) -----


@megaflow_task("agents.framework_episode")
def framework_episode(episode_id: int, attempt: int | None = None) -> None:
    framework_loop.framework_episode(episode_id, attempt)


@megaflow_task("envs.session_exec")
def session_exec(
    episode_id: int,
    attempt: int,
    command: str,
    timeout_s: int,
    reply_to: str,
    pool: str,
    host: str = "",
    output_limit: int | None = None,
) -> None:
    framework_loop.session_exec(episode_id, attempt, command, timeout_s, reply_to, output_limit)


@megaflow_task("envs.framework_evaluate")
def framework_evaluate(episode_id: int, attempt: int, pool: str, host: str = "") -> None:
    framework_loop.framework_evaluate(episode_id, attempt)


@megaflow_task("modelserving.session_turn")
def session_turn(model: str, episode_id: int, attempt: int, request: dict, reply_to: str) -> None:
    framework_loop.session_turn(model, episode_id, attempt, request, reply_to)
