"""The cyclic garbage collector of a worker process, set for a long-lived process with thousands of hops in flight.

CPython frees almost every object by reference counting; its cyclic collector exists for the rest, and by default
it examines the young generation every 700 net container allocations, the middle one every ten of those, and
everything every ten of those again. A hot worker holds thousands of live containers that are not garbage: every
in-flight hop's message, its episode's prompt as a list of ids (thousands of elements, each visited), the model
worker's turn cache. Each young pass walked whichever of them were new, each middle pass walked them again, each
full pass walked the whole heap, Django and Celery included: in a 1,000-episode bench run, each model worker spent
about 7 s in the collector and each env worker about 3.5 s (a ``gc.callbacks`` probe; the run's steady state costs
a model worker about 13 s of CPU). agents/README.md, "Where a step's time goes".

So when a worker is ready (its code imported, its pool started), what is alive then is collected once and frozen
out of the collector's sight (``gc.freeze``: those objects live as long as the process anyway), and the young
generation is examined every ``MEGAFLOW_GC_YOUNG_THRESHOLD`` allocations instead of 700. Garbage in cycles is still
collected, a little later. ``celery -A megaflow_site inspect gc_state`` shows a worker's settings and the
collector's counts.
"""

from __future__ import annotations

import gc
import logging

from celery import signals
from celery.worker.control import inspect_command
from django.conf import settings

logger = logging.getLogger("megaflow.gc")


def tune() -> None:
    """Collect and freeze what is alive now, and set the young generation's threshold (settings)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(settings.MEGAFLOW_GC_YOUNG_THRESHOLD, middle, old)
    logger.info(
        "garbage collector: %s objects frozen, the young generation examined every %s allocations",
        gc.get_freeze_count(),
        settings.MEGAFLOW_GC_YOUNG_THRESHOLD,
    )


def state() -> dict:
    return {
        "threshold": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
        "count": list(gc.get_count()),
        "generations": gc.get_stats(),
    }


@signals.worker_ready.connect
def _tune_ready_worker(**_) -> None:
    if settings.MEGAFLOW_GC_YOUNG_THRESHOLD:
        tune()


@inspect_command()
def gc_state(state_, **_) -> dict:
    """The garbage collector of this worker: thresholds, objects frozen, pending counts, each generation's passes."""
    return state()
