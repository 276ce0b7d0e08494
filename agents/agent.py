"""The Agent Service's one interface: what an agent does between a model and a sandbox.

An agent is a plain library object, not a service of its own: it turns a task and the episode's history into
the next prompt, parses a model reply into an action, and turns a command's result into the next observation.
The episode loop calls it inline in whichever worker holds the data (the env worker parses a reply right before
executing it), so a step costs two hops, model and environment (DESIGN.md, principle 2).

A framework agent (``FrameworkAgent``: mini-swe-agent, and adapters for OpenHands, SWE-agent or Qwen Code) is
the other kind: the framework owns its loop, so MegaFlow hands it two seams, an episode-bound model URL and a
command runner (``FrameworkEpisode``), and runs it as one long task (orchestrator/framework_loop.py).

Agents live in ``agents/<name>_agent.py`` and register with ``@register_agent("<name>")``; a run names its agent
(``Run.agent_name``) and configures it (``Run.agent_config``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megaflow_site.backend_registry import BackendRegistry

SUBMIT_MARKER = "MEGAFLOW_SUBMIT"


class AgentConfigError(ValueError):
    """A run's agent configuration is wrong; the message names the field."""


@dataclass(frozen=True)
class TaskView:
    """What an agent may know about its task: never the reference patch or the tests that grade it."""

    instance_id: str
    problem_statement: str
    workdir: str = "/testbed"


@dataclass(frozen=True)
class Turn:
    """One finished step, as the agent sees it: what the model said and what the sandbox answered."""

    reply: str
    observation: str


@dataclass(frozen=True)
class Action:
    """A parsed reply: the command to run, or, for a malformed reply, the feedback to show instead."""

    command: str | None
    feedback: str = ""

    @property
    def malformed(self) -> bool:
        return self.command is None


@dataclass(frozen=True)
class CommandResult:
    """The part of an environment's ExecResult an agent turns into an observation. ``output`` is already cut to
    the agent's ``output_limit`` by the sandbox (head and tail around a marker: the one truncation rule), and
    ``note`` is the sandbox's line on how the command ended when it did not just exit (``ExecResult.note``)."""

    output: str
    exit_code: int | None
    note: str = ""


def submitted(output: str) -> bool:
    """Whether a command's output says the agent is done: a line reading exactly MEGAFLOW_SUBMIT."""
    return any(line.strip() == SUBMIT_MARKER for line in output.splitlines())


class Agent(abc.ABC):
    name: str = ""
    # Bytes of a command's output the agent wants to see (head and tail); None: the sandbox's own cap.
    output_limit: int | None = None

    @abc.abstractmethod
    def messages(self, task: TaskView, history: list[Turn]) -> list[dict]:
        """The chat messages for the model's next turn."""

    @abc.abstractmethod
    def parse(self, reply: str) -> Action:
        """The action in a model reply; a malformed reply is an Action with feedback, never an exception."""

    @abc.abstractmethod
    def observation(self, result: CommandResult) -> str:
        """The text the model sees after its command ran."""

    def feedback_observation(self, action: Action) -> str:
        """The observation for a malformed reply: the feedback itself."""
        return action.feedback


@dataclass(frozen=True)
class FrameworkEpisode:
    """What a framework agent gets for one episode: the two seams through which a framework that owns its loop
    (mini-swe-agent, OpenHands, SWE-agent, Qwen Code) reaches MegaFlow, and the budgets it should keep.

    ``base_url``  an OpenAI-compatible base URL bound to this episode: point the framework's model at it (any
                  model client that takes a base URL works; ``api_key`` is the same secret, for clients that insist
                  on a key). Every call through it is a recorded turn of the episode, counted against its budgets.
    ``execute``   run a shell command in the episode's sandbox, through the Environment Service:
                  ``execute(command, timeout_s)`` → ``CommandResult``. It raises ``EpisodeStopped`` once the
                  episode has ended (cancelled, failed, or retried elsewhere).
    """

    task: TaskView
    model: str
    base_url: str
    api_key: str
    max_steps: int
    time_limit_s: int
    execute: Callable[[str, int | None], CommandResult]


@dataclass(frozen=True)
class FrameworkOutcome:
    """How a framework's loop ended: ``exit_status`` in the framework's words (``Submitted``, ``LimitsExceeded``),
    and ``error`` when it stopped on something that is not the agent's doing to grade (an exception)."""

    exit_status: str
    error: str = ""


class EpisodeStopped(Exception):
    """The episode a framework works on has ended; its loop should stop."""


class FrameworkAgent(abc.ABC):
    """An agent that runs a framework's own loop for a whole episode (orchestrator/framework_loop.py), instead
    of being called by MegaFlow's loop once per hop. Its constructor validates the run's ``agent_config``."""

    name: str = ""
    output_limit: int | None = None

    @abc.abstractmethod
    def run_episode(self, episode: FrameworkEpisode) -> FrameworkOutcome:
        """Run the framework until it submits, exhausts a budget or fails; it blocks for the whole episode."""


def drives_itself(agent: Agent | FrameworkAgent) -> bool:
    """Whether ``agent`` runs its own loop (a framework) rather than MegaFlow's hop by hop."""
    return isinstance(agent, FrameworkAgent)


_registry = BackendRegistry("agents", Path(__file__).parent, suffix="_agent")
register_agent = _registry.register
available_agents = _registry.names


def run_agent(name: str, agent_config: dict | None) -> Agent | FrameworkAgent:
    """The agent of a run; ``agent_config["sampling"]`` is the model's sampling parameters, not the agent's."""
    return get_agent(name, {key: value for key, value in (agent_config or {}).items() if key != "sampling"})


def get_agent(name: str, config: dict | None = None) -> Agent | FrameworkAgent:
    """An agent ``name`` configured by ``config`` (a run's agent_config); AgentConfigError for a bad one."""
    agent = _registry.load(name)
    if agent is None:
        raise AgentConfigError(f"agent_name: unknown agent {name!r}; choose one of {', '.join(available_agents())}")
    return agent(**(config or {}))
