"""The bash agent: prompts from templates, one bash block per reply, observations, history, submissions."""

import pytest

from agents.agent import AgentConfigError, CommandResult, TaskView, Turn, get_agent, submitted
from modelserving.replay_backend import replay_action

TASK = TaskView("calc-1", "add(2, 2) returns 5.", "/testbed")


def test_prompts_come_from_the_templates():
    agent = get_agent("bash")
    system, instance = agent.messages(TASK, [])
    assert system["role"] == "system" and "/testbed" in system["content"] and "MEGAFLOW_SUBMIT" in system["content"]
    assert instance == {
        "role": "user",
        "content": "Fix this issue in the repository at /testbed:\n\nadd(2, 2) returns 5.",
    }


def test_a_run_can_replace_any_template():
    agent = get_agent(
        "bash", {"instance_template": "Task $instance_id: $problem_statement", "system_template": "Be brief."}
    )
    assert [m["content"] for m in agent.messages(TASK, [])] == ["Be brief.", "Task calc-1: add(2, 2) returns 5."]


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"system_template": "Use $tools"}, "system_template: unknown placeholder $tools (allowed: $workdir)"),
        ({"instance_template": ""}, "instance_template: must be a non-empty string"),
        ({"observation_template": "cost: $5"}, "observation_template: invalid placeholder syntax"),
        ({"max_observation_chars": 10}, "max_observation_chars: must be a whole number of at least 100"),
        ({"temperature": 0.2}, "temperature: not an option of the bash agent"),
    ],
)
def test_a_bad_configuration_names_its_field(config, error):
    with pytest.raises(AgentConfigError) as caught:
        get_agent("bash", config)
    assert str(caught.value).startswith(error)


def test_an_unknown_agent_is_refused():
    with pytest.raises(AgentConfigError, match="agent_name: unknown agent 'swe-agent'; choose one of bash"):
        get_agent("swe-agent")


def test_exactly_one_bash_block_is_an_action():
    agent = get_agent("bash")
    assert agent.parse("Let me look.\n```bash\nls -la\ncat setup.py\n```\n").command == "ls -la\ncat setup.py"
    assert agent.parse(replay_action("--- a/x\n+++ b/x\n")).command.endswith("&& echo MEGAFLOW_SUBMIT")


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ("I think the bug is in add().", "it contained no bash code block"),
        ("```bash\nls\n```\nthen\n```bash\npwd\n```", "it contained 2 bash code blocks"),
        ("```python\nprint(1)\n```", "it contained no bash code block"),
        ("```bash\n\n```", "its bash code block was empty"),
    ],
)
def test_a_malformed_reply_becomes_feedback_not_a_crash(reply, problem):
    action = get_agent("bash").parse(reply)
    assert action.malformed and action.command is None
    assert action.feedback.startswith(f"Your reply could not be run: {problem}")


def test_observations_show_the_exit_code_the_output_and_how_a_command_ended():
    agent = get_agent("bash", {"max_observation_chars": 100})
    assert agent.output_limit == 100, "the sandbox cuts the output to what the agent shows"
    assert agent.observation(CommandResult("ok\n", 0)) == "<returncode>0</returncode>\n<output>\nok\n\n</output>"
    note = "[megaflow: command timed out after 3 s and was killed]"
    timed_out = agent.observation(CommandResult("x" * 10, 137, note))
    assert timed_out.startswith("<returncode>137</returncode>") and timed_out.endswith(note)


def test_old_turns_give_way_when_the_history_is_capped():
    history = [Turn(f"reply {index}", f"observation {index}") for index in range(5)]
    messages = get_agent("bash", {"max_history_turns": 2}).messages(TASK, history)
    assert [m["content"] for m in messages[2:]] == [
        "[3 earlier turns omitted to fit the context]", "reply 3", "observation 3", "reply 4", "observation 4",
    ]  # fmt: skip
    assert len(get_agent("bash").messages(TASK, history)) == 2 + 2 * 5


def test_a_submission_is_a_line_that_says_so():
    assert submitted("Applied.\nMEGAFLOW_SUBMIT\n")
    assert not submitted("echo MEGAFLOW_SUBMIT is how you finish")
