"""PostgreSQL on a gevent worker (megaflow_site/greenlet_db.py), each case in a gevent-patched process of its own
against the test database: a greenlet that yields whenever it can counts the hub's turns while statements run; hot
statements on native threads run while the hub is busy, and claim as pooled connections do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from orchestrator.models import Episode, Step
from tests.conftest import database_url
from tests.support.records import new_episode

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
    conninfo = database_url(connection.settings_dict)  # psycopg takes the URL as it is
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


THREADS_SCRIPT = """
from gevent import monkey

monkey.patch_all()
import json, sys, time
import django

django.setup()
import gevent
from django.db import DataError, connection
from megaflow_site import greenlet_db
from orchestrator import hot_sql

installed = greenlet_db.use_statement_threads(int(sys.argv[1]))

def server_clock():
    try:
        with hot_sql._cursor() as cursor:
            cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            return cursor.fetchone()[0]
    finally:
        connection.close()  # as a hop gives its pooled connection back

# Two statements, then the hub busy for 300 ms without a yield: on a native thread both run meanwhile.
first, second = gevent.spawn(server_clock), gevent.spawn(server_clock)
gevent.sleep(0)
began = time.time()
while time.time() - began < 0.3:
    pass
answered = [first.get() - began, second.get() - began]
with hot_sql._cursor() as cursor:
    cursor.execute("UPDATE orchestrator_episode SET updated_at = now() WHERE id = -1")
    updated = cursor.rowcount
try:
    with hot_sql._cursor() as cursor:
        cursor.execute("SELECT 1 / 0")
except DataError as error:
    failed = type(error).__module__ + "." + type(error).__name__
print(json.dumps({"installed": installed, "answered": answered, "missing": hot_sql.episode_row(-1, ("status",)),
                  "updated": updated, "failed": failed, "django_connection_used": connection.connection is not None}))
"""


def database_env() -> dict[str, str]:
    """The environment of a Django process of its own on the test database."""
    return {**os.environ, "DATABASE_URL": database_url(connection.settings_dict),
            "DJANGO_SETTINGS_MODULE": "megaflow_site.settings"}  # fmt: skip


def statements_while_the_hub_is_busy(threads: int) -> dict:
    """Run ``THREADS_SCRIPT`` in a gevent process of its own against the test database, with ``threads`` statement
    threads (0: the greenlets' pooled connections, one of them)."""
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "MEGAFLOW_DB_POOL_SIZE": "1",
        "DJANGO_SETTINGS_MODULE": "megaflow_site.settings",
    }
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(threads)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_hot_statements_on_native_threads_run_while_the_hub_is_busy():
    ran = statements_while_the_hub_is_busy(threads=1)
    assert ran["installed"]
    assert all(0 <= at < 0.3 for at in ran["answered"]), f"both ran within the hub's busy 300 ms: {ran['answered']}"
    assert ran["missing"] is None and ran["updated"] == 0, "rows and row counts come back as from a cursor"
    assert ran["failed"] == "django.db.utils.DataError", "a server error arrives as Django's"
    assert not ran["django_connection_used"], "the greenlet took no pooled connection"


def test_on_the_greenlets_pooled_connection_a_statement_waits_for_the_hub():
    """The behaviour the threads replace: the second statement waits for the pool's one connection, which the
    first holds until its greenlet runs again, after the hub's busy 300 ms."""
    ran = statements_while_the_hub_is_busy(threads=0)
    assert not ran["installed"]
    assert max(ran["answered"]) >= 0.3, ran["answered"]


CLAIMS_SCRIPT = """
from gevent import monkey

monkey.patch_all()
import json, sys
import django

django.setup()
import gevent
from django.db import IntegrityError
from django.utils import timezone
from megaflow_site import greenlet_db
from orchestrator import hot_sql

installed = greenlet_db.use_statement_threads(4)
episode_id = int(sys.argv[1])

def claim(index):
    try:
        return hot_sql.insert_step(timezone.now(), episode_id=episode_id, index=index, model_output="x")
    except IntegrityError:
        return "taken"

# Two deliveries of each of 50 steps, all at once: the unique (episode, index) picks one of each pair.
claims = [gevent.spawn(claim, index % 50) for index in range(100)]
gevent.joinall(claims)
print(json.dumps({"installed": installed, "claims": [greenlet.get() for greenlet in claims]}))
"""


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_on_statement_threads_pick_one_delivery_of_each_step():
    """The env step's claim is an INSERT that a second delivery loses with ``IntegrityError``: a hundred greenlets
    claiming fifty steps through four statement threads get fifty rows and fifty losses, as on pooled connections."""
    episode = new_episode(Episode.Status.RUNNING)
    done = subprocess.run([sys.executable, "-c", CLAIMS_SCRIPT, str(episode.pk)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent, env=database_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    assert ran["installed"]
    claims = ran["claims"]
    assert claims.count("taken") == 50 and len({claim for claim in claims if claim != "taken"}) == 50
    assert sorted(Step.objects.filter(episode=episode).values_list("index", flat=True)) == list(range(50))
