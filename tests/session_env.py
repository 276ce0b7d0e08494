"""Loaded by pytest (``-p tests.session_env``) before Django reads its settings.

The test session gets its own Redis database and data directory, so `make test` never touches the queues or
the SQLite file of a stack that `make up` started on the same machine. Two models and two pools are declared
so the routing tests can tell queues of the same service apart; the models are the replay policy, the sim
backend, and a real tiny model behind an OpenAI-compatible server.

Sessions running at the same time on one machine (a fresh-clone check beside a working tree) would steal each
other's Celery messages and share a PostgreSQL test database; each session therefore holds one of a few
isolation slots (an flock, released when the process ends) that picks its Redis database, its test database
name and the ports of the stack it starts.
"""

import fcntl
import json
import os
from pathlib import Path

SLOTS = (15, 13, 11, 9)

for slot in SLOTS:
    _lock = open(f"/tmp/megaflow-test-slot-{slot}.lock", "w")  # held for the whole session
    try:
        fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except BlockingIOError:
        _lock.close()
else:
    raise SystemExit(f"megaflow: {len(SLOTS)} test sessions already run on this machine -- wait for one to end")

os.environ.setdefault("MEGAFLOW_REDIS_URL", f"redis://127.0.0.1:6379/{slot}")
os.environ.setdefault("MEGAFLOW_TEST_SLOT", str(slot))
# Request threads of the live server would keep their connections open, and the test database could not be dropped.
os.environ.setdefault("MEGAFLOW_DB_CONN_MAX_AGE", "0")
# Short limits so that messages of a worker killed with -9 come back within a test's patience (test_fault_recovery).
os.environ.setdefault("MEGAFLOW_TASK_TIME_LIMIT_S", "30")
os.environ.setdefault("MEGAFLOW_RETRY_BACKOFF_S", "1")
# The autoscaler's beat task is off: tests call orchestrator.autoscale.tick themselves, with settings of their own.
os.environ.setdefault("MEGAFLOW_AUTOSCALE_INTERVAL_S", "0")
os.environ.setdefault("MEGAFLOW_VISIBILITY_TIMEOUT_S", "60")
os.environ.setdefault("MEGAFLOW_DATA_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))
os.environ.setdefault("MEGAFLOW_MODELS", "replay,sim,tiny,tiny-hf")
# "tiny" is a real tiny model served by modelserving.hf_server (the tiny_model_server fixture starts it).
TINY_MODEL_PORT = 18800 + slot
os.environ.setdefault("MEGAFLOW_TINY_MODEL_PORT", str(TINY_MODEL_PORT))
os.environ.setdefault(
    "MEGAFLOW_MODEL_CONFIG",
    json.dumps(
        {
            "sim": {"backend": "sim", "latency_s": 0.05, "steps": 3},
            "tiny": {
                "backend": "openai",
                "base_url": f"http://127.0.0.1:{TINY_MODEL_PORT}/v1",
                "max_attempts": 2,
                "backoff_s": 0.05,
            },
            # The same tiny model in the model worker itself (hf backend: token in, token out, new versions
            # loaded between batches); the tiny_model fixture builds it before any episode uses it.
            "tiny-hf": {
                "backend": "hf",
                "model_path": str(Path(os.environ["MEGAFLOW_DATA_DIR"]) / "tiny-model"),
                "version": "v0",
                "context_length": 1024,
            },
        }
    ),
)
os.environ.setdefault("MEGAFLOW_ENV_POOLS", "default,heavy")
# The image cache holds 2.5 MB of task images: two of the 1 MB registry-only images tests/test_images.py pushes.
# Only images pulled from a registry are cached (and evicted), so no other test's images are affected.
os.environ.setdefault("MEGAFLOW_IMAGE_CACHE_GB", "0.0025")
os.environ.setdefault("MEGAFLOW_TEST_REGISTRY_PORT", str(15000 + slot))
