"""Shared fixtures. Tests that need the live kernel take the ``live`` fixture: it skips with the reason where /dev/kvm
is missing or not permitted, and the run ends with a count of the real-kernel tests that ran."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator

import pytest

from kvmscope.errors import KvmUnavailableError
from kvmscope.linux import LinuxSystem, open_system


def _unavailable() -> str | None:
    try:
        open_system().close()
    except KvmUnavailableError as e:
        return str(e)
    return None


KVM_UNAVAILABLE = _unavailable()
# `kvmscope check` caches this host's captured profile; the tests keep theirs apart from the user's (~/.cache).
os.environ.setdefault("KVMSCOPE_CACHE", tempfile.mkdtemp(prefix="kvmscope-test-cache-"))
_LIVE = Counter[str]()


@pytest.fixture
def live(request: pytest.FixtureRequest) -> Iterator[LinuxSystem]:
    """The live /dev/kvm system."""
    request.node.user_properties.append(("live_kernel", True))
    if KVM_UNAVAILABLE:
        pytest.skip(f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    system = open_system()
    yield system
    system.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if ("live_kernel", True) not in report.user_properties:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _LIVE[report.outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ran = _LIVE["passed"] + _LIVE["failed"]
    line = f"real-kernel tests: {ran} ran ({_LIVE['passed']} passed, {_LIVE['failed']} failed), {_LIVE['skipped']} skipped"
    if KVM_UNAVAILABLE:
        line += f" because {KVM_UNAVAILABLE}"
    terminalreporter.write_sep("=", line, bold=True, red=bool(_LIVE["skipped"] or _LIVE["failed"]))
