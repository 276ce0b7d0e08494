"""mini-swe-agent (https://mini-swe-agent.com), unchanged, as a MegaFlow agent: ``agent_name: "mini-swe-agent"``.

Its own ``DefaultAgent`` loop runs the episode, with its own prompts (``mini.yaml`` for tool calling, its default,
or ``mini_textbased.yaml``), its own LiteLLM model class and its own parsing. MegaFlow replaces only the two seams
a framework has (agents/agent.py, ``FrameworkEpisode``):

- the model is LiteLLM's OpenAI provider pointed at the episode-bound base URL, so every call is a recorded turn;
- the environment is ``SandboxEnvironment`` below: each command runs in the episode's sandbox through the
  Environment Service; a command whose first output line is mini-swe-agent's submit marker (or MegaFlow's,
  MEGAFLOW_SUBMIT) submits.

``agent_config`` mirrors mini-swe-agent's own config file:

    mode       "tool_calls" (default) or "text"
    agent      overrides of its agent section (system_template, instance_template, step_limit, ...); step_limit
               defaults to the run's max_steps, wall_time_limit_seconds to its episode_time_limit_s
    model      overrides of its model section (observation_template, format_error_template, action_regex in text
               mode, model_kwargs such as temperature)

In text mode MegaFlow's own action format (a ```bash block) is accepted beside mini-swe-agent's
```mswea_bash_command block, so the replay model and built-in prompts work in either.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import yaml
from django.conf import settings
from pydantic import BaseModel, ValidationError

from agents.agent import (
    SUBMIT_MARKER,
    AgentConfigError,
    FrameworkAgent,
    FrameworkEpisode,
    FrameworkOutcome,
    register_agent,
)

# mini-swe-agent reads these at import: no banner on every worker start, its config dir under ours, and LiteLLM's
# cost map from its package (it would otherwise fetch it from the internet, which sandboxes and CI lack).
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("MSWEA_GLOBAL_CONFIG_DIR", str(settings.BASE_DIR / "var" / "mini-swe-agent"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from minisweagent.agents.default import AgentConfig, DefaultAgent  # noqa: E402
from minisweagent.config import builtin_config_dir  # noqa: E402
from minisweagent.exceptions import Submitted  # noqa: E402
from minisweagent.models.litellm_model import LitellmModel, LitellmModelConfig  # noqa: E402
from minisweagent.models.litellm_textbased_model import (  # noqa: E402
    LitellmTextbasedModel,
    LitellmTextbasedModelConfig,
)

MINI_SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


class SessionEnded(Exception):
    """The episode-bound URL refused a call for good (a 403: the episode ended or spent a budget)."""


class EpisodeBound:
    """A 403 from the episode-bound URL ends mini-swe-agent's loop at once. LiteLLM maps an OpenAI-compatible
    server's 403 to its generic ``APIError``, which mini-swe-agent retries ten times with back-off up to 60 s:
    minutes of a framework thread held, and ten more refused calls, for an episode that is over."""

    abort_exceptions = [*LitellmModel.abort_exceptions, SessionEnded]

    def _query(self, messages, **kwargs):
        try:
            return super()._query(messages, **kwargs)
        except litellm.exceptions.APIError as error:
            if getattr(error, "status_code", None) == 403:
                raise SessionEnded(error.message) from error
            raise


class EpisodeBoundModel(EpisodeBound, LitellmModel):
    pass


class EpisodeBoundTextbasedModel(EpisodeBound, LitellmTextbasedModel):
    pass


MODES = {
    "tool_calls": ("mini.yaml", EpisodeBoundModel, LitellmModelConfig),
    "text": ("mini_textbased.yaml", EpisodeBoundTextbasedModel, LitellmTextbasedModelConfig),
}
# Text mode: mini-swe-agent's fence, or MegaFlow's (DESIGN.md's action format).
TEXT_ACTION_REGEX = r"```(?:mswea_bash_command|bash)[ \t]*\n(.*?)\n```"
# Set by MegaFlow for every episode; a run cannot override them.
MANAGED_MODEL_FIELDS = {"model_name", "litellm_model_registry", "cost_tracking"}


class SandboxEnvironmentConfig(BaseModel):
    cwd: str = "/testbed"
    env: dict[str, str] = {}
    timeout: int = 60


class SandboxEnvironment:
    """mini-swe-agent's Environment protocol over the episode's sandbox (``FrameworkEpisode.execute``)."""

    def __init__(self, episode: FrameworkEpisode, **config):
        self.episode = episode
        self.config = SandboxEnvironmentConfig(cwd=episode.task.workdir, **config)

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        exports = "".join(f"export {name}={_quoted(value)}; " for name, value in self.config.env.items())
        result = self.episode.execute(exports + action.get("command", ""), timeout or self.config.timeout)
        output = {
            "output": result.output,
            "returncode": -1 if result.exit_code is None else result.exit_code,
            "exception_info": result.note,
        }
        lines = result.output.lstrip().splitlines()
        if lines and lines[0].strip() in (MINI_SUBMIT_MARKER, SUBMIT_MARKER) and result.exit_code == 0:
            submission = "\n".join(lines[1:])
            raise Submitted({"role": "exit", "content": submission,
                             "extra": {"exit_status": "Submitted", "submission": submission}})  # fmt: skip
        return output

    def get_template_vars(self, **kwargs) -> dict[str, Any]:
        # The sandbox's system, for mini-swe-agent's prompt: MegaFlow's sandboxes are Linux on this machine's CPU.
        system = {"system": "Linux", "release": "", "version": "", "machine": platform.machine()}
        return {**self.config.model_dump(), **system, **kwargs}

    def serialize(self) -> dict:
        return {"info": {"config": {"environment": self.config.model_dump(mode="json"),
                                    "environment_type": f"{__name__}.SandboxEnvironment"}}}  # fmt: skip


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


@register_agent("mini-swe-agent")
class MiniSweAgent(FrameworkAgent):
    def __init__(self, mode: str = "tool_calls", agent: dict | None = None, model: dict | None = None, **unknown):
        if unknown:
            raise AgentConfigError(f"{sorted(unknown)[0]}: not an option of mini-swe-agent (mode, agent, model)")
        if mode not in MODES:
            raise AgentConfigError(f"mode: must be one of {', '.join(MODES)}, not {mode!r}")
        config_file, self.model_class, model_config = MODES[mode]
        defaults = yaml.safe_load((builtin_config_dir / config_file).read_text())
        # mini-swe-agent's own defaults (its yaml sets step_limit: 0, no limit), then the run's budgets, then the
        # run's explicit overrides: the defaults must not undo the budgets (run_episode).
        self.agent_defaults, self.agent_overrides = defaults["agent"], _section("agent", agent)
        self.agent_config = {**self.agent_defaults, **self.agent_overrides}
        self.model_config = {**defaults["model"], **_section("model", model)}
        self.environment_config = {"env": defaults.get("environment", {}).get("env", {})}
        if mode == "text":
            self.model_config.setdefault("action_regex", TEXT_ACTION_REGEX)
        if managed := MANAGED_MODEL_FIELDS & set(self.model_config):
            raise AgentConfigError(f"model.{sorted(managed)[0]}: set by MegaFlow for every episode")
        _validate("agent", AgentConfig, self.agent_config)
        _validate("model", model_config, {**self.model_config, "model_name": "checked"})
        self.mode = mode

    def run_episode(self, episode: FrameworkEpisode) -> FrameworkOutcome:
        model_kwargs = {
            **self.model_config.get("model_kwargs", {}),
            "api_base": episode.base_url,
            "api_key": episode.api_key,
            "timeout": settings.MEGAFLOW_GATEWAY_TIMEOUT_S,
        }
        model = self.model_class(
            **{**self.model_config, "model_kwargs": model_kwargs},
            model_name=f"openai/{episode.model}",
            cost_tracking="ignore_errors",  # a local model has no price; MegaFlow counts tokens itself
        )
        environment = SandboxEnvironment(episode, **self.environment_config)
        agent = DefaultAgent(model, environment, **self.agent_settings(episode))
        try:
            info = agent.run(task=episode.task.problem_statement)
        except Exception as error:  # noqa: BLE001 - whatever stopped the framework is the episode's failure reason
            return FrameworkOutcome(type(error).__name__, error=f"{type(error).__name__}: {error}")
        return FrameworkOutcome(info.get("exit_status", ""))

    def agent_settings(self, episode: FrameworkEpisode) -> dict:
        """mini-swe-agent's agent section for this episode: the run's step and wall-clock budgets unless the run's
        agent_config overrides them; no cost limit (MegaFlow counts tokens) and no trajectory file."""
        return {
            **self.agent_defaults,
            "step_limit": episode.max_steps,
            "wall_time_limit_seconds": episode.time_limit_s,
            **self.agent_overrides,
            "cost_limit": 0,
            "output_path": None,
        }


def _section(name: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AgentConfigError(f"{name}: must be an object of mini-swe-agent's {name} settings")
    return value


def _validate(section: str, config_class: type[BaseModel], values: dict) -> None:
    unknown = set(values) - set(config_class.model_fields) - {"mode"}  # mode: its interactive agent's, unused
    if unknown:
        raise AgentConfigError(f"{section}.{sorted(unknown)[0]}: not a mini-swe-agent {section} setting")
    try:
        config_class(**values)
    except ValidationError as error:
        first = error.errors()[0]
        raise AgentConfigError(f"{section}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
