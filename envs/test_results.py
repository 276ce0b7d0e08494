"""Per-test outcomes from a test run's log, parsed as SWE-bench's harness does (``swebench/harness/log_parsers``).

A task names its parser in the field ``log_parser``; the default, ``auto``, detects it from the output:

- ``pytest``: ``-rA`` short summary lines (``PASSED tests/test_x.py::test_y``) and ``-v`` lines
  (``tests/test_x.py::test_y PASSED [ 50%]``), colour codes stripped;
- ``junit``: JUnit XML (``pytest --junitxml``, most other runners), printed into the log;
- ``unittest``: ``python -m unittest -v`` (``test_y (pkg.mod.XTests.test_y) ... ok``), plus the ``FAIL:`` and
  ``ERROR:`` headers it prints without ``-v``;
- ``django``: Django's runner at ``--verbosity 2``, the unittest format with SWE-bench's fixes for output that
  lands between a test's name and its ``ok``.

A test the log does not report as passed counts as failed: a crash that kills the run fails every test. A log
that cannot grade (it names no test, or names only the failures of a runner that counted passes) is not a
result: ``unreadable_reason`` says why, and the evaluation is an error.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable

PASSED = "passed"
FAILED = "failed"
AUTO = "auto"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PYTEST_WORDS = "PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED"
_PYTEST_SUMMARY = re.compile(rf"^({_PYTEST_WORDS}) (\S+::\S.*?)(?: - .*)?$")
_PYTEST_VERBOSE = re.compile(rf"^(\S+::\S.*?) ({_PYTEST_WORDS})(?: +\[ *\d+%\])?$")
# XPASS counts as passed and XFAIL as not, as before: a listed test must really pass.
_PYTEST_STATUS = {"PASSED": PASSED, "XPASS": PASSED}

_TEST_ID = r"\w+ \([\w.]+\)"  # test_y (pkg.mod.XTests) before Python 3.11, test_y (pkg.mod.XTests.test_y) after
_VERDICT = r"(ok|OK|FAIL|ERROR|skipped.*|expected failure|unexpected success)"
_UNITTEST_LINE = re.compile(rf"^({_TEST_ID}) \.\.\. {_VERDICT}$")
_UNITTEST_HEADER = re.compile(rf"^(?:FAIL|ERROR): ({_TEST_ID})")
_UNITTEST_ALONE = re.compile(rf"^({_TEST_ID})$")  # its docstring follows on the next line
_UNITTEST_PENDING = re.compile(rf"^({_TEST_ID}) \.\.\. ")  # output came before the verdict
_VERDICT_AT_END = re.compile(rf" \.\.\. {_VERDICT}$")
_VERDICT_ALONE = re.compile(rf"^{_VERDICT}$")
_UNITTEST_PASSED = ("ok", "OK", "unexpected success")

_JUNIT_START = re.compile(r"<(testsuites?)[\s>]")


def _lines(log: str):
    for raw in log.splitlines():
        yield _ANSI.sub("", raw).rstrip()


def parse_pytest(log: str) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for line in _lines(log):
        if match := _PYTEST_SUMMARY.match(line):
            outcomes[match.group(2)] = _PYTEST_STATUS.get(match.group(1), FAILED)
        elif match := _PYTEST_VERBOSE.match(line):
            outcomes[match.group(1)] = _PYTEST_STATUS.get(match.group(2), FAILED)
    return outcomes


def parse_unittest(log: str) -> dict[str, str]:
    """unittest's and Django's runner's verbose format; also what lands between a test's name and its verdict:
    a docstring line (``name`` alone, then ``docstring ... ok``) or the test's own output (``name ... <output>``,
    then ``ok`` alone), as SWE-bench's Django parser handles it."""
    outcomes: dict[str, str] = {}
    pending = None  # a test whose verdict has not been printed yet

    def verdict(word: str) -> str:
        return PASSED if word in _UNITTEST_PASSED else FAILED

    for line in _lines(log):
        if match := _UNITTEST_LINE.match(line):
            outcomes[match.group(1)], pending = verdict(match.group(2)), None
        elif match := _UNITTEST_HEADER.match(line):
            outcomes[match.group(1)] = FAILED
        elif match := _UNITTEST_ALONE.match(line) or _UNITTEST_PENDING.match(line):
            pending = match.group(1)
        elif pending and (match := _VERDICT_AT_END.search(line) or _VERDICT_ALONE.match(line.strip())):
            outcomes[pending], pending = verdict(match.group(1)), None
    return outcomes


def _junit_ids(case: ElementTree.Element) -> list[str]:
    """``classname.name`` and, for pytest's reports, the node id (``tests/test_x.py::Class::test_y``)."""
    name, classname = case.get("name", ""), case.get("classname", "")
    ids = [f"{classname}.{name}" if classname else name]
    if file := case.get("file"):
        classes = [part for part in classname.split(".") if part[:1].isupper()]
        ids.append("::".join([file, *classes, name]))
    elif classname:
        parts = classname.split(".")
        modules = [part for part in parts if not part[:1].isupper()]
        classes = parts[len(modules) :]
        if modules:
            ids.append("::".join(["/".join(modules) + ".py", *classes, name]))
    return ids


def parse_junit(log: str) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    position = 0
    while start := _JUNIT_START.search(log, position):
        closing = f"</{start.group(1)}>"
        end = log.find(closing, start.start())
        if end < 0:
            break
        position = end + len(closing)
        document = log[start.start() : position]
        try:
            root = ElementTree.fromstring(document)
        except ElementTree.ParseError:
            continue
        for case in root.iter("testcase"):
            bad = any(child.tag in ("failure", "error", "skipped") for child in case)
            for test_id in _junit_ids(case):
                outcomes[test_id] = FAILED if bad else PASSED
    return outcomes


PARSERS: dict[str, Callable[[str], dict[str, str]]] = {
    "pytest": parse_pytest,
    "junit": parse_junit,
    "unittest": parse_unittest,
    "django": parse_unittest,  # the same format: Django's runner is unittest's
}
LOG_PARSERS = (AUTO, *PARSERS)


def detect_parser(log: str) -> str | None:
    """The parser whose format the log is in, or None when no parser finds a test in it."""
    for name in ("junit", "pytest", "unittest"):
        if PARSERS[name](log):
            return name
    return None


def parse_test_log(log: str, parser: str = AUTO) -> dict[str, str]:
    """Test id → ``passed`` / ``failed`` for every test the log reports, read by ``parser`` (``auto``: detect)."""
    if parser == AUTO:
        parser = detect_parser(log)
        if parser is None:
            return {}
    return PARSERS[parser](log)


_PYTEST_RAN = re.compile(r"^(=+ test session starts|collected \d+ items?|=+ .*\d+ (passed|failed|error).* in )", re.M)
_PYTEST_PASSED_COUNT = re.compile(r"^=*\s*(?:.*, )?(\d+) passed\b.* in [\d.]+s", re.MULTILINE)
_PYTEST_COLLECTION_ERRORS = re.compile(r"^(?:=+ )?Interrupted: \d+ errors? during collection", re.MULTILINE)
_PYTEST_COLLECTED_NOTHING = re.compile(r"^(collected 0 items|=+ no tests ran)", re.MULTILINE)
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in ", re.MULTILINE)
_HINTS = {
    "pytest": "for pytest, add -rA",
    "junit": "print the JUnit XML report into the output, e.g. pytest --junitxml=/dev/stdout",
    "unittest": "for unittest, add -v",
    "django": "for Django's runner, add --verbosity 2",
}


def unreadable_reason(log: str, outcomes: dict[str, str], parser: str = AUTO, exit_code: int | None = None) -> str:
    """Why the log cannot grade the task, or "": it names no test at all, or its runner counted passed tests
    that it never named (pytest without ``-rA`` names only the failures, unittest without ``-v`` likewise)."""
    if not outcomes:
        return explain_no_results(log, parser, exit_code)
    if any(outcome == PASSED for outcome in outcomes.values()):
        return ""
    log = "\n".join(_lines(log))
    if (counted := _PYTEST_PASSED_COUNT.search(log)) and int(counted.group(1)) > 0:
        return (
            f"pytest reported {counted.group(1)} passed tests but named only the failures, so passing tests "
            "cannot be graded; for pytest, add -rA"
        )
    if (ran := _UNITTEST_RAN.search(log)) and int(ran.group(1)) > len(outcomes):
        return (
            f"unittest ran {ran.group(1)} tests but named only the failures, so passing tests cannot be graded; "
            "add -v (unittest) or --verbosity 2 (Django's runner)"
        )
    return ""


def explain_no_results(log: str, parser: str = AUTO, exit_code: int | None = None) -> str:
    """Why a test run yielded no per-test result, and what to change in the task's ``test_command``."""
    log = "\n".join(_lines(log))
    exit_note = f" (exit {exit_code})" if exit_code is not None else ""
    base = f"the test command printed no per-test results{exit_note}"
    if parser not in (AUTO, None):
        return f"{base} in the {parser} format (log_parser {parser!r}); {_HINTS[parser]}"
    if _PYTEST_COLLECTION_ERRORS.search(log):
        return f"{base}: pytest stopped on errors while collecting the tests"
    if _PYTEST_COLLECTED_NOTHING.search(log):
        return f"{base}: pytest collected no tests; check the test paths in test_command"
    if _PYTEST_RAN.search(log):
        return f"{base}: pytest printed only its summary; for pytest, add -rA"
    if _UNITTEST_RAN.search(log):
        return f"{base}: unittest printed only its summary; add -v (unittest) or --verbosity 2 (Django's runner)"
    return f"{base}; for pytest, add -rA; for unittest, -v; for Django's runner, --verbosity 2"
