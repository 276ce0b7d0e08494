"""Operators' door: Flower, started as ``make up`` starts it (behind basic auth), sees every worker of all three
services and every queue, through its own HTTP API."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from megaflow_site.topology import declared_queues, flower_argv

pytestmark = pytest.mark.integration

PORT = 18900 + int(os.environ["MEGAFLOW_TEST_SLOT"])


def get(path: str, auth: str | None = settings.FLOWER_BASIC_AUTH):
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def flower(celery_workers):
    log = (settings.DATA_DIR / "log" / "flower.log").open("wb")
    argv = flower_argv(str(Path(sys.executable).with_name("celery")), PORT)
    process = subprocess.Popen(argv, env=celery_workers.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get("/api/workers")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, "flower did not start"
                time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def test_flower_shows_every_worker_and_queue_behind_auth(flower, celery_workers):
    with pytest.raises(urllib.error.HTTPError) as refused:
        get("/api/workers", auth=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        get("/api/workers", auth="admin:wrong")

    deadline = time.monotonic() + 30
    while set(workers := get("/api/workers?refresh=1")) < set(celery_workers.nodes):
        assert time.monotonic() < deadline, f"flower sees {sorted(workers)}, not {sorted(celery_workers.nodes)}"
        time.sleep(1)
    consumed = {queue["name"] for node in celery_workers.nodes for queue in workers[node]["active_queues"]}
    assert consumed == {queue.name for queue in declared_queues()}
    lengths = get("/api/queues/length")
    assert {queue["name"] for queue in lengths["active_queues"]} == consumed
