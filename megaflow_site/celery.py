"""The Celery app, configured from Django settings (``CELERY_*``) and the topology module.

Start a worker of one service with the command ``python -m megaflow_site.topology`` prints, e.g.
``celery -A megaflow_site worker -Q agent -n agent@%h --concurrency 8``.
"""

import os

from celery import Celery, signals
from django.conf import settings

from megaflow_site import broker, greenlet_db, preflight, topology
from megaflow_site.config_errors import ConfigError, exit_with

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
broker.install()  # redis:// through megaflow_site/broker.py: one Redis client per channel, not one per command

app = Celery("megaflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _declare_topology(sender: Celery, **_) -> None:
    sender.conf.task_queues = topology.declared_queues()
    sender.conf.task_default_queue = topology.AGENT_QUEUE
    sender.conf.task_routes = (topology.route_task,)
    # A queue missing from task_queues is a typo or a stale config, never a reason to invent one.
    sender.conf.task_create_missing_queues = False


@signals.worker_init.connect
def _preflight_worker(**_) -> None:
    """Refuse to start a worker against a database or broker it cannot reach: one line, no traceback."""
    try:
        preflight.check_database()
        preflight.check_redis()
    except ConfigError as error:
        exit_with(error)


@signals.worker_init.connect
def _greenlet_db_waits(**_) -> None:
    """On a gevent worker, the hot statements run on native threads, and a PostgreSQL wait may block briefly before it
    yields (megaflow_site/greenlet_db.py)."""
    greenlet_db.install(settings.MEGAFLOW_GEVENT_DB_BLOCK_MS)
    greenlet_db.use_statement_threads(settings.MEGAFLOW_GEVENT_DB_THREADS)


# Every publisher stamps its messages' send time, for the queue wait each task records (megaflow_site/megaflow_task.py);
# a ready worker's garbage collector is set for thousands of hops in flight (`celery inspect gc_state` shows it).
import megaflow_site.gc_tuning  # noqa: E402,F401
import megaflow_site.megaflow_task  # noqa: E402,F401
