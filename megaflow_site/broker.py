"""kombu's Redis transport with one client object per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` around its connection pool for every command it sends outside
the consume loop (``Channel.conn_or_acquire``): the publish of a message, and the unacked-hash bookkeeping of every
delivery and every ack. redis-py 8 fills a table of several hundred response callbacks in each client's
constructor, about 150 µs here, and a hop paid three or four of them (8.5% of a model worker's CPU at 1,000 concurrent
episodes: agents/README.md, "Where a step's time goes"). A client is only a handle on the pool: each command takes
a connection from the pool and gives it back, so one client per channel serves every thread or greenlet of the
process, as the publish and ack paths of kombu's other transports share theirs. Everything else is kombu's.

The transport is registered under kombu's own ``redis`` alias (``install``, called where the Celery app is made),
so ``redis://`` URLs, Flower's broker view and every setting read as before.
"""

from __future__ import annotations

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _create_client(self, asynchronous=False):
        if asynchronous:  # the consume loop's own client (BRPOP), made once per channel by kombu already
            return super()._create_client(asynchronous=True)
        client = self.__dict__.get("_shared_client")
        if client is None:  # two threads that race here make a client each, and one is dropped: both work
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make ``redis://`` resolve to this transport (before the first broker connection is made)."""
    kombu_transport.TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    kombu_transport._transport_cache.pop("redis", None)
