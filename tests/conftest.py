import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The only reason a test may skip: hardware that CI cannot have. Anything else a test group
# needs is a prerequisite (tests/prerequisites.py) whose absence fails the group, so that a
# broken install cannot turn the suite green while the core is untested.
HARDWARE_SKIP = "needs a CUDA device"


def _fail_unless_hardware_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not reason.removeprefix("Skipped: ").startswith(HARDWARE_SKIP):
        report.outcome = "failed"
        report.longrepr = f"skipped without a hardware reason (not allowed): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unless_hardware_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a whole module skipped at import (importorskip, allow_module_level)
    _fail_unless_hardware_skip(outcome.get_result())
