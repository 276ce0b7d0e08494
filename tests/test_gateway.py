"""The OpenAI-compatible gateway, driven by the official openai client: Django → model queue → model worker →
a real tiny model in a real OpenAI-compatible server, and back."""

import json
import urllib.error
import urllib.request

import openai
import pytest
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


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
        ("n", 3, "less than or equal to 1"),
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
