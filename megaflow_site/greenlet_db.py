"""PostgreSQL waits on a gevent worker: a statement's reply is first awaited without yielding to the hub.

On a gevent-patched process psycopg waits for the server cooperatively (its ``wait_poll`` on gevent's ``poll``): the
greenlet that sent a statement yields to the hub, and runs again only after every greenlet that was ready before it.
At 10,000 concurrent episodes that is hundreds of milliseconds, all of them with one of the process's few pooled
connections held, so the pool served a few dozen statements a second and hops waited seconds for a connection
(``make bench-10k``: the env worker's time from a step's claim to its record, less the command, p50 1.3–5.7 s
with cooperative waits, under 10 ms with blocking ones; agents/README.md). With ``MEGAFLOW_GEVENT_DB_BLOCK_MS`` set,
each wait here first blocks the process for up to that long, then yields as before: a statement that waits on a
lock another greenlet of this process holds, or a server slow to answer, stalls the hub no longer than that.

Off by default: a blocked process does nothing else, and on two cores at 10,000 concurrent (a PostgreSQL under
load answers in milliseconds) the model workers' waits for the process made up what the env workers' waits for a
connection lost (agents/README.md, "Now"). It pays where round trips are short against a hub's turn.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from time import monotonic

from gevent import monkey
from psycopg import OperationalError, waiting

_EVENTS = {
    waiting.WAIT_R: select.POLLIN,
    waiting.WAIT_W: select.POLLOUT,
    waiting.WAIT_RW: select.POLLIN | select.POLLOUT,
}


def brief_blocking_wait(block_s: float, blocking_poll: Callable, cooperative: Callable) -> Callable:
    """A psycopg wait function (``psycopg.waiting.wait``'s signature) that polls the connection's socket with
    ``blocking_poll`` (the unpatched ``select.poll``) for ``block_s``, then with ``cooperative`` (a wait that
    yields), which also takes every wait with a timeout (cancels, pool checks: rare, and not on the hot path)."""

    def wait(gen, fileno: int, interval: float = 0.0, timeout: float | None = None):
        if timeout is not None:
            return cooperative(gen, fileno, interval, timeout)
        block_until = monotonic() + block_s
        poller = blocking_poll()
        yielding = False
        try:
            state = next(gen)
            poller.register(fileno, _EVENTS[state])
            while True:
                left_ms = int((block_until - monotonic()) * 1000)
                if not yielding and left_ms <= 0:
                    poller, yielding = select.poll(), True  # gevent's: from here on the hub runs meanwhile
                    poller.register(fileno, _EVENTS[state])
                events = poller.poll(max(1, int(interval * 1000)) if yielding else left_ms)
                if not events:
                    state = gen.send(waiting.READY_NONE)
                else:
                    mask = events[0][1]
                    ready = (waiting.READY_R if mask & select.POLLIN else 0) | (
                        waiting.READY_W if mask & select.POLLOUT else 0
                    )
                    if not ready:  # POLLERR, POLLHUP, POLLNVAL alone: the socket is gone
                        raise OperationalError("connection socket closed")
                    state = gen.send(ready)
                poller.modify(fileno, _EVENTS[state])
        except StopIteration as done:
            return done.value

    return wait


def install(block_ms: float) -> bool:
    """On a gevent-patched process, make psycopg's waits block briefly (``brief_blocking_wait``); True if it did.
    ``block_ms`` 0 leaves psycopg's own cooperative waits."""
    if block_ms <= 0 or not monkey.is_module_patched("select"):
        return False
    waiting.wait = brief_blocking_wait(block_ms / 1000, monkey.get_original("select", "poll"), waiting.wait)
    return True
