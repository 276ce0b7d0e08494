"""A Python client for trainers: MegaFlow's REST API over httpx, importable without Django.

    from orchestrator.client import MegaFlow

    mf = MegaFlow("http://megaflow:8000", token="...")
    run = mf.create_run(dataset="swe_mini", samples_per_task=4, model_name="policy", model_version="step-0")
    for group in mf.groups(run["id"], deadline_s=600):      # GRPO groups, stragglers cancelled at the deadline
        ...                                                   # each rollout: ids, loss_mask, logprobs, reward, mask
    mf.publish_version("policy", "step-1", "/checkpoints/step-1")

Run creation carries an idempotency key (one is made when none is given), so a retried create never starts a
second run. Rollout streams resume from the last cursor when the connection breaks: nothing is lost or
repeated. This module depends on httpx only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx


class BrokenStream(Exception):
    """A rollouts stream that ended inside a line: the connection was cut."""


RETRYABLE = (httpx.TransportError, BrokenStream)
TERMINAL = {"completed", "failed", "cancelled"}


class MegaFlowError(Exception):
    """The API answered with an error status; ``body`` is its JSON (or text)."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class MegaFlow:
    def __init__(self, base_url: str, token: str, timeout_s: float = 60, retries: int = 5, backoff_s: float = 0.5):
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Token {token}"},
            timeout=httpx.Timeout(timeout_s, connect=10),
        )
        self.retries, self.backoff_s = retries, backoff_s

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MegaFlow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except RETRYABLE:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code >= 400:
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                raise MegaFlowError(response.status_code, body)
            return response.json()
        raise AssertionError("unreachable")

    # --- runs -----------------------------------------------------------------------------------------------------

    def create_run(self, idempotency_key: str | None = None, **fields) -> dict:
        """Start a run (the REST API's run fields: ``dataset`` or ``tasks``, ``samples_per_task``,
        ``model_name``, ``model_version``, ``max_staleness``, ...). Retried on connection errors under one
        idempotency key."""
        key = idempotency_key or uuid.uuid4().hex
        return self._request("POST", "/runs/", json=fields, headers={"Idempotency-Key": key})

    def run(self, run_id: int) -> dict:
        return self._request("GET", f"/runs/{run_id}/")

    def cancel_run(self, run_id: int) -> dict | None:
        """Cancel a run; None when it was already over."""
        try:
            return self._request("POST", f"/runs/{run_id}/cancel/")
        except MegaFlowError as error:
            if error.status == 409:
                return None
            raise

    # --- rollouts ---------------------------------------------------------------------------------------------

    def _lines(self, run_id: int, cursor: str | None, group_complete: bool, wait_s: float) -> Iterator[dict]:
        """One request's stream of rollout lines."""
        params = {"group_complete": str(group_complete).lower(), "wait_s": max(0, int(wait_s))}
        if cursor:
            params["cursor"] = cursor
        with self.http.stream("GET", f"/runs/{run_id}/rollouts", params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise MegaFlowError(response.status_code, response.text)
            for line in response.iter_lines():
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise BrokenStream(f"a cut line: {line[:80]!r}") from None

    def _follow(self, run_id: int, position: list, group_complete: bool, deadline: float | None):
        """Lines until the run is over (or ``deadline``), from ``position[0]`` (the cursor after the last line the
        caller fully handled; the caller moves it). Every request's end is a ``None``, which tells the caller to
        drop what it holds of an unfinished group: a stream cut without an error (a proxy, a server closing the
        connection) is resumed from the cursor like a broken one."""
        failures = 0
        last_pass = False
        while True:
            wait_s = 0 if last_pass else 3600 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for record in self._lines(run_id, position[0], group_complete, wait_s):
                    failures = 0
                    yield record
            except RETRYABLE:
                failures += 1
                if failures > self.retries:
                    raise
                yield None
                time.sleep(self.backoff_s * 2**failures)
                continue
            yield None
            if last_pass or (deadline is not None and time.monotonic() >= deadline):
                return
            # Over: one last pass picks up anything that ended while the stream was closing (or was cut).
            last_pass = self.run(run_id)["status"] in TERMINAL

    def rollouts(self, run_id: int, cursor: str | None = None) -> Iterator[dict]:
        """Every rollout of the run, as episodes end, until the run is over. Each carries ``cursor``: pass the
        last one handled to resume in another process."""
        position = [cursor]
        for record in self._follow(run_id, position, False, None):
            if record is not None:
                yield record
                position[0] = record["cursor"]

    def groups(self, run_id: int, deadline_s: float | None = None, cursor: str | None = None) -> Iterator[list[dict]]:
        """The run's rollouts a task at a time (GRPO groups), each group once all its samples ended. After
        ``deadline_s`` the run is cancelled: its stragglers end as cancelled samples (``mask`` true), so every
        group still comes, partial in what it can train on."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        position = [cursor]
        while True:
            pending: list[dict] = []
            for record in self._follow(run_id, position, True, deadline):
                if record is None:  # the stream broke: the group cut off comes again whole
                    pending = []
                    continue
                pending.append(record)
                if len(pending) == record["group_size"]:
                    group, pending = pending, []
                    yield group
                    position[0] = record["cursor"]
            if deadline is None or self.run(run_id)["status"] in TERMINAL:
                return
            self.cancel_run(run_id)
            deadline = None

    # --- model versions ---------------------------------------------------------------------------------------

    def publish_version(self, model: str, version: str, checkpoint_path: str) -> dict:
        """Have the model's workers serve ``checkpoint_path`` as ``version`` (returns once one does; a
        ``MegaFlowError`` 400 when they cannot load it, and the old version keeps serving)."""
        payload = {"version": version, "checkpoint_path": checkpoint_path}
        return self._request("POST", f"/models/{model}/versions", json=payload, timeout=None)

    def versions(self, model: str) -> dict:
        return self._request("GET", f"/models/{model}/versions")
