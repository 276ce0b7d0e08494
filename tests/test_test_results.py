"""Per-test outcomes are read from the log formats SWE-style tasks produce."""

from envs.test_results import parse_test_log

PYTEST_RA = """\
tests/test_a.py .F                                                     [100%]
=========================== short test summary info ============================
PASSED tests/test_a.py::test_ok
PASSED tests/test_a.py::test_param[x-1]
FAILED tests/test_a.py::test_bad - AssertionError: assert 1 == 2
ERROR tests/test_b.py::test_setup_error - RuntimeError: boom
XFAIL tests/test_b.py::test_expected - reason
"""

PYTEST_VERBOSE = """\
tests/test_a.py::test_ok PASSED                                          [ 50%]
tests/test_a.py::test_bad FAILED                                         [100%]
"""

DJANGO = """\
test_valid (forms_tests.tests.test_forms.FormsTestCase) ... ok
test_invalid (forms_tests.tests.test_forms.FormsTestCase) ... FAIL
test_skip (forms_tests.tests.test_forms.FormsTestCase) ... skipped 'no db'
"""


def test_pytest_short_summary():
    assert parse_test_log(PYTEST_RA) == {
        "tests/test_a.py::test_ok": "passed",
        "tests/test_a.py::test_param[x-1]": "passed",
        "tests/test_a.py::test_bad": "failed",
        "tests/test_b.py::test_setup_error": "failed",
        "tests/test_b.py::test_expected": "failed",
    }


def test_pytest_verbose_lines():
    assert parse_test_log(PYTEST_VERBOSE) == {
        "tests/test_a.py::test_ok": "passed",
        "tests/test_a.py::test_bad": "failed",
    }


def test_django_runner():
    assert parse_test_log(DJANGO) == {
        "test_valid (forms_tests.tests.test_forms.FormsTestCase)": "passed",
        "test_invalid (forms_tests.tests.test_forms.FormsTestCase)": "failed",
        "test_skip (forms_tests.tests.test_forms.FormsTestCase)": "failed",
    }


def test_noise_is_ignored():
    assert parse_test_log("collected 3 items\n\n3 passed in 0.1s\nPASSED but not a test id\n") == {}
