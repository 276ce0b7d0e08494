"""Per-test outcomes are read from the log formats SWE-style tasks produce, chosen by the task's ``log_parser``
or detected; a log without any per-test result says why instead of grading every test as missing."""

import pytest

from envs.test_results import detect_parser, explain_no_results, parse_test_log, unreadable_reason

PYTEST_RA = """\
tests/test_a.py .F                                                     [100%]
=========================== short test summary info ============================
PASSED tests/test_a.py::test_ok
PASSED tests/test_a.py::test_param[x-1]
FAILED tests/test_a.py::test_bad - AssertionError: assert 1 == 2
ERROR tests/test_b.py::test_setup_error - RuntimeError: boom
XFAIL tests/test_b.py::test_expected - reason
SKIPPED [1] tests/test_b.py:3: not here
"""

PYTEST_VERBOSE = """\
tests/test_a.py::test_ok PASSED                                          [ 50%]
tests/test_a.py::TestX::test_bad FAILED                                  [100%]
"""

PYTEST_COLOURED = "\x1b[32mPASSED\x1b[0m tests/test_a.py::test_ok\n\x1b[31mFAILED\x1b[0m tests/test_a.py::test_bad\n"

JUNIT = """\
some noise before the report
<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" tests="3">
<testcase classname="tests.test_a" name="test_ok" time="0.001" />
<testcase classname="tests.test_a.TestX" name="test_bad" time="0.001"><failure message="1 != 2">x</failure>
</testcase>
<testcase classname="tests.test_b" name="test_skip" time="0.001"><skipped message="later" /></testcase>
</testsuite></testsuites>
noise after
"""

UNITTEST = """\
test_ok (pkg.tests.test_a.ATests.test_ok) ... ok
test_documented (pkg.tests.test_a.ATests.test_documented)
The docstring's first line. ... ok
test_noisy (pkg.tests.test_a.ATests.test_noisy) ... printed by the test
ok
test_bad (pkg.tests.test_a.ATests.test_bad) ... FAIL
test_boom (pkg.tests.test_a.ATests.test_boom) ... ERROR

======================================================================
FAIL: test_bad (pkg.tests.test_a.ATests.test_bad)
----------------------------------------------------------------------
Ran 5 tests in 0.001s

FAILED (failures=1, errors=1)
"""

DJANGO = """\
test_valid (forms_tests.tests.test_forms.FormsTestCase) ... ok
test_invalid (forms_tests.tests.test_forms.FormsTestCase) ... FAIL
test_skip (forms_tests.tests.test_forms.FormsTestCase) ... skipped 'no db'
test_late (forms_tests.tests.test_forms.FormsTestCase) ... System check identified no issues (0 silenced).
ok
"""


def test_pytest_short_summary():
    assert (
        parse_test_log(PYTEST_RA, "pytest")
        == parse_test_log(PYTEST_RA)
        == {
            "tests/test_a.py::test_ok": "passed",
            "tests/test_a.py::test_param[x-1]": "passed",
            "tests/test_a.py::test_bad": "failed",
            "tests/test_b.py::test_setup_error": "failed",
            "tests/test_b.py::test_expected": "failed",
        }
    )


def test_pytest_verbose_lines_and_colour_codes():
    assert parse_test_log(PYTEST_VERBOSE) == {
        "tests/test_a.py::test_ok": "passed",
        "tests/test_a.py::TestX::test_bad": "failed",
    }
    coloured = parse_test_log(PYTEST_COLOURED)
    assert coloured == {"tests/test_a.py::test_ok": "passed", "tests/test_a.py::test_bad": "failed"}


def test_junit_xml_in_the_log_gives_dotted_ids_and_pytest_node_ids():
    outcomes = parse_test_log(JUNIT)
    assert detect_parser(JUNIT) == "junit"
    assert outcomes["tests.test_a.test_ok"] == outcomes["tests/test_a.py::test_ok"] == "passed"
    assert outcomes["tests.test_a.TestX.test_bad"] == outcomes["tests/test_a.py::TestX::test_bad"] == "failed"
    assert outcomes["tests/test_b.py::test_skip"] == "failed"
    assert parse_test_log("<testsuite><testcase name='broken'", "junit") == {}


def test_unittest_verbose_with_docstrings_and_output_before_the_verdict():
    assert detect_parser(UNITTEST) == "unittest"
    assert parse_test_log(UNITTEST, "unittest") == {
        "test_ok (pkg.tests.test_a.ATests.test_ok)": "passed",
        "test_documented (pkg.tests.test_a.ATests.test_documented)": "passed",
        "test_noisy (pkg.tests.test_a.ATests.test_noisy)": "passed",
        "test_bad (pkg.tests.test_a.ATests.test_bad)": "failed",
        "test_boom (pkg.tests.test_a.ATests.test_boom)": "failed",
    }


def test_django_runner():
    assert (
        parse_test_log(DJANGO, "django")
        == parse_test_log(DJANGO)
        == {
            "test_valid (forms_tests.tests.test_forms.FormsTestCase)": "passed",
            "test_invalid (forms_tests.tests.test_forms.FormsTestCase)": "failed",
            "test_skip (forms_tests.tests.test_forms.FormsTestCase)": "failed",
            "test_late (forms_tests.tests.test_forms.FormsTestCase)": "passed",
        }
    )


def test_a_chosen_parser_reads_only_its_format():
    assert parse_test_log(DJANGO, "pytest") == {}
    assert parse_test_log(PYTEST_RA, "unittest") == {}


def test_noise_is_ignored():
    assert parse_test_log("collected 3 items\n\n3 passed in 0.1s\nPASSED but not a test id\n") == {}


@pytest.mark.parametrize(
    "log, parser, hint",
    [
        ("collected 3 items\n\n...                 [100%]\n3 passed in 0.01s\n", "auto", "for pytest, add -rA"),
        ("....\n---\nRan 4 tests in 0.001s\n\nOK\n", "auto", "add -v (unittest) or --verbosity 2"),
        ("collected 0 items\n\n=== no tests ran in 0.01s ===\n", "auto", "pytest collected no tests"),
        ("collected 0 items / 1 error\nInterrupted: 1 error during collection\n", "auto", "errors while collecting"),
        ("bash: pytest: command not found\n", "auto", "for pytest, add -rA; for unittest, -v"),
        ("3 passed in 0.1s\n", "django", "log_parser 'django'); for Django's runner, add --verbosity 2"),
    ],
)  # fmt: skip
def test_a_log_without_per_test_results_says_why(log, parser, hint):
    assert parse_test_log(log, parser) == {}
    reason = explain_no_results(log, parser, exit_code=0)
    assert reason.startswith("the test command printed no per-test results (exit 0)") and hint in reason
    assert unreadable_reason(log, {}, parser, exit_code=0) == reason


QUIET_PYTEST = """\
..F.                                                                     [100%]
=========================== short test summary info ============================
FAILED tests/test_a.py::test_bad - assert 1 == 2
1 failed, 3 passed in 0.02s
"""

QUIET_UNITTEST = """\
.F
======================================================================
FAIL: test_bad (pkg.tests.ATests.test_bad)
----------------------------------------------------------------------
Ran 2 tests in 0.001s

FAILED (failures=1)
"""


def test_a_log_that_names_only_the_failures_cannot_grade_the_passing_tests():
    pytest_outcomes = parse_test_log(QUIET_PYTEST)
    assert pytest_outcomes == {"tests/test_a.py::test_bad": "failed"}
    reason = unreadable_reason(QUIET_PYTEST, pytest_outcomes)
    assert "pytest reported 3 passed tests but named only the failures" in reason and "add -rA" in reason
    unittest_outcomes = parse_test_log(QUIET_UNITTEST)
    assert unittest_outcomes == {"test_bad (pkg.tests.ATests.test_bad)": "failed"}
    assert "unittest ran 2 tests but named only the failures" in unreadable_reason(QUIET_UNITTEST, unittest_outcomes)
    # Every test failing, each named, is a result; so is any log that names a passing test.
    all_failed = "FAILED tests/test_a.py::test_a\nFAILED tests/test_a.py::test_b\n2 failed in 0.01s\n"
    assert unreadable_reason(all_failed, parse_test_log(all_failed)) == ""
    assert unreadable_reason(PYTEST_RA, parse_test_log(PYTEST_RA)) == ""


# --- in a real sandbox ------------------------------------------------------------------------------------------


def swe_mini_task(swe_mini, **changes):
    """The first swe_mini task, its test command (and extra fields) changed, as an unsaved copy."""
    task = swe_mini.tasks.order_by("instance_id").first()
    task.pk = None
    task.extra = {**task.extra, **changes.pop("extra", {})}
    for name, value in changes.items():
        setattr(task, name, value)
    return task


@pytest.mark.integration
def test_a_quiet_pytest_command_is_an_evaluation_error_with_its_reason(docker_backend, swe_mini):
    from envs import gold_check

    task = swe_mini_task(swe_mini, test_command="python3 -m pytest -q -p no:cacheprovider")
    result = gold_check.check_task(docker_backend, task)
    assert not result.ok
    expected = "pytest reported 11 passed tests but named only the failures, so passing tests cannot be graded"
    assert f"base tree: {expected}; for pytest, add -rA" in result.problems, result.problems
    assert any(problem.startswith("with the reference patch: the test command printed no per-test results (exit 0)")
               and "add -rA" in problem for problem in result.problems), result.problems  # fmt: skip


@pytest.mark.integration
def test_a_junit_report_grades_the_task(docker_backend, swe_mini):
    from envs import gold_check

    task = swe_mini_task(
        swe_mini, test_command="python3 -m pytest -q -p no:cacheprovider --junitxml=/dev/stdout",
        extra={"log_parser": "junit"},
    )  # fmt: skip
    result = gold_check.check_task(docker_backend, task)
    assert result.ok, result.problems
