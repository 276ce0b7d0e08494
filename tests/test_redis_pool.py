"""A process's Redis clients wait for a free connection when every one is in use, instead of failing the hop
(megaflow_site/redis_pool.py). Real Redis."""

import threading
import time
import uuid

import pytest
import redis

from megaflow_site.redis_pool import pooled_client


def test_a_call_waits_for_a_connection_when_all_are_in_use(settings):
    settings.REDIS_MAX_CONNECTIONS, settings.REDIS_POOL_TIMEOUT_S = 2, 10
    client = pooled_client(settings.REDIS_URL, decode_responses=True)
    empty = f"test:pool:{uuid.uuid4().hex}"
    holders = [threading.Thread(target=client.blpop, args=([empty], 1)) for _ in range(2)]  # both connections, 1 s
    for holder in holders:
        holder.start()
    time.sleep(0.2)
    began = time.monotonic()
    assert client.set(empty + ":x", 1, ex=5)  # a third caller: waits for one of the two, then runs
    assert time.monotonic() - began >= 0.5
    for holder in holders:
        holder.join()
    assert client.connection_pool.max_connections == 2


def test_a_call_that_waits_past_the_timeout_is_a_clear_error(settings):
    settings.REDIS_MAX_CONNECTIONS, settings.REDIS_POOL_TIMEOUT_S = 1, 0.2
    client = pooled_client(settings.REDIS_URL)
    holder = threading.Thread(target=client.blpop, args=([f"test:pool:{uuid.uuid4().hex}"], 1))
    holder.start()
    time.sleep(0.2)
    with pytest.raises(redis.ConnectionError, match="No connection available"):
        client.ping()
    holder.join()
    assert client.ping()
