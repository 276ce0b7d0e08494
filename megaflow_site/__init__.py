"""MegaFlow's Django project: settings, URLs, the Celery app and its queue topology."""

from megaflow_site.config_errors import install_excepthook

install_excepthook()

from megaflow_site.celery import app as celery_app  # noqa: E402

__all__ = ("celery_app",)
