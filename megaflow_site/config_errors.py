"""The one error type for bad configuration, and the one place that prints it.

Entry points (manage.py, the Celery worker boot, the Makefile's helpers) catch ``ConfigError`` and print
a single line, ``megaflow: <what is wrong> -- <how to fix it>``, instead of a traceback: a user who mistyped
``DATABASE_URL`` needs the fix, not Django's call stack.
"""

import os
import sys
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

EXIT_CONFIG = 2


class ConfigError(ImproperlyConfigured):
    """Configuration is wrong in a way the user must fix; ``problem`` and ``fix`` are one short sentence each."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}")

    def line(self) -> str:
        return f"megaflow: {self.problem} -- {self.fix}"


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit(parts._replace(netloc=netloc))


def exit_with(error: ConfigError) -> NoReturn:
    print(error.line(), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def install_excepthook() -> None:
    """Make an uncaught ``ConfigError`` print its one line, whichever CLI loaded the settings.

    manage.py catches it explicitly; the Celery CLI loads Django settings lazily, deep inside its own start-up,
    so this hook is what keeps a worker with a bad ``DATABASE_URL`` from printing a traceback.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if isinstance(exc, ConfigError):
            print(exc.line(), file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_CONFIG)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
