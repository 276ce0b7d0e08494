#!/usr/bin/env python
"""Django's command-line utility; configuration errors print one line instead of a traceback."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    from django.core.management import execute_from_command_line

    from megaflow_site.config_errors import ConfigError, exit_with

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
