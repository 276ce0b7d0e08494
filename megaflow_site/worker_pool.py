"""The pool every MegaFlow worker runs: Celery's thread pool, plus ``grow`` and ``shrink``.

Celery's ``pool_grow`` / ``pool_shrink`` remote-control commands resize a prefork pool; its thread pool has no
such methods and answers them with an error. The autoscaler (orchestrator/autoscale.py) actuates through those
commands, so this pool adds them. Growing raises the executor's thread ceiling; shrinking lowers it. Celery
moves the worker's prefetch count with either, and that count is what bounds the messages a worker holds at
once: after a shrink, threads above the ceiling stay parked and the worker takes less work.
"""

from celery.concurrency.thread import TaskPool


class ResizableThreadPool(TaskPool):
    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(max(1, self.limit - n))

    def _resize(self, limit: int) -> None:
        self.limit = limit
        # ThreadPoolExecutor starts threads lazily, up to this ceiling (CPython's, unchanged since 3.8).
        self.executor._max_workers = limit
