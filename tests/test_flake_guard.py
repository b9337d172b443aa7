"""The flake guard (tests/flake_guard.py) fails a session in which a test passed only on a retry."""

from __future__ import annotations

import pytest

RETRY_ONCE = '''
from _pytest.runner import runtestprotocol


def pytest_runtest_protocol(item, nextitem):
    """What a rerun plugin does: run a failed item once more and report both attempts."""
    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(r.failed for r in reports):
        for report in reports:
            hook.pytest_runtest_logreport(report=report)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
'''

FAILS_ONCE = '''
import itertools

calls = itertools.count()


def test_passes_on_the_second_try():
    assert next(calls) > 0


def test_always_passes():
    assert True
'''


def test_a_test_that_passes_only_on_a_retry_fails_the_session(pytester: pytest.Pytester):
    pytester.makeconftest(RETRY_ONCE)
    pytester.makepyfile(test_flaky=FAILS_ONCE)
    result = pytester.runpytest_inprocess("-p", "flake_guard")
    result.stdout.fnmatch_lines(["*FLAKY: 1 test(s) failed and then passed on a retry*",
                                 "FLAKY test_flaky.py::test_passes_on_the_second_try"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_session_without_retries_keeps_its_status(pytester: pytest.Pytester):
    pytester.makepyfile(test_flaky=FAILS_ONCE)
    result = pytester.runpytest_inprocess("-p", "flake_guard")
    result.assert_outcomes(passed=1, failed=1)
    assert "FLAKY" not in result.stdout.str()
    pytester.makepyfile(test_flaky=FAILS_ONCE.replace("> 0", ">= 0"))
    assert pytester.runpytest_inprocess("-p", "flake_guard").ret == pytest.ExitCode.OK
