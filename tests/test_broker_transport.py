"""The Celery app's Redis transport (megaflow_site/broker.py): kombu's, with one client per channel. Real Redis."""

import json
import threading
import time
import uuid

import pytest
import redis
from kombu import Connection, Queue

from megaflow_site import broker
from megaflow_site.celery import app
from tests.chaos.harness import Broker
from tests.support.ports import free_port


def test_the_app_connects_through_the_transport_under_redis_urls():
    with app.connection_for_write() as connection:
        assert isinstance(connection.default_channel, broker.Channel)
        assert connection.as_uri().startswith("redis://")  # what Flower's broker view reads the scheme from


def test_one_client_serves_every_command_and_thread_of_a_channel():
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        seen = []

        def take():
            with channel.conn_or_acquire() as client:
                seen.append(client)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({id(client) for client in seen}) == 1
        assert channel.client is not seen[0]  # the consume loop keeps its own


def test_publish_consume_and_ack_round_trip(settings):
    queue = f"test-broker-{uuid.uuid4().hex}"
    with Connection(settings.CELERY_BROKER_URL) as connection:
        assert isinstance(connection.default_channel, broker.Channel)
        simple = connection.SimpleQueue(queue)
        try:
            for index in range(3):
                simple.put({"index": index})
            received = [simple.get(timeout=5) for _ in range(3)]
            assert [message.payload["index"] for message in received] == [0, 1, 2]
            channel, tags = connection.default_channel, [message.delivery_tag for message in received]
            with channel.conn_or_acquire() as client:
                assert all(client.hmget(channel.unacked_key, tags))  # each delivery kept until it is acknowledged
                for message in received:
                    message.ack()
                assert not any(client.hmget(channel.unacked_key, tags))
                assert client.llen(queue) == 0
        finally:
            simple.queue.delete()
            simple.close()


def test_a_message_body_is_stored_as_its_json_and_a_base64_one_still_reads(settings):
    queue = f"test-broker-{uuid.uuid4().hex}"
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    with Connection(settings.CELERY_BROKER_URL, transport_options=options) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            simple.put({"ids": "AAEC"})
            with connection.default_channel.conn_or_acquire() as client:
                [stored] = client.lrange(queue, 0, -1)
            envelope = json.loads(stored)
            assert envelope["properties"]["body_encoding"] == "utf-8"
            assert json.loads(envelope["body"]) == {"ids": "AAEC"}  # not base64 of it
            # A message published before (kombu's default encoding) names its own, and is read as before.
            with Connection(settings.CELERY_BROKER_URL) as before:
                before.SimpleQueue(queue).put({"ids": "before"})
            assert [simple.get(timeout=5).payload["ids"] for _ in range(2)] == ["AAEC", "before"]
        finally:
            simple.queue.delete()
            simple.close()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own that it may stop and start, keeping nothing across a restart (the chaos
    harness's): (its URL, stop, start)."""
    port = free_port()
    server = Broker(port, tmp_path, snapshots=True)
    server.start()
    yield f"redis://127.0.0.1:{port}/0", server.stop, server.start
    server.stop()


def test_a_publish_rides_out_a_broker_that_is_away_for_seconds(own_redis):
    """The app's publish retry policy (settings): a Redis restart does not fail the task that publishes."""
    url, stop, start = own_redis
    queue = Queue(f"test-broker-{uuid.uuid4().hex}")
    with app.connection_for_write(url) as connection:
        app.send_task("orchestrator.admit", queue=queue, connection=connection)  # connected, then the broker goes
        stop()
        restart = threading.Timer(3.0, start)
        restart.start()
        began = time.monotonic()
        app.send_task("orchestrator.admit", queue=queue, connection=connection)
        waited = time.monotonic() - began
        restart.join()
    assert 2.5 < waited < 15, "the publish waited for the broker's return, and no longer"
    # The server came back empty (no persistence): only the message published after the restart is there.
    assert redis.Redis.from_url(url).llen(queue.name) == 1
