"""The mini-swe-agent adapter's budgets and refusals, without a server: the run's step budget reaches
mini-swe-agent's loop, and a 403 from the episode-bound URL ends it at once instead of being retried."""

from __future__ import annotations

import litellm
import pytest

from agents.agent import CommandResult, FrameworkEpisode, TaskView
from agents.mini_swe_agent_agent import MiniSweAgent, SessionEnded
from tests.bench.frameworks import parse_args


def episode(max_steps: int = 7) -> FrameworkEpisode:
    return FrameworkEpisode(
        task=TaskView("t-1", "Fix it."), model="sim", base_url="http://127.0.0.1:9/v1/episodes/s", api_key="s",
        max_steps=max_steps, time_limit_s=600, execute=lambda command, timeout_s=None: CommandResult("", 0, ""),
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["text", "tool_calls"])
def test_the_runs_budgets_bound_mini_swe_agents_loop_unless_the_run_overrides_them(mode):
    settings = MiniSweAgent(mode=mode).agent_settings(episode(max_steps=7))
    assert (settings["step_limit"], settings["wall_time_limit_seconds"]) == (7, 600)  # not its yaml's 0 (none)
    overridden = MiniSweAgent(mode=mode, agent={"step_limit": 3}).agent_settings(episode(max_steps=7))
    assert overridden["step_limit"] == 3 and overridden["cost_limit"] == 0


def refusing(status_code: int, calls: list):
    def completion(**kwargs):
        calls.append(kwargs["model"])
        raise litellm.exceptions.APIError(status_code, "episode 1 used its 7 turns", "openai", kwargs["model"])

    return completion


@pytest.mark.parametrize("mode", ["text", "tool_calls"])
def test_a_403_from_the_episode_bound_url_ends_the_loop_without_retrying(mode, monkeypatch):
    calls: list = []
    monkeypatch.setattr(litellm, "completion", refusing(403, calls))
    agent = MiniSweAgent(mode=mode)
    model = agent.model_class(**agent.model_config, model_name="openai/sim", cost_tracking="ignore_errors")
    with pytest.raises(SessionEnded, match="used its 7 turns"):
        model.query([{"role": "user", "content": "Fix it."}])
    assert calls == ["openai/sim"]  # once: mini-swe-agent's retries (minutes of back-off) never start


def test_the_framework_bench_parses_its_levels():
    args = parse_args(["--levels", "8,32", "--steps", "3", "--framework-threads", "16"])
    assert (args.levels, args.steps, args.framework_threads, args.web_threads) == ([8, 32], 3, 16, 0)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1"])
