"""Datasets with their repositories over REST: bundles (.tar.gz of tasks.jsonl and its archives), refused when
unsafe or invalid with every reason, uploaded from another process, gold-validated through the API and run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestrator.models import Dataset, Task

SWE_MINI = Path(__file__).resolve().parent.parent / "envs" / "suites" / "swe_mini" / "dataset"
CHOSEN = ["kvconf-1", "textkit-2"]


def bundle(members: dict[str, bytes | str], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz of ``members`` (name → content) and symlinks (name → target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def swe_mini_bundle(instance_ids: list[str], top: str = "") -> bytes:
    """The named swe_mini tasks with their archives, laid out as ``megaflow load-dataset`` reads them."""
    lines = [line for line in (SWE_MINI / "tasks.jsonl").read_text().splitlines()
             if json.loads(line)["instance_id"] in instance_ids]  # fmt: skip
    members = {f"{top}tasks.jsonl": "\n".join(lines) + "\n"}
    for line in lines:
        archive = json.loads(line)["repo_archive"]
        members[f"{top}{archive}"] = (SWE_MINI / archive).read_bytes()
    return bundle(members)


@pytest.fixture
def api(db) -> APIClient:
    client = APIClient()
    user = User.objects.create_user("trainer")
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def upload(api: APIClient, name: str, data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return api.post("/api/v1/datasets/", {"name": name, "bundle": SimpleUploadedFile("b.tar.gz", data)},
                    format="multipart")  # fmt: skip


@pytest.mark.parametrize(
    "data, reason",
    [
        (bundle({"tasks.jsonl": "", "../escape.txt": "x"}), "../escape.txt: the path leaves the bundle"),
        (bundle({"/etc/cron.d/x": "x"}), "/etc/cron.d/x: the path leaves the bundle"),
        (bundle({"tasks.jsonl": ""}, links={"archives/a.tar.gz": "/etc/passwd"}), "archives/a.tar.gz: links are"),
        (bundle({"README": "no tasks here"}), "no tasks.jsonl at the top of the bundle"),
        (b"not a gzip at all", "not a readable .tar.gz"),
    ],
    ids=["traversal", "absolute", "symlink", "no tasks.jsonl", "not gzip"],
)
def test_an_unsafe_bundle_is_refused_with_its_reason(api, data, reason):
    response = upload(api, "unsafe", data)
    assert response.status_code == 400 and reason in json.dumps(response.json()), response.json()
    assert not Dataset.objects.filter(name="unsafe").exists()


def test_an_oversized_member_is_refused(api, settings):
    settings.MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES = 1000
    response = upload(api, "big", bundle({"tasks.jsonl": "", "archives/big.tar.gz": b"x" * 1001}))
    assert response.status_code == 400 and "archives/big.tar.gz: 1001 bytes, over 1000" in json.dumps(response.json())


def test_every_bad_task_is_named_and_nothing_is_stored(api):
    good = json.loads((SWE_MINI / "tasks.jsonl").read_text().splitlines()[0])
    lines = [good, {**good, "instance_id": "no-tests", "FAIL_TO_PASS": []},
             {**good, "instance_id": "lost", "repo_archive": "archives/missing.tar.gz"}]  # fmt: skip
    members = {"tasks.jsonl": "\n".join(json.dumps(line) for line in lines) + "\n"}
    members[good["repo_archive"]] = (SWE_MINI / good["repo_archive"]).read_bytes()
    errors = upload(api, "mixed", bundle(members)).json()["bundle"]
    assert len(errors) == 2, errors
    assert errors[0] == "line 2: task 'no-tests': FAIL_TO_PASS: must list at least one test"
    assert errors[1].startswith("line 3: task 'lost': repo_archive: file not found")
    assert not Dataset.objects.filter(name="mixed").exists()


UPLOADER = """
import sys, httpx
url, token, path = sys.argv[1:]
with open(path, "rb") as bundle:
    response = httpx.post(f"{url}/api/v1/datasets/", headers={"Authorization": f"Token {token}"},
                          data={"name": "byo-repos"}, files={"bundle": ("repos.tar.gz", bundle)}, timeout=60)
print(response.status_code, response.text)
"""


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_bundle_from_another_process_validates_and_runs_through_the_api(live_server, celery_workers, tmp_path):
    user = User.objects.create_user("remote-trainer")
    token = Token.objects.create(user=user).key
    path = tmp_path / "repos.tar.gz"
    path.write_bytes(swe_mini_bundle(CHOSEN, top="my-suite/"))

    def send() -> tuple[int, dict]:
        done = subprocess.run([sys.executable, "-c", UPLOADER, live_server.url, token, str(path)],
                              capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        code, _, body = done.stdout.partition(" ")
        return int(code), json.loads(body)

    status, created = send()
    assert status == 201 and created["task_count"] == 2, created
    digests = sorted(Task.objects.filter(dataset__name="byo-repos").values_list("repo_archive_sha256", flat=True))
    assert all(digests) and send() == (201, created), "sending the same bundle again changes nothing"
    assert sorted(Task.objects.filter(dataset__name="byo-repos").values_list("repo_archive_sha256", flat=True)) == (
        digests
    )

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    dataset_id = created["id"]
    assert api.get(f"/api/v1/datasets/{dataset_id}/validation/").status_code == 404
    started = api.post(f"/api/v1/datasets/{dataset_id}/validate/")
    assert started.status_code == 202 and started.json()["state"] == "queued", started.json()
    assert api.post(f"/api/v1/datasets/{dataset_id}/validate/").status_code == 409, "one at a time"
    deadline = time.monotonic() + 240
    while (validation := api.get(f"/api/v1/datasets/{dataset_id}/validation/").json())["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, validation
        time.sleep(0.5)
    assert (validation["state"], validation["passed"], validation["failed"]) == ("done", 2, 0), validation
    assert sorted(result["instance_id"] for result in validation["results"]) == CHOSEN

    run = api.post("/api/v1/runs/", {"dataset": "byo-repos", "model_name": "replay"}, format="json")
    assert run.status_code == 201, run.json()
    while (detail := api.get(f"/api/v1/runs/{run.json()['id']}/").json())["status"] != "completed":
        assert time.monotonic() < deadline + 180, detail
        time.sleep(0.3)
    assert detail["progress"]["mean_reward"] == 1.0 and detail["progress"]["by_status"]["succeeded"] == 2
