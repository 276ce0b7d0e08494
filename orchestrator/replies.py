"""Replies over queues without a result backend: a task's return value, pushed into a Redis list.

A caller that must see an answer (the CLI, the OpenAI gateway, a test) makes an inbox, links
``orchestrator.deliver_reply`` to the task it sends, and waits on the inbox. Everything else in MegaFlow
chains tasks and never waits.

    inbox = new_inbox()
    envs_task.apply_async(kwargs=..., link=deliver_reply.s(inbox=inbox))
    result = wait_for_reply(inbox, timeout_s=30)
"""

import json
import time
import uuid

from orchestrator.hot_state import redis_client

INBOX_TTL_S = 600
BLOCK_SLICE_S = 5


def new_inbox() -> str:
    return f"megaflow:reply:{uuid.uuid4().hex}"


def deliver(inbox: str, payload) -> None:
    redis = redis_client()
    redis.rpush(inbox, json.dumps(payload))
    redis.expire(inbox, INBOX_TTL_S)


def wait_for_reply(inbox: str, timeout_s: float):
    """The payload delivered to ``inbox``, or None if nothing arrived within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Short blocking slices stay inside the client's socket timeout however long the caller waits.
        remaining = deadline - time.monotonic()
        popped = redis_client().blpop([inbox], timeout=max(1, min(BLOCK_SLICE_S, round(remaining))))
        if popped:
            return json.loads(popped[1])
        if deadline - time.monotonic() <= 0:
            return None
