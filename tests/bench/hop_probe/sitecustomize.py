"""Where a hop's time goes, phase by phase, in every worker of a bench (agents/README.md, "Not reached", item 8).

Put this directory first on ``PYTHONPATH`` for a bench and every Celery process it starts times its hops' phases::

    PYTHONPATH=tests/bench/hop_probe python -m tests.bench.orchestration --levels 1000

Once the worker has imported the episode loop, this wraps (in that process only) the calls a hop makes: a batched
hop's queue wait and run (``megaflow_task.run_hop``), the model turn's hold-and-history, its ids read back, its
generation (and how much longer it took than the backend's own latency), the env step's hold-and-claim, its
command, its record, what follows it, and every hop's hand-over to the batcher; and a hot statement sent to a
native thread (megaflow_site/greenlet_db.py): the greenlet's whole wait, its wait for a thread to take it
(``db.to_thread``), its run there, and the wait from its answer until the greenlet runs again
(``db.back_to_greenlet``). Each process writes, every 5 s, one line to ``var/bench/hops/<pid>.jsonl``: the time,
and per phase the count, mean, p50, p90, p99 and max in ms over those 5 s. ``python -m
tests.bench.hop_probe.report`` sums them across processes per 20 s of the run.

Wall times, not CPU: on a gevent worker a phase includes the hub's turns of every other greenlet while it waits
(for a pooled connection, a reply, a timer), which is the point.
"""

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[3] / "var" / "bench" / "hops"
EVERY_S = 5.0

_samples: dict[str, list[float]] = {}


def _note(phase: str, seconds: float) -> None:
    samples = _samples.get(phase)
    if samples is None:
        samples = _samples.setdefault(phase, [])
    samples.append(seconds)


def _timed(phase: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _note(phase, time.perf_counter() - began)

    return timed


def _timed_generate(fn):
    @functools.wraps(fn)
    def generate(model, requests):
        began = time.perf_counter()
        generations = fn(model, requests)
        took = time.perf_counter() - began
        _note("turn.generate", took)
        if generations and generations[0].latency_s:
            _note("turn.generate_beyond_latency", took - generations[0].latency_s)
        return generations

    return generate


def _timed_run_hop(fn):
    @functools.wraps(fn)
    def run_hop(name, queue, kwargs, queued_at=None):
        if queued_at is not None:
            _note(f"{name}.queue_wait", max(0.0, time.time() - queued_at))
        return _timed(f"{name}.run", fn)(name, queue, kwargs, queued_at)

    return run_hop


def _timed_statement_threads(threads_class) -> None:
    """A statement on a native thread (megaflow_site/greenlet_db.py): its run there, and the rest of the greenlet's
    wait (for a thread, then for the hub once it was answered)."""
    run, execute = threads_class.run, threads_class._execute
    on_thread: dict[int, list[float]] = {}  # id(params) → [taken by a thread, answered]: params travel as they are

    def timed_run(self, sql, params):
        began = time.perf_counter()
        marks = on_thread.setdefault(id(params), []) if params is not None else None
        try:
            return run(self, sql, params)
        finally:
            ended = time.perf_counter()
            _note("db.statement", ended - began)
            if marks is not None and len(on_thread.pop(id(params), ())) == 2:
                _note("db.to_thread", marks[0] - began)  # queued until a thread took it
                _note("db.back_to_greenlet", ended - marks[1])  # answered until the greenlet ran again

    def timed_execute(conn, sql, params):
        marks = on_thread.get(id(params)) if params is not None else None
        if marks is not None:
            marks.append(time.perf_counter())
        try:
            return execute(conn, sql, params)
        finally:
            if marks is not None:
                marks.append(time.perf_counter())

    threads_class.run = timed_run
    threads_class._execute = staticmethod(_timed("db.ran_on_thread", timed_execute))


def _install(loop, task, transitions, hot_sql) -> None:
    if threads_class := getattr(sys.modules.get("megaflow_site.greenlet_db"), "StatementThreads", None):
        _timed_statement_threads(threads_class)
    task.run_hop = _timed_run_hop(task.run_hop)
    transitions.hold_returning_with_history = _timed("turn.hold_history", transitions.hold_returning_with_history)
    transitions.hold_and_claim = _timed("step.hold_claim", transitions.hold_and_claim)
    hot_sql.turn_ids = _timed("turn.ids_read_back", hot_sql.turn_ids)
    hot_sql.record_and_count_step = _timed("step.record", hot_sql.record_and_count_step)
    loop.model_service = _Proxy(loop.model_service, generate=_timed_generate(loop.model_service.generate))
    loop.env_service = _Proxy(loop.env_service, run_command=_timed("step.command", loop.env_service.run_command))
    loop._after_step = _timed("step.after", loop._after_step)
    loop.send = _timed("send", loop.send)


class _Proxy:
    """A module with some of its functions replaced, for the one module that calls them."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    n = len(values)
    at = lambda q: round(1000 * values[min(n - 1, int(q * n))], 3)  # noqa: E731
    return {"n": n, "mean": round(1000 * sum(values) / n, 3), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(1000 * values[-1], 3)}  # fmt: skip


def _run() -> None:
    global _samples
    names = ("orchestrator.episode_loop", "megaflow_site.megaflow_task", "orchestrator.transitions",
             "orchestrator.hot_sql")  # fmt: skip
    while not all(hasattr(sys.modules.get(name), "__file__") for name in names) or not hasattr(
        sys.modules["orchestrator.episode_loop"], "_previous_turn"
    ):
        time.sleep(0.2)
    _install(*(sys.modules[name] for name in names))
    path = OUT / f"{os.getpid()}.jsonl"
    while True:
        time.sleep(EVERY_S)
        samples, _samples = _samples, {}
        line = {"t": time.time(), "argv": sys.argv[-6:], "phases": {k: _stats(v) for k, v in samples.items() if v}}
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")


if Path(sys.argv[0]).name == "celery":
    if switch := os.environ.get("HOP_PROBE_SWITCH_INTERVAL_S"):  # an experiment: the GIL's switch interval
        sys.setswitchinterval(float(switch))
    OUT.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_run, name="hop-probe", daemon=True).start()
