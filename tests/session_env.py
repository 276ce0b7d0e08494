"""Loaded by pytest (``-p tests.session_env``) before Django reads its settings.

The test session gets its own Redis database and data directory, so `make test` never touches the queues or
the SQLite file of a stack that `make up` started on the same machine. Two models and two pools are declared
so the routing tests can tell queues of the same service apart.
"""

import os
from pathlib import Path

os.environ.setdefault("MEGAFLOW_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("MEGAFLOW_DATA_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))
os.environ.setdefault("MEGAFLOW_MODELS", "replay,sim")
os.environ.setdefault("MEGAFLOW_ENV_POOLS", "default,heavy")
