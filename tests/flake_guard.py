"""A pytest plugin that turns a flake into a failure: a test that failed (or was marked for a
rerun) and then passed within one session fails the session.

Nothing in this suite retries, and nothing may: a rerun plugin (``--reruns``) or a hook that runs
an item twice would hide a flaky test behind a green run. This guard names every such test in
the summary and sets the exit status to 1, whatever the retry mechanism.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

FAILED_ATTEMPTS = ("failed", "rerun")


def flaky_tests(outcomes: dict[str, list[str]]) -> list[str]:
    """Node ids whose last outcome passed after an earlier attempt failed."""
    return sorted(node for node, seen in outcomes.items()
                  if seen and seen[-1] == "passed" and any(o in FAILED_ATTEMPTS for o in seen[:-1]))


class FlakeGuard:
    """Every attempt's outcome per test, for one pytest session (one per config, so that a
    session run inside another, as with pytester, keeps its own record)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[str]] = defaultdict(list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid].append(report.outcome)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        flaky = flaky_tests(self.outcomes)
        if not flaky:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", f"FLAKY: {len(flaky)} test(s) failed and then passed on a retry", red=True)
            for node in flaky:
                reporter.write_line(f"FLAKY {node}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(FlakeGuard(), "flake-guard")
