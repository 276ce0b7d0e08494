"""The OpenAI-compatible gateway, driven by the official openai client: Django → model queue → model worker →
a real tiny model in a real OpenAI-compatible server (or in the worker itself), and back.

``sim`` answers tool-bearing requests with a Hermes tool call that the shared parser reads, as it reads a real
model's; ``tiny`` (the openai backend in front of hf_server) and ``tiny-hf`` (the hf backend in the worker) give
real token ids and logprobs."""

import json
import urllib.error
import urllib.request

import openai
import pytest
from django.contrib.auth.models import User
from rest_framework import exceptions
from rest_framework.authtoken.models import Token
from rest_framework.test import APIRequestFactory, force_authenticate
from transformers import AutoTokenizer

from modelserving.backend import Generation
from modelserving.gateway import ChatCompletionsView
from orchestrator import replies

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BASH = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    },
}
SUBMIT = {"type": "function", "function": {"name": "submit", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def client(live_server, celery_workers, tiny_model_server):
    user = User.objects.create_user("trainer")
    token = Token.objects.create(user=user)
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=token.key, max_retries=0, timeout=60)


def test_a_chat_completion_through_the_model_queue(client):
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Fix the failing test."}], max_tokens=10
    )
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 10


def test_streaming_returns_the_same_reply_in_chunks(client):
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_the_replay_model_answers_through_the_gateway_too(client):
    completion = client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "go"}])
    assert "```bash\necho step 0\n```" in completion.choices[0].message.content


def test_models_lists_every_served_model(client, settings):
    assert [model.id for model in client.models.list()] == settings.MEGAFLOW_MODELS


def test_an_unknown_model_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "unknown model 'gpt-nope'" in error["message"]


def test_a_prompt_over_the_context_length_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("temperature", 5, "less than or equal to 2"),
        ("n", 17, "less than or equal to 16"),
        ("stop", 7, "list of at most"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(client, field, value, reason):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **{field: value})
    assert caught.value.body["param"] == field and reason in caught.value.body["message"]


def test_a_bad_message_is_named_by_its_position(live_server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages[0].role"


def test_requests_without_a_valid_token_are_refused(live_server, client):
    bad = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    request = urllib.request.Request(
        f"{live_server.url}/v1/chat/completions", data=json.dumps({}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 401


def test_a_tool_call_round_trip(client):
    """A call with null content, sent back as the assistant's message (as the SDK dumps it, nulls and all) with
    the tool's answer, then the next call."""
    messages = [{"role": "user", "content": "Fix the failing test."}]
    first = client.chat.completions.create(model="sim", messages=messages, tools=[BASH, SUBMIT], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "bash"
    assert json.loads(call.function.arguments) == {"command": "echo step 0"}
    messages += [choice.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "step 0"}]
    second = client.chat.completions.create(model="sim", messages=messages, tools=[BASH, SUBMIT])
    assert json.loads(second.choices[0].message.tool_calls[0].function.arguments) == {"command": "echo step 1"}
    named = client.chat.completions.create(
        model="sim",
        messages=messages,
        tools=[BASH, SUBMIT],
        tool_choice={"type": "function", "function": {"name": "submit"}},
    )
    assert [call.function.name for call in named.choices[0].message.tool_calls] == ["submit"]
    text = client.chat.completions.create(model="sim", messages=messages, tools=[BASH], tool_choice="none")
    assert text.choices[0].message.tool_calls is None and text.choices[0].finish_reason == "stop"
    assert "```bash\necho step 1\n```" in text.choices[0].message.content


def test_tools_and_tool_turns_are_rendered_by_the_chat_template(client, tiny_model):
    """The hf backend renders the declared tools, the assistant's call and the tool's answer into the prompt
    (vLLM's ``return_token_ids`` shows the ids it saw)."""
    messages = [
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "setup.py"},
    ]  # fmt: skip
    completion = client.chat.completions.create(
        model="tiny-hf", messages=messages, tools=[BASH], max_tokens=4, extra_body={"return_token_ids": True}
    )
    prompt = AutoTokenizer.from_pretrained(tiny_model).decode(completion.prompt_token_ids)
    assert '{"type": "function", "function": {"name": "bash"' in prompt
    assert '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsetup.py\n</tool_response>" in prompt
    assert completion.usage.prompt_tokens == len(completion.prompt_token_ids)
    assert (
        completion.choices[0].token_ids and len(completion.choices[0].token_ids) == completion.usage.completion_tokens
    )


def test_the_openai_backend_passes_tools_to_its_server(client):
    question = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="tiny", messages=question, max_tokens=2)
    with_tool = client.chat.completions.create(model="tiny", messages=question, max_tokens=2, tools=[SUBMIT])
    assert with_tool.usage.prompt_tokens > plain.usage.prompt_tokens  # the server's template rendered the tool


def test_n_samples_are_one_batch_of_choices_reproducible_by_seed(client):
    ask = {"model": "tiny-hf", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
           "temperature": 1.0, "seed": 3, "n": 4, "extra_body": {"return_token_ids": True}}  # fmt: skip
    first = client.chat.completions.create(**ask)
    assert [choice.index for choice in first.choices] == [0, 1, 2, 3]
    samples = [choice.token_ids for choice in first.choices]
    assert len({tuple(ids) for ids in samples}) > 1, "the seeds are derived per sample"
    assert first.usage.completion_tokens == sum(len(ids) for ids in samples)
    assert [choice.token_ids for choice in client.chat.completions.create(**ask).choices] == samples


def test_logprobs_come_in_openais_shape(client):
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for item in content:
        assert isinstance(item.token, str) and not item.token.startswith("token_id:")
        assert item.bytes == list(item.token.encode()) and item.logprob <= 0
        alternatives = [other.logprob for other in item.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert item.logprob <= alternatives[0]


def test_logprobs_a_model_cannot_give_are_a_400_not_an_empty_answer(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert caught.value.body["param"] == "logprobs" and "does not report logprobs" in caught.value.body["message"]


def test_streamed_tool_calls_arrive_as_deltas_and_usage_last(client):
    chunks = list(
        client.chat.completions.create(
            model="sim",
            messages=[{"role": "user", "content": "go"}],
            tools=[BASH],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_") and calls[0]["name"] == "bash"
    assert json.loads(calls[0]["arguments"]) == {"command": "echo step 0"}
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason] == [
        "tool_calls"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_a_completion_from_token_ids_answers_in_token_ids(client):
    """Token in, token out: the prompt's ids are the model's input as given; the completion's come back."""
    prompt = [5, 17, 42, 99, 7]
    completion = client.completions.create(
        model="tiny-hf", prompt=prompt, max_tokens=5, logprobs=2, extra_body={"return_token_ids": True}
    )
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.usage.prompt_tokens == len(prompt)
    assert choice.prompt_token_ids == prompt and len(choice.token_ids) == completion.usage.completion_tokens
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.token_ids)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)


def test_a_text_completion_through_the_openai_backend(client):
    completion = client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=4, n=2, temperature=1, seed=1
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert all(isinstance(choice.text, str) for choice in completion.choices)
    assert 0 < completion.usage.completion_tokens <= 8


CALL = {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
ANSWERED = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bash", "parameters": {"type": "objekt"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "run bash"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bash", "strict": True}}]}, "tools[0].function.strict"),
        ({"tools": [BASH], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [BASH], "tool_choice": {"type": "function", "function": {"name": "python"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [*ANSWERED, {"role": "tool", "content": "a.py"}]}, "messages[2].tool_call_id"),
        ({"messages": [*ANSWERED, {"role": "tool", "tool_call_id": "call_9", "content": "a.py"}]},
         "messages[2].tool_call_id"),
        ({"messages": [ANSWERED[0], {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "function": {"name": "bash", "arguments": "{command: ls}"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}, "messages[0].audio"),
        ({"functions": [{"name": "bash"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"50": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)  # fmt: skip
def test_bad_chat_input_is_a_400_naming_the_param(client, request_fields, param):
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], **request_fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=dict)
    assert caught.value.body["param"] == param
    assert caught.value.body["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "}"}, "suffix"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_bad_completion_input_is_a_400_naming_the_param(client, request_fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", body={"model": "sim", "prompt": "hi", **request_fields}, cast_to=dict)
    assert caught.value.body["param"] == param


class EndedEpisodeView(ChatCompletionsView):
    """The seam episode-bound sessions use: ``admit`` refuses, ``publish`` answers from elsewhere."""

    published: list[list[dict]] = []

    def admit(self, request, form):
        if form.validated_data["messages"][-1]["content"] == "once more":
            raise exceptions.PermissionDenied("the episode has ended")

    def publish(self, model, requests, inbox):
        self.published.append(requests)
        answers = [Generation(request["request_id"], text=f"answer {index}") for index, request in enumerate(requests)]
        replies.deliver(inbox, [answer.as_dict() for answer in answers])


def post_to(view, body: dict):
    request = APIRequestFactory().post("/v1/episodes/x/chat/completions", body, format="json")
    force_authenticate(request, user=User(username="agent"))
    response = view.as_view()(request)
    return response.status_code, json.loads(response.content)


def test_a_subclass_admits_and_publishes_through_the_hooks(broker):
    status, body = post_to(EndedEpisodeView, {"model": "sim", "messages": [{"role": "user", "content": "go"}], "n": 2})
    assert status == 200 and [choice["message"]["content"] for choice in body["choices"]] == ["answer 0", "answer 1"]
    [requests] = EndedEpisodeView.published
    assert [request["request_id"] for request in requests] == [f"{body['id']}-0", f"{body['id']}-1"]
    status, body = post_to(EndedEpisodeView, {"model": "sim", "messages": [{"role": "user", "content": "once more"}]})
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert body["error"]["message"] == "the episode has ended" and body["error"]["code"] == "permission_denied"
