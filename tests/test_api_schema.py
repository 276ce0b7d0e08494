"""The schema is the truth: schemathesis (pinned in requirements.txt) reads ``/api/v1/schema/`` from the live
server and sends it generated requests with every check it has (status codes, content types, headers and bodies
conform to the schema, schema-valid data is accepted and invalid data refused, auth is enforced, ...), in every
phase (examples, coverage, fuzzing, stateful), a bounded number per operation. Any failure fails the test, with
schemathesis' report as the message. Exceptions, each with its reason, are in schemathesis.toml."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from tests.conftest import REPO

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 10


def test_schemathesis_finds_nothing(live_server, swe_mini, tmp_path):
    token = Token.objects.create(user=User.objects.create_user("schemathesis", password="x" * 12)).key
    started = time.monotonic()
    result = subprocess.run(
        [Path(sys.executable).with_name("schemathesis"), "--config-file", str(REPO / "schemathesis.toml"),
         "--no-color", "run", f"{live_server.url}/api/v1/schema/", "--checks", "all",
         "--max-examples", str(EXAMPLES_PER_OPERATION), "--generation-deterministic",
         "--header", f"Authorization: Token {token}", "--request-timeout", "20"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5000:]
    tested = re.search(r"Tested: (\d+)", result.stdout)
    cases = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert tested and int(tested.group(1)) >= 14, result.stdout[-3000:]
    assert cases and cases.group(1) == cases.group(2), result.stdout[-3000:]
    print(f"schemathesis: {tested.group(1)} operations, {cases.group(1)} test cases, {elapsed:.0f} s")
