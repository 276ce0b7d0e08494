"""Per-test outcomes from a test run's log, for the two formats SWE-style tasks use.

- pytest with ``-rA`` (short summary: ``PASSED tests/test_x.py::test_y``) or ``-v``
  (``tests/test_x.py::test_y PASSED [ 50%]``);
- Django's runner at verbosity 2 (``test_y (app.tests.XTests) ... ok``).

A test that the log does not report as passed counts as failed: a crash that kills the run fails every test.
"""

import re

PASSED = "passed"
FAILED = "failed"

_PYTEST_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL) (\S+::\S.*?)(?: - .*)?$")
_PYTEST_VERBOSE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|XPASS|XFAIL)(?: +\[ *\d+%\])?$")
_DJANGO = re.compile(
    r"^(\w+ \([\w.]+\))(?:\n.*)? \.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$"
)

_PYTEST_STATUS = {"PASSED": PASSED, "XPASS": PASSED, "FAILED": FAILED, "ERROR": FAILED, "XFAIL": FAILED}


def parse_test_log(log: str) -> dict[str, str]:
    """Test id → ``passed`` / ``failed`` for every test the log reports."""
    outcomes: dict[str, str] = {}
    for raw in log.splitlines():
        line = raw.rstrip()
        if match := _PYTEST_SUMMARY.match(line):
            outcomes[match.group(2)] = _PYTEST_STATUS[match.group(1)]
        elif match := _PYTEST_VERBOSE.match(line):
            outcomes[match.group(1)] = _PYTEST_STATUS[match.group(2)]
        elif match := _DJANGO.match(line):
            outcomes[match.group(1)] = PASSED if match.group(2) == "ok" else FAILED
    return outcomes
