"""The bash agent: one bash block per reply, run in the sandbox, its output shown back (DESIGN.md's action format).

Every prompt is a ``string.Template`` a run may replace through its ``agent_config``:

    system_template        the system message             $workdir
    instance_template      the first user message         $problem_statement $instance_id $workdir
    observation_template   after each command             $exit_code $output $note
    format_error_template  after a malformed reply        $problem

Templates are checked when the agent is made, so a bad placeholder fails the run's creation, not its episodes.
Other options: ``max_observation_chars`` (the sandbox keeps that much of a command's output, head and tail)
and ``max_history_turns`` (older turns give way to a one-line note, so long episodes fit the context window).
"""

from __future__ import annotations

import re
from string import Template

from agents.agent import Action, Agent, AgentConfigError, CommandResult, TaskView, Turn, register_agent

DEFAULT_SYSTEM = """\
You are a software engineer working in a sandboxed Linux shell. The repository is at $workdir.
Each reply must contain exactly one bash code block (```bash ... ```) with the commands to run next; you will see
their output. There is no network. When you are done, run: echo MEGAFLOW_SUBMIT"""

DEFAULT_INSTANCE = """\
Fix this issue in the repository at $workdir:

$problem_statement"""

DEFAULT_OBSERVATION = """\
<returncode>$exit_code</returncode>
<output>
$output
</output>$note"""

DEFAULT_FORMAT_ERROR = """\
Your reply could not be run: $problem
Reply with exactly one bash code block, for example:
```bash
ls
```"""

TEMPLATE_FIELDS = {
    "system_template": {"workdir"},
    "instance_template": {"problem_statement", "instance_id", "workdir"},
    "observation_template": {"exit_code", "output", "note"},
    "format_error_template": {"problem"},
}

_BASH_BLOCK = re.compile(r"```bash[ \t]*\n(.*?)```", re.DOTALL)


def _checked_template(field: str, text: object) -> Template:
    if not isinstance(text, str) or not text.strip():
        raise AgentConfigError(f"{field}: must be a non-empty string")
    template = Template(text)
    if not template.is_valid():
        raise AgentConfigError(f"{field}: invalid placeholder syntax (use $$ for a literal $)")
    unknown = set(template.get_identifiers()) - TEMPLATE_FIELDS[field]
    if unknown:
        allowed = ", ".join(f"${name}" for name in sorted(TEMPLATE_FIELDS[field]))
        raise AgentConfigError(f"{field}: unknown placeholder ${sorted(unknown)[0]} (allowed: {allowed})")
    return template


@register_agent("bash")
class BashAgent(Agent):
    def __init__(
        self,
        system_template: str = DEFAULT_SYSTEM,
        instance_template: str = DEFAULT_INSTANCE,
        observation_template: str = DEFAULT_OBSERVATION,
        format_error_template: str = DEFAULT_FORMAT_ERROR,
        max_observation_chars: int = 10_000,
        max_history_turns: int | None = None,
        **unknown,
    ):
        if unknown:
            raise AgentConfigError(f"{sorted(unknown)[0]}: not an option of the bash agent")
        self.system = _checked_template("system_template", system_template)
        self.instance = _checked_template("instance_template", instance_template)
        self.observation_template = _checked_template("observation_template", observation_template)
        self.format_error = _checked_template("format_error_template", format_error_template)
        if not isinstance(max_observation_chars, int) or max_observation_chars < 100:
            raise AgentConfigError("max_observation_chars: must be a whole number of at least 100")
        if max_history_turns is not None and (not isinstance(max_history_turns, int) or max_history_turns < 1):
            raise AgentConfigError("max_history_turns: must be a whole number of at least 1")
        self.output_limit = max_observation_chars
        self.max_history_turns = max_history_turns

    def messages(self, task: TaskView, history: list[Turn]) -> list[dict]:
        messages = [
            {"role": "system", "content": self.system.substitute(workdir=task.workdir)},
            {
                "role": "user",
                "content": self.instance.substitute(
                    problem_statement=task.problem_statement, instance_id=task.instance_id, workdir=task.workdir
                ),
            },
        ]
        kept = history
        if self.max_history_turns is not None and len(history) > self.max_history_turns:
            kept = history[-self.max_history_turns :]
            omitted = len(history) - len(kept)
            messages.append({"role": "user", "content": f"[{omitted} earlier turns omitted to fit the context]"})
        for turn in kept:
            messages += [{"role": "assistant", "content": turn.reply}, {"role": "user", "content": turn.observation}]
        return messages

    def parse(self, reply: str) -> Action:
        blocks = _BASH_BLOCK.findall(reply)
        if len(blocks) != 1:
            problem = (
                "it contained no bash code block" if not blocks else f"it contained {len(blocks)} bash code blocks"
            )
            return Action(None, self.format_error.substitute(problem=problem))
        command = blocks[0].strip()
        if not command:
            return Action(None, self.format_error.substitute(problem="its bash code block was empty"))
        return Action(command)

    def observation(self, result: CommandResult) -> str:
        note = f"\n{result.note}" if result.note else ""
        exit_code = "none" if result.exit_code is None else str(result.exit_code)
        return self.observation_template.substitute(exit_code=exit_code, output=result.output, note=note)
