"""Model backends: sim and replay, and the HTTP path against a real tiny model in a real OpenAI-compatible server."""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from envs import task_sandbox
from modelserving.backend import GenerationRequest, SamplingParams, UnknownModel, get_backend, model_config
from modelserving.openai_backend import OpenAIBackend
from modelserving.supervisor import read_metrics
from modelserving.tasks import publish_generation
from modelserving.token_prompts import PreviousTurn, next_prompt
from modelserving.tool_calls import extract_tool_calls, hermes_text, parse_hermes
from orchestrator import episode_loop
from orchestrator.models import Episode, Run, Task
from tests.support.fault_proxy import FaultProxy

BASH_BLOCK = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)


def ask(content: str, request_id: str = "r", history: list[dict] | None = None, **sampling) -> GenerationRequest:
    messages = [*(history or []), {"role": "user", "content": content}]
    return GenerationRequest(request_id, messages, SamplingParams(**sampling))


def test_model_names_select_their_backends(settings):
    assert model_config("replay") == {"backend": "replay"}
    assert model_config("sim")["backend"] == "sim"
    assert model_config("tiny")["backend"] == "openai"
    with pytest.raises(UnknownModel, match="unknown model 'gpt-nope'"):
        model_config("gpt-nope")


def test_sim_scripts_a_fixed_number_of_steps():
    sim = get_backend("sim")  # 3 steps (tests/session_env.py)
    history = []
    actions = []
    for step in range(3):
        [reply] = sim.generate([ask(f"observation {step}", history=history)])
        actions.append(BASH_BLOCK.search(reply.text).group(1))
        history += [{"role": "user", "content": f"observation {step}"}, {"role": "assistant", "content": reply.text}]
    assert actions == ["echo step 0", "echo step 1", "echo MEGAFLOW_SUBMIT"]


@pytest.mark.integration
@pytest.mark.django_db
def test_replay_plays_the_reference_solution_in_a_real_sandbox(docker_backend, swe_mini):
    task = swe_mini.tasks.get(instance_id="ledger-3")
    request = GenerationRequest(
        "r", [{"role": "user", "content": task.problem_statement}], context={"task_id": task.pk}
    )
    [reply] = get_backend("replay").generate([request])
    assert reply.text.startswith("# replay policy: applying the task's reference solution")
    sandbox_id = docker_backend.create(task_sandbox.sandbox_spec(task))
    try:
        task_sandbox.prepare(docker_backend, sandbox_id, task)
        result = docker_backend.exec(sandbox_id, BASH_BLOCK.search(reply.text).group(1), 60, workdir=task.workdir)
        assert result.output.strip() == "MEGAFLOW_SUBMIT"
        assert task_sandbox.evaluate(docker_backend, sandbox_id, task).reward == 1.0
    finally:
        docker_backend.destroy(sandbox_id)
    followup = ask("again", history=[{"role": "assistant", "content": reply.text}], request_id="r2")
    assert BASH_BLOCK.search(get_backend("replay").generate([followup])[0].text).group(1) == "echo MEGAFLOW_SUBMIT"


def test_replay_without_a_task_is_an_error_not_a_crash():
    [reply] = get_backend("replay").generate([ask("hello")])
    assert reply.finish_reason == "error" and "names no task" in reply.error


def test_a_model_without_a_queue_is_refused_at_publish():
    with pytest.raises(UnknownModel, match="unknown model 'gpt-nope'"):
        publish_generation("gpt-nope", [ask("hi").as_dict()])


@pytest.mark.django_db
def test_a_model_failure_is_recorded_on_the_episode(swe_mini, monkeypatch):
    """A run whose model is no longer served: the turn fails the episode with the reason, not retried, and its
    sandbox is released."""
    run = Run.objects.create(model_name="gpt-nope", status=Run.Status.RUNNING)
    episode = Episode.objects.create(run=run, task=swe_mini.tasks.first(), sample_index=0,
                                     status=Episode.Status.RUNNING, container_id="c-1")  # fmt: skip
    sent = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: sent.append((name, kwargs)))
    episode_loop.episode_turn(episode.pk, 0, "gpt-nope", attempt=1)
    episode.refresh_from_db()
    assert episode.status == Episode.Status.FAILED
    assert episode.failure_reason.startswith("model gpt-nope: unknown model 'gpt-nope'")
    assert [name for name, _ in sent] == ["envs.stop_sandbox", "orchestrator.episode_done"]


@pytest.mark.integration
def test_the_openai_backend_keeps_the_server_batching(tiny_model_server):
    backend = get_backend("tiny")
    before = read_metrics(tiny_model_server)
    requests = [ask(f"fix bug {index}", request_id=str(index), max_tokens=12) for index in range(24)]
    with ThreadPoolExecutor(8) as pool:  # like a worker's threads, each with a few requests
        batches = list(pool.map(backend.generate, [requests[i : i + 3] for i in range(0, 24, 3)]))
    generations = [generation for batch in batches for generation in batch]
    assert [generation.request_id for generation in generations] == [str(index) for index in range(24)]
    assert all(not g.error and g.prompt_tokens > 0 and 0 < g.completion_tokens <= 12 for g in generations)
    assert {g.finish_reason for g in generations} <= {"stop", "length"}
    after = read_metrics(tiny_model_server)
    served = after["megaflow:batch_size_sum"] - before["megaflow:batch_size_sum"]
    batches_run = after["megaflow:batch_size_count"] - before["megaflow:batch_size_count"]
    assert served == 24 and batches_run < 24, "the server saw requests together and batched them"


@pytest.mark.integration
def test_token_ids_and_logprobs_come_back_when_asked(tiny_model_server):
    [generation] = get_backend("tiny").generate([ask("hello", max_tokens=6, logprobs=True)])
    assert len(generation.token_ids) == len(generation.logprobs) == generation.completion_tokens
    assert all(logprob <= 0 for logprob in generation.logprobs)


@pytest.mark.integration
def test_a_prompt_over_the_context_length_is_a_clear_error(tiny_model_server):
    [generation] = get_backend("tiny").generate([ask("word " * 400, max_tokens=8)])
    assert generation.finish_reason == "error"
    assert generation.error.startswith("context length exceeded: This model's maximum context length is 256 tokens")


@pytest.mark.integration
def test_the_server_tokenizes_as_vllm_does_and_a_server_without_it_stays_text_only(tiny_model_server):
    def post(path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{tiny_model_server}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    messages = [{"role": "user", "content": "hello"}]
    status, chat = post("/tokenize", {"model": "tiny", "messages": messages, "add_generation_prompt": True})
    assert status == 200 and chat["count"] == len(chat["tokens"]) > 0 and chat["max_model_len"] == 256
    _, closed = post("/tokenize", {"model": "tiny", "messages": messages, "add_generation_prompt": False})
    assert chat["tokens"][: len(closed["tokens"])] == closed["tokens"] != chat["tokens"]
    _, text = post("/tokenize", {"model": "tiny", "prompt": "hello", "add_special_tokens": False})
    assert post("/detokenize", {"model": "tiny", "tokens": text["tokens"]}) == (200, {"prompt": "hello"})
    assert post("/tokenize", {"model": "nope", "prompt": "x"})[0] == 404
    assert post("/tokenize", {"model": "tiny"})[1]["error"]["message"].startswith("cannot tokenize this body")
    # No /tokenize there (this path has none): text only, and no ids invented.
    elsewhere = OpenAIBackend("tiny", base_url=f"{tiny_model_server}/elsewhere/v1", max_attempts=1)
    assert elsewhere.tokenizes is False and elsewhere._tokenizes is False, "asked once, the answer kept"
    assert next_prompt(elsewhere, messages, None).ids is None
    # A server down now is asked again next time rather than taken for text-only.
    down = OpenAIBackend("down", base_url="http://127.0.0.1:9/v1", max_attempts=1)
    assert down.tokenizes is False and down._tokenizes is None


def test_a_server_that_is_down_fails_after_bounded_retries(settings):
    backend = OpenAIBackend("down", base_url="http://127.0.0.1:9/v1", max_attempts=3, backoff_s=0.01)
    [generation] = backend.generate([ask("hello")])
    assert generation.error.startswith("model server http://127.0.0.1:9/v1 unreachable after 3 attempts: ConnectError")
    backend.close()


@pytest.mark.integration
def test_the_hf_backend_batches_in_process(tiny_model):
    from modelserving.hf_backend import HFBackend

    backend = HFBackend("tiny", model_path=str(tiny_model), max_batch=4)
    requests = [ask(f"q{index}", request_id=str(index), max_tokens=5, seed=index % 2) for index in range(6)]
    requests.append(ask("word " * 400, request_id="long", max_tokens=5))
    generations = backend.generate(requests)
    assert [g.request_id for g in generations] == ["0", "1", "2", "3", "4", "5", "long"]
    assert all(g.completion_tokens == len(g.token_ids) <= 5 for g in generations[:6])
    assert "maximum context length is 256 tokens" in generations[-1].error


@pytest.mark.integration
def test_the_server_answers_like_vllm(tiny_model_server):
    with urllib.request.urlopen(f"{tiny_model_server}/v1/models") as response:
        assert b'"id": "tiny"' in response.read()
    metrics = read_metrics(tiny_model_server)
    assert {"vllm:num_requests_running", "vllm:gpu_cache_usage_perc", "vllm:generation_tokens_total"} <= set(metrics)


def test_an_unknown_backend_option_is_an_error():
    from modelserving.backend import ModelError
    from modelserving.openai_backend import OpenAIBackend

    with pytest.raises(ModelError, match="backend 'openai' of model 'x' has no option.s. bogus"):
        OpenAIBackend("x", base_url="http://127.0.0.1:9/v1", bogus=1)


@pytest.fixture
def faulty_server(tiny_model_server):
    """The tiny model's server behind a fault-injecting proxy (tests/support/fault_proxy.py)."""
    with FaultProxy(tiny_model_server) as proxy:
        yield proxy


@pytest.mark.integration
def test_5xx_answers_are_retried_until_the_server_recovers(faulty_server):
    from modelserving.openai_backend import OpenAIBackend

    backend = OpenAIBackend("tiny", base_url=f"{faulty_server.url}/v1", max_attempts=4, backoff_s=0.01)
    try:
        faulty_server.inject(status=500, count=3)
        [generation] = backend.generate([ask("hello", max_tokens=3)])
        assert not generation.error, "three 500s, then success on the fourth attempt"
        assert faulty_server.pending == 0, "every injected 500 was answered"
        faulty_server.inject(status=503, count=4)
        [generation] = backend.generate([ask("hello", max_tokens=3)])
        assert generation.error == (
            f"model server {faulty_server.url}/v1 failed after 4 attempts: HTTP 503: injected fault: HTTP 503"
        )
    finally:
        backend.close()


@pytest.mark.integration
def test_a_hanging_server_times_out_and_is_retried(faulty_server):
    from modelserving.openai_backend import OpenAIBackend

    backend = OpenAIBackend("tiny", base_url=f"{faulty_server.url}/v1", max_attempts=2, backoff_s=0.01, timeout_s=1)
    try:
        faulty_server.inject(hang_s=3, count=1)
        began = time.monotonic()
        [generation] = backend.generate([ask("hello", max_tokens=3)])
        assert not generation.error, "the hung request timed out and the retry succeeded"
        assert time.monotonic() - began >= 1, "the first attempt hung until the client's timeout"
    finally:
        backend.close()


@pytest.mark.integration
@pytest.mark.django_db
def test_a_context_length_failure_is_recorded_on_the_episode(tiny_model_server, swe_mini, monkeypatch):
    from modelserving import service

    [generation] = service.generate("tiny", [ask("word " * 400)])
    assert generation.finish_reason == "error" and not generation.infrastructure_failure
    task = Task.objects.create(dataset=swe_mini, instance_id="long-1", problem_statement="word " * 400,
                               test_command="true", fail_to_pass=["t"], spec_sha256="1" * 64)  # fmt: skip
    run = Run.objects.create(model_name="tiny", status=Run.Status.RUNNING, max_attempts=3)
    episode = Episode.objects.create(run=run, task=task, sample_index=0, status=Episode.Status.RUNNING)
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: None)
    episode_loop.episode_turn(episode.pk, 0, "tiny", attempt=1)
    episode.refresh_from_db()
    assert (episode.status, episode.attempt) == (Episode.Status.FAILED, 1), "not retried"
    assert episode.failure_reason.startswith("model tiny: context length exceeded: This model's maximum context length")


# --- tool calls ---------------------------------------------------------------------------------------------

BASH = {"type": "function", "function": {"name": "bash", "parameters": {"properties": {"command": {"type": "string"}}}}}
SUBMIT = {"type": "function", "function": {"name": "submit"}}


def test_hermes_tool_calls_are_read_out_of_a_reply():
    text = 'Let me look.\n<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>\n' \
           '<tool_call>{"name": "submit", "arguments": "{}"}</tool_call>'  # fmt: skip
    content, calls = parse_hermes(text)
    assert content == "Let me look."
    assert [(call["type"], call["function"]) for call in calls] == [
        ("function", {"name": "bash", "arguments": '{"command": "ls"}'}),
        ("function", {"name": "submit", "arguments": "{}"}),
    ]
    assert len({call["id"] for call in calls}) == 2 and all(call["id"].startswith("call_") for call in calls)


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        '<tool_call>{"name": "bash", "arguments": {"command": "l',  # cut at max_tokens
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "bash", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "bash", "arguments": {}}</tool_call><tool_call>oops</tool_call>',
    ],
)
def test_a_reply_without_well_formed_calls_is_all_text(text):
    assert parse_hermes(text) == (text, [])


def test_tool_choice_decides_which_calls_a_reply_makes():
    both = hermes_text("bash", {"command": "ls"}) + hermes_text("submit", {})
    names = lambda calls: [call["function"]["name"] for call in calls]  # noqa: E731
    assert names(extract_tool_calls(both, [BASH, SUBMIT], "auto")[1]) == ["bash", "submit"]
    assert names(extract_tool_calls(both, [BASH, SUBMIT], "required", parallel_tool_calls=False)[1]) == ["bash"]
    assert names(extract_tool_calls(both, [BASH, SUBMIT], {"type": "function", "function": {"name": "submit"}})[1]) == [
        "submit"
    ]
    assert extract_tool_calls(both, [BASH, SUBMIT], "none") == (both, [])
    assert extract_tool_calls(both, None, None) == (both, []), "no tools declared: nothing is parsed"
    only_bash = hermes_text("bash", {"command": "ls"})
    named = {"type": "function", "function": {"name": "submit"}}
    assert extract_tool_calls(only_bash, [BASH, SUBMIT], named) == (only_bash, []), "never an invented call"


def test_sim_answers_tools_with_a_call_and_text_without():
    sim = get_backend("sim")
    request = ask("go", request_id="t")
    request.tools = [SUBMIT, BASH]
    request.tool_choice = {"type": "function", "function": {"name": "bash"}}
    [called] = sim.generate([request])
    assert called.finish_reason == "tool_calls" and called.text == ""
    assert [call["function"] for call in called.tool_calls] == [
        {"name": "bash", "arguments": '{"command": "echo step 0"}'}
    ]
    request.tool_choice = "none"
    [text] = sim.generate([request])
    assert text.tool_calls is None and "```bash\necho step 0\n```" in text.text


@pytest.mark.integration
def test_a_turn_after_a_tool_call_extends_the_previous_ids(tiny_model):
    """Token in, token out across a tool call: the tools rendered once, the call the model wrote kept as it
    sampled it, the tool's answer appended as the template's delta."""
    from modelserving.hf_backend import HFBackend

    hf = HFBackend("tiny", model_path=str(tiny_model), context_length=1024)
    messages = [{"role": "user", "content": "List the files."}]
    first = next_prompt(hf, messages, None, tools=[BASH])
    assert '"name": "bash"' in hf.tokenizer.decode(first.ids)
    reply = hermes_text("bash", {"command": "ls"})
    completion = [*hf.text_token_ids(reply), hf.tokenizer.eos_token_id]
    [call] = parse_hermes(reply)[1]
    previous = PreviousTurn(messages, "", first.ids + completion, tool_calls=[call])
    grown = [*messages, previous.reply_message, {"role": "tool", "tool_call_id": call["id"], "content": "setup.py"}]
    second = next_prompt(hf, grown, previous, tools=[BASH])
    assert second.consistent is True and second.ids[: len(previous.ids)] == previous.ids
    assert (
        hf.tokenizer.decode(second.appended_ids)
        == "\n<s>tool\n<tool_response>\nsetup.py\n</tool_response></s>\n<s>assistant\n"
    )
    assert second.ids == hf.chat_token_ids(grown, tools=[BASH]), "the same ids as rendering it whole"


def test_vllm_serve_is_told_the_models_tool_call_convention(monkeypatch):
    from modelserving import vllm_backend

    launched = {}

    class Recorder:
        def __init__(self, command, *args, **kwargs):
            launched["command"] = command

        def start(self):
            pass

    monkeypatch.setattr(vllm_backend, "ServerSupervisor", Recorder)
    vllm_backend.VLLMBackend("qwen", model_path="/models/qwen", port=8123, tool_call_parser="hermes")
    assert launched["command"][-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


def test_a_vllm_answer_is_read_with_its_tool_calls_ids_and_logprobs():
    """What vLLM (>= 0.10.2, ``return_token_ids``) answers, read into a generation: it cannot run here."""
    from modelserving.openai_backend import parse_completion

    call = {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    top = [{"token": "<tool_call>", "logprob": -0.1, "bytes": [60]}, {"token": "I", "logprob": -2.5, "bytes": [73]}]
    body = {
        "choices": [{
            "index": 0, "finish_reason": "tool_calls", "token_ids": [151657, 151658],
            "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            "logprobs": {"content": [{"token": "<tool_call>", "logprob": -0.1, "bytes": [60], "top_logprobs": top},
                                     {"token": "</tool_call>", "logprob": -0.2, "bytes": [60], "top_logprobs": top}]},
        }],
        "usage": {"prompt_tokens": 30, "completion_tokens": 2},
        "prompt_token_ids": list(range(30)),
    }  # fmt: skip
    generation = parse_completion("r", body, 0.1)
    assert generation.tool_calls == [call] and generation.text == "" and generation.finish_reason == "tool_calls"
    assert generation.token_ids == [151657, 151658] and generation.prompt_token_ids == list(range(30))
    assert generation.tokens == ["<tool_call>", "</tool_call>"] and generation.logprobs == [-0.1, -0.2]
    assert [other["token"] for other in generation.top_logprobs[0]] == ["<tool_call>", "I"]
    # Older servers' return_tokens_as_token_ids: ids in the tokens, no texts.
    body["choices"][0].pop("token_ids")
    for item in body["choices"][0]["logprobs"]["content"]:
        item["token"] = f"token_id:{151657 if item['logprob'] == -0.1 else 151658}"
    generation = parse_completion("r", body, 0.1)
    assert generation.token_ids == [151657, 151658] and generation.tokens is None
