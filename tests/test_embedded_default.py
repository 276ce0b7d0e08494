"""The embedded default: no DATABASE_URL, a SQLite file in the data dir, and the commands a user runs first."""

import json
import os
import sqlite3

import pytest

from tests.conftest import run_manage
from tests.test_task_format import full_task


@pytest.mark.integration
def test_sqlite_default_migrates_and_stores_a_dataset(tmp_path):
    data_dir = tmp_path / "var"
    env = {"MEGAFLOW_DATA_DIR": str(data_dir), "DATABASE_URL": ""}
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps(full_task(instance_id=f"t-{i}", repo_archive="")) + "\n" for i in range(3)))

    migrate = run_manage("migrate", "--no-input", env=env)
    assert migrate.returncode == 0, migrate.stderr
    assert run_manage("makemigrations", "--check", "--dry-run", env=env).returncode == 0, (
        "models changed without a migration"
    )
    load = run_manage("megaflow", "load-dataset", str(dataset), "--name", "embedded", env=env)
    assert load.returncode == 0, load.stderr
    assert load.stdout.strip() == "dataset embedded: 3 tasks"

    database = data_dir / "megaflow.sqlite3"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT instance_id FROM orchestrator_task ORDER BY instance_id").fetchall()
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert rows == [("t-0",), ("t-1",), ("t-2",)]
    assert journal == "wal"
    # The embedded default never ships a secret: one is made for this data dir, readable by its owner only.
    assert oct(os.stat(data_dir / "secret_key").st_mode & 0o777) == "0o600"
