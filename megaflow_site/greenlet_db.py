"""PostgreSQL on a gevent worker, where a connection must not wait for a greenlet's turn of the hub.

On a gevent-patched process psycopg waits for the server cooperatively (its ``wait_poll`` on gevent's ``poll``): the
greenlet that sent a statement yields to the hub, and runs again only after every greenlet that was ready before it.
At 10,000 concurrent episodes that is hundreds of milliseconds, all of them with one of the process's few pooled
connections held, so the pool served a few dozen statements a second and hops waited seconds for a connection: the
env worker's claim and record 2–7 s p50 each, the model worker's hold 3–10 s once the run was full
(``make bench-10k`` with ``tests/bench/hop_probe``; agents/README.md, "Now").

**Hot statements on native threads** (``MEGAFLOW_GEVENT_DB_THREADS``, 4, on every gevent worker): the hot path's
statements (orchestrator/hot_sql.py) do not use the greenlet's pooled connection at all. Each goes to one of a few
native threads with a connection of its own, which sends it, blocks for the reply with the GIL released, and takes
the next: a connection is busy for a round trip and never for a hub's turn. The greenlet waits for the answer as it
would for a timer. At 10,000 a statement then took 35–400 ms p50 from the greenlet's hand-over to its answer, and
the overhead per step fell from 6–10 s to about 0.5 s p50. Everything else (the ORM, off the hot path) keeps the
pooled connections.

**A brief block before yielding** (``MEGAFLOW_GEVENT_DB_BLOCK_MS``, off): each wait of a pooled connection first
blocks the process for up to that long, then yields as before, so a statement answered within it holds its
connection for its round trip only; one that waits on a lock another greenlet of this process holds, or a slow
server, stalls the hub no longer than the block. Before the threads, on two cores at 10,000 concurrent, the model
workers' waits for a blocked process made up what the env workers' waits for a connection lost.
"""

from __future__ import annotations

import collections
import os
import select
from collections.abc import Callable
from time import monotonic

import gevent
import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from gevent import monkey
from gevent.event import AsyncResult
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


# --- hot statements on native threads ----------------------------------------------------------------------------


class BlockingConnection(psycopg.Connection):
    """A connection used only from a native thread: its waits block that thread (psycopg's C wait, the GIL released)
    instead of polling through gevent's patched ``select``, which a native thread would run a hub of its own for."""

    def wait(self, gen, interval: float = 0.1, timeout: float | None = None):
        if timeout is not None:  # a cancel, a check: rare, and the patched wait serves them
            return super().wait(gen, interval, timeout)
        return waiting.wait_c(gen, self.pgconn.socket, interval)


class StatementThreads:
    """Native threads that run one statement at a time each, on a connection of their own (opened as Django's pool
    opens its own, with Django's adapters, time zone and role), for the greenlets of a gevent worker.

    A greenlet queues its statement on a native queue and waits; a thread takes it, runs it, and hands the outcome
    back through one async watcher of the hub, whose callback wakes every greenlet answered since it last ran. A
    thread takes its next statement at once: gevent's own ``ThreadPool`` frees a thread's slot only once the hub has
    run that callback, so under load each statement held a thread for a turn of the hub as well (at 10,000
    concurrent, 2–3 ms to run a statement, seconds of queueing for one of four threads)."""

    def __init__(self, size: int, alias: str = DEFAULT_DB_ALIAS):
        db = connections[alias]
        self.params = {**db.get_connection_params(), "autocommit": True}
        self.configure = db._configure_connection  # the time zone and role, as Django's pool does on each connect
        self.todo = monkey.get_original("queue", "SimpleQueue")()  # native: a waiting thread blocks, the GIL released
        self.answered: collections.deque = collections.deque()
        self.wake = gevent.get_hub().loop.async_()
        self.wake.start(self._deliver)
        start_thread = monkey.get_original("_thread", "start_new_thread")
        for _ in range(size):
            start_thread(self._work, ())

    def run(self, sql: str, params) -> tuple[list | None, int]:
        """Run ``sql`` on a native thread; (its rows, or None for a statement without any; its rowcount). Waits as a
        greenlet; psycopg's errors arrive as they were raised."""
        result = AsyncResult()
        self.todo.put((sql, params, result))
        return result.get()

    def _work(self) -> None:
        conn = None
        while True:
            sql, params, result = self.todo.get()
            try:
                conn = conn or self._connect()
                self.answered.append((result, True, self._execute(conn, sql, params)))
            except BaseException as error:  # noqa: BLE001 -- the greenlet that sent the statement raises it
                self.answered.append((result, False, error))
                if conn is not None and (conn.broken or conn.closed):
                    conn.close()
                    conn = None
            self.wake.send()

    @staticmethod
    def _execute(conn: BlockingConnection, sql: str, params) -> tuple[list | None, int]:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return (cursor.fetchall() if cursor.description else None), cursor.rowcount

    def _deliver(self) -> None:  # the hub's callback
        while self.answered:
            result, ok, value = self.answered.popleft()
            if ok:
                result.set(value)
            else:
                result.set_exception(value)

    def _connect(self) -> BlockingConnection:
        conn = BlockingConnection.connect(**self.params)
        self.configure(conn)
        return conn

    def cursor(self) -> ThreadCursor:
        return ThreadCursor(self)


class ThreadCursor:
    """What a hot statement uses of a cursor (``execute``, ``fetchone``, ``fetchall``, ``rowcount``), each statement
    run whole on a ``StatementThreads`` thread and its rows kept here."""

    def __init__(self, threads: StatementThreads):
        self.threads, self.rows, self.rowcount, self.at = threads, [], -1, 0

    def execute(self, sql: str, params=None) -> None:
        rows, self.rowcount = self.threads.run(sql, params)
        self.rows, self.at = rows or [], 0

    def fetchone(self):
        if self.at >= len(self.rows):
            return None
        self.at += 1
        return self.rows[self.at - 1]

    def fetchall(self) -> list:
        rows, self.at = self.rows[self.at :], len(self.rows)
        return rows


_threads: StatementThreads | None = None


def statement_threads() -> StatementThreads | None:
    """This process's statement threads, where ``use_statement_threads`` set them up (a gevent worker); else None."""
    return _threads


def use_statement_threads(size: int) -> bool:
    """On a gevent-patched process, run the hot statements on ``size`` native threads (``StatementThreads``); True
    if it does. 0 leaves them on the greenlets' pooled connections."""
    global _threads
    if size <= 0 or not monkey.is_module_patched("select"):
        return False
    _threads = StatementThreads(size)
    return True


def _forget_threads_in_child() -> None:  # a forked child has the list, not the threads or their sockets
    global _threads
    _threads = None


os.register_at_fork(after_in_child=_forget_threads_in_child)
