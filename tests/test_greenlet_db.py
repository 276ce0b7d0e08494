"""PostgreSQL waits on a gevent worker (megaflow_site/greenlet_db.py): in a gevent-patched process of its own, against
the test database, a greenlet that yields whenever it can counts the hub's turns while statements run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection
from psycopg.conninfo import make_conninfo

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="psycopg's waits are PostgreSQL's"),
]

SCRIPT = """
from gevent import monkey

monkey.patch_all()
import json, sys
import gevent, psycopg
from megaflow_site import greenlet_db

installed = greenlet_db.install(float(sys.argv[2]))
turns = 0

def yield_whenever_possible():
    global turns
    while True:
        turns += 1
        gevent.sleep(0)

def turns_during(conn, sql):
    before = turns
    conn.execute(sql).fetchall()
    return turns - before

with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    gevent.spawn(yield_whenever_possible)
    gevent.sleep(0.01)
    fast = [turns_during(conn, "SELECT 1") for _ in range(50)]
    slow = turns_during(conn, "SELECT pg_sleep(0.2)")
    try:
        conn.execute("SELECT 1 / 0")
    except psycopg.errors.DivisionByZero as error:
        failed = type(error).__name__
print(json.dumps({"installed": installed, "fast": fast, "slow": slow, "failed": failed}))
"""


def hub_turns(block_ms: float) -> dict:
    db = connection.settings_dict
    conninfo = make_conninfo(dbname=db["NAME"], host=db["HOST"] or None, port=db["PORT"] or None,
                             user=db["USER"] or None, password=db["PASSWORD"] or None)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT, conninfo, str(block_ms)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_statement_answered_within_the_block_never_yields_and_a_slow_one_lets_the_hub_run():
    waits = hub_turns(block_ms=20)
    assert waits["installed"]
    assert sum(waits["fast"]) == 0, "no greenlet ran while a fast statement's reply was awaited"
    assert waits["slow"] > 10, "past the block, a 200 ms statement yields to the hub"
    assert waits["failed"] == "DivisionByZero", "a server error still arrives as psycopg's"


def test_without_the_block_every_wait_yields():
    """psycopg's own wait on a gevent-patched process: each statement hands the hub a turn."""
    waits = hub_turns(block_ms=0)
    assert not waits["installed"]
    assert all(turns >= 1 for turns in waits["fast"]) and waits["slow"] > 10
