"""The REST API (/api/v1): auth and owner isolation, validation as 4xx naming the field, run lifecycle actions,
and a run created through the API driven to completion by the real workers."""

import json
import time

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestrator.models import Episode, Run

GOOD_TASK = {
    "instance_id": "upload-1",
    "problem_statement": "Make the test pass.",
    "test_command": "python3 -m pytest -rA",
    "FAIL_TO_PASS": ["test_a.py::test_a"],
}


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@pytest.fixture
def alice(db):
    return User.objects.create_user("alice", password="x" * 12)


@pytest.fixture
def api(alice) -> APIClient:
    return client_for(alice)


@pytest.fixture
def bob_api(db) -> APIClient:
    return client_for(User.objects.create_user("bob", password="x" * 12))


@pytest.fixture
def staff_api(db) -> APIClient:
    return client_for(User.objects.create_user("root", password="x" * 12, is_staff=True))


def jsonl(*tasks) -> bytes:
    return "".join(json.dumps(task) + "\n" for task in tasks).encode()


def upload(api, name, content: bytes, filename="tasks.jsonl"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    file = SimpleUploadedFile(filename, content, content_type="application/x-ndjson")
    return api.post("/api/v1/datasets/", {"name": name, "file": file}, format="multipart")


def create_run(api, swe_mini, **fields):
    body = {"dataset": swe_mini.name, "model_name": "replay", "instance_ids": ["textkit-1"], **fields}
    return api.post("/api/v1/runs/", body, format="json")


# --- auth ------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "method, url",
    [("get", "/api/v1/"), ("get", "/api/v1/datasets/"), ("post", "/api/v1/datasets/"), ("get", "/api/v1/tasks/"),
     ("get", "/api/v1/runs/"), ("post", "/api/v1/runs/"), ("get", "/api/v1/runs/1/"),
     ("post", "/api/v1/runs/1/cancel/"), ("get", "/api/v1/runs/1/export/"), ("get", "/api/v1/episodes/"),
     ("get", "/api/v1/episodes/1/steps/"),
     ("get", "/api/v1/schema/"), ("get", "/api/v1/docs/"), ("get", "/api/v1/redoc/")],
)  # fmt: skip
def test_every_endpoint_needs_a_token(method, url):
    response = getattr(APIClient(), method)(url)
    assert response.status_code == 401, response.content
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert getattr(bad, method)(url).status_code == 401


def test_the_schema_and_swagger_ui_are_served(api):
    schema = api.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = json.loads(schema.content)["paths"]
    assert {"/api/v1/runs/", "/api/v1/runs/{id}/cancel/", "/api/v1/episodes/{id}/steps/"} <= set(paths)
    assert "/v1/chat/completions" not in paths
    assert api.get("/api/v1/docs/").status_code == 200


# --- datasets ------------------------------------------------------------------------------------------------------


def test_a_jsonl_upload_becomes_a_dataset(api):
    response = upload(api, "uploaded", jsonl(GOOD_TASK, {**GOOD_TASK, "instance_id": "upload-2"}))
    assert response.status_code == 201, response.json()
    assert response.json()["task_count"] == 2 and response.json()["owner"] == "alice"
    listed = api.get("/api/v1/tasks/", {"dataset": "uploaded"}).json()
    assert listed["count"] == 2 and {task["instance_id"] for task in listed["results"]} == {"upload-1", "upload-2"}
    assert upload(api, "uploaded", jsonl(GOOD_TASK, {**GOOD_TASK, "instance_id": "upload-2"})).status_code == 201


def test_a_bad_upload_is_a_400_naming_the_line_and_field(api):
    bad = {**GOOD_TASK, "instance_id": "upload-2", "FAIL_TO_PASS": "not a list"}
    response = upload(api, "broken", jsonl(GOOD_TASK, bad))
    assert response.status_code == 400
    [message] = response.json()["file"]
    assert "line 2" in message and "FAIL_TO_PASS" in message
    assert upload(api, "Not A Slug!", jsonl(GOOD_TASK)).json().keys() == {"name"}
    assert "UTF-8" in upload(api, "binary", b"\xff\xfe\x00").json()["file"][0]
    changed = upload(api, "fixed", jsonl(GOOD_TASK))
    assert changed.status_code == 201
    conflict = upload(api, "fixed", jsonl({**GOOD_TASK, "problem_statement": "Another."}))
    assert conflict.status_code == 400 and "already exists" in conflict.json()["name"][0]


def test_an_oversize_upload_is_a_413(api):
    with override_settings(MEGAFLOW_BUNDLE_MAX_UPLOAD_BYTES=1000, DATA_UPLOAD_MAX_MEMORY_SIZE=1000):
        response = upload(api, "huge", jsonl(*[{**GOOD_TASK, "instance_id": f"t-{i}"} for i in range(40)]))
    assert response.status_code == 413 and "over 1000 bytes" in response.json()["detail"]


# --- runs: validation, isolation, lifecycle ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field",
    [({"model_name": "gpt-unknown"}, "model_name"), ({"env_pool": "nowhere"}, "env_pool"),
     ({"samples_per_task": 0}, "samples_per_task"), ({"max_steps": -1}, "max_steps"),
     ({"instance_ids": ["no-such-task"]}, "instance_ids"), ({"dataset": "no-such-dataset"}, "dataset"),
     ({"agent_config": {"max_observation_chars": "lots"}}, "max_observation_chars"),
     ({"agent_name": "nobody"}, "agent_name"), ({"tasks": [GOOD_TASK]}, "dataset"),
     ({"dataset": None, "tasks": [{"instance_id": "x"}]}, "tasks")],
)  # fmt: skip
def test_a_bad_run_field_is_a_400_naming_it(api, swe_mini, fields, field):
    response = create_run(api, swe_mini, **fields)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not Run.objects.exists()


def test_owners_see_their_runs_and_staff_see_all(api, bob_api, staff_api, swe_mini):
    run_id = create_run(api, swe_mini).json()["id"]
    assert api.get(f"/api/v1/runs/{run_id}/").status_code == 200
    assert bob_api.get(f"/api/v1/runs/{run_id}/").status_code == 404
    assert bob_api.post(f"/api/v1/runs/{run_id}/cancel/").status_code == 404
    assert bob_api.get("/api/v1/runs/").json()["count"] == 0
    assert bob_api.get("/api/v1/episodes/", {"run": run_id}).json()["count"] == 0
    assert staff_api.get(f"/api/v1/runs/{run_id}/").status_code == 200
    assert api.get("/api/v1/runs/999999/").status_code == 404


def test_an_idempotency_key_makes_a_retried_create_return_the_same_run(api, swe_mini):
    first = api.post("/api/v1/runs/", {"dataset": swe_mini.name, "model_name": "replay"}, format="json",
                     HTTP_IDEMPOTENCY_KEY="batch-7")  # fmt: skip
    again = api.post("/api/v1/runs/", {"dataset": swe_mini.name, "model_name": "replay"}, format="json",
                     HTTP_IDEMPOTENCY_KEY="batch-7")  # fmt: skip
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and Run.objects.count() == 1


def test_inline_tasks_make_a_run_of_their_own_dataset(api):
    response = api.post("/api/v1/runs/", {"tasks": [GOOD_TASK], "model_name": "replay", "samples_per_task": 3},
                        format="json")  # fmt: skip
    assert response.status_code == 201, response.json()
    run = Run.objects.get(pk=response.json()["id"])
    assert run.dataset.name.startswith("inline-") and list(run.tasks.values_list("instance_id", flat=True)) == [
        "upload-1"
    ]


def test_date_filters_take_any_iso_offset_and_refuse_what_overflows(api, swe_mini):
    api.post("/api/v1/runs/", {"dataset": "swe_mini", "model_name": "replay", "name": "dated"}, format="json")
    # Found by the fuzz test on PostgreSQL, which refuses offsets beyond ±15:59: compared in UTC instead.
    assert api.get("/api/v1/runs/", {"created_after": "2035-02-10T19:32:41-21:57"}).data["count"] == 0
    assert api.get("/api/v1/runs/", {"created_before": "2035-02-10T19:32:41-21:57"}).data["count"] == 1
    overflow = api.get("/api/v1/runs/", {"created_after": "0001-01-01T00:00:00+23:59"})
    assert overflow.status_code == 400 and "created_after" in overflow.data


def test_cancel_and_retry_failed(api, swe_mini):
    run = Run.objects.get(pk=create_run(api, swe_mini, samples_per_task=2).json()["id"])
    run_id = run.pk
    task = run.tasks.get()
    for sample in range(2):
        Episode.objects.create(run=run, task=task, sample_index=sample, status="failed", failure_reason="died")
    Run.objects.filter(pk=run_id).update(status=Run.Status.COMPLETED)
    retried = api.post(f"/api/v1/runs/{run_id}/retry-failed/").json()
    assert retried["retried"] == 2 and retried["status"] == "running"
    assert set(Episode.objects.filter(run_id=run_id).values_list("status", "attempt")) == {("queued", 2)}

    cancelled = api.post(f"/api/v1/runs/{run_id}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.post(f"/api/v1/runs/{run_id}/cancel/").status_code == 409
    assert api.post(f"/api/v1/runs/{run_id}/retry-failed/").status_code == 409
    episodes = api.get("/api/v1/episodes/", {"run": run_id, "status": "cancelled"}).json()
    assert episodes["count"] == 2 and "cancelled by alice" in episodes["results"][0]["failure_reason"]


# --- a run through the API, on the real workers --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_run_created_through_the_api_completes_and_exports(celery_workers, swe_mini, alice):
    api = client_for(alice)
    created = create_run(api, swe_mini, instance_ids=["textkit-1", "ledger-3"], samples_per_task=2)
    assert created.status_code == 201, created.json()
    run_id = created.json()["id"]
    deadline = time.monotonic() + 180
    while (detail := api.get(f"/api/v1/runs/{run_id}/").json())["status"] != "completed":
        assert time.monotonic() < deadline, detail
        time.sleep(0.3)
    progress = detail["progress"]
    assert progress["episodes"] == 4 and progress["by_status"]["succeeded"] == 4
    assert progress["mean_reward"] == 1.0 and progress["success_rate"] == 1.0 and progress["steps"] == 4

    rewarded = api.get("/api/v1/episodes/", {"run": run_id, "reward_min": 1, "ordering": "-reward"}).json()
    assert rewarded["count"] == 4
    episode_id = rewarded["results"][0]["id"]
    steps = api.get(f"/api/v1/episodes/{episode_id}/steps/", {"page_size": 1}).json()
    assert steps["count"] == 1 and "git apply" in steps["results"][0]["action"]

    export = api.get(f"/api/v1/runs/{run_id}/export/")
    assert export.status_code == 200 and export["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in b"".join(export.streaming_content).decode().splitlines()]
    assert len(lines) == 4 and {line["reward"] for line in lines} == {1.0}

    # The operator's view of the same run: Prometheus text, staff only.
    assert api.get("/metrics").status_code == 403
    metrics = client_for(User.objects.create_user("ops", is_staff=True)).get(reverse("metrics"))
    assert metrics.status_code == 200 and metrics["Content-Type"].startswith("text/plain")
    text = metrics.content.decode()
    assert 'megaflow_episodes{status="succeeded"} 4.0' in text
    assert 'megaflow_queue_depth{queue="agent"}' in text and 'megaflow_queue_depth{queue="env.default"}' in text
    assert 'megaflow_step_seconds_count{phase="env"} 4.0' in text
    assert "megaflow_steps_per_second" in text and "megaflow_tokens_per_second" in text
