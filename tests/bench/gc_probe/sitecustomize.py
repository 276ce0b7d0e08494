"""How long each process of a bench spends in the cyclic garbage collector, which profilers charge to whatever line
allocated when a collection started (agents/README.md, "Where a step's time goes", fourth stop).

Put this directory first on ``PYTHONPATH`` for a bench and every Python process it starts imports it at start-up::

    PYTHONPATH=tests/bench/gc_probe python -m tests.bench.orchestration --levels 1000

Each process that runs Celery writes, every 5 s, ``var/bench/gc/<pid>.json``: its command line, and per generation
the collections, the seconds they took in all and the longest one. ``MEGAFLOW_GC_PROBE_GARBAGE_AT=30`` also keeps
what the collector frees from 30 s to 35 s after start (``gc.DEBUG_SAVEALL``) and writes the count of each type of
it to ``<pid>.garbage.json``: what makes the cycles.
"""

import collections
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[3] / "var" / "bench" / "gc"
EVERY_S = 5.0

_started: dict[int, float] = {}
_passes = {generation: {"collections": 0, "seconds": 0.0, "longest_s": 0.0} for generation in range(3)}


def _timed(phase: str, info: dict) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
        return
    took = time.perf_counter() - _started.pop(generation, time.perf_counter())
    passes = _passes[generation]
    passes["collections"] += 1
    passes["seconds"] += took
    passes["longest_s"] = max(passes["longest_s"], took)


def _report() -> None:
    while True:
        time.sleep(EVERY_S)
        report = {"argv": sys.argv, "generations": _passes, "threshold": gc.get_threshold()}
        (OUT / f"{os.getpid()}.json").write_text(json.dumps(report))


def _keep_garbage(at_s: float) -> None:
    time.sleep(at_s)
    gc.set_debug(gc.DEBUG_SAVEALL)
    time.sleep(5)
    gc.collect()
    gc.set_debug(0)
    kinds = collections.Counter(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in gc.garbage)
    gc.garbage.clear()
    (OUT / f"{os.getpid()}.garbage.json").write_text(json.dumps(kinds.most_common(40)))


if Path(sys.argv[0]).name == "celery":  # the workers (a ``python -m`` process's argv is not known yet here)
    OUT.mkdir(parents=True, exist_ok=True)
    gc.callbacks.append(_timed)
    threading.Thread(target=_report, name="gc-probe", daemon=True).start()
    if at := os.environ.get("MEGAFLOW_GC_PROBE_GARBAGE_AT"):
        threading.Thread(target=_keep_garbage, args=(float(at),), name="gc-probe-garbage", daemon=True).start()
