"""The Agent Service's one interface: what an agent does between a model and a sandbox.

An agent is a plain library object, not a service of its own: it turns a task and the episode's history into
the next prompt, parses a model reply into an action, and turns a command's result into the next observation.
The episode loop calls it inline in whichever worker holds the data (the env worker parses a reply right before
executing it), so a step costs two hops, model and environment (DESIGN.md, principle 2).

Agents live in ``agents/<name>_agent.py`` and register with ``@register_agent("<name>")``; a run names its agent
(``Run.agent_name``) and configures it (``Run.agent_config``).
"""

from __future__ import annotations

import abc
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


_registry = BackendRegistry("agents", Path(__file__).parent, suffix="_agent")
register_agent = _registry.register
available_agents = _registry.names


def run_agent(name: str, agent_config: dict | None) -> Agent:
    """The agent of a run; ``agent_config["sampling"]`` is the model's sampling parameters, not the agent's."""
    return get_agent(name, {key: value for key, value in (agent_config or {}).items() if key != "sampling"})


def get_agent(name: str, config: dict | None = None) -> Agent:
    """An agent ``name`` configured by ``config`` (a run's agent_config); AgentConfigError for a bad one."""
    agent = _registry.load(name)
    if agent is None:
        raise AgentConfigError(f"agent_name: unknown agent {name!r}; choose one of {', '.join(available_agents())}")
    return agent(**(config or {}))
