"""Pytest setup: repository root on sys.path, hypothesis limits, a timing report, peak memory."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; property tests skip without it
    pass
else:
    MAX_PROPERTY_EXAMPLES = 30
    settings.register_profile("machine", max_examples=MAX_PROPERTY_EXAMPLES, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    settings.load_profile("machine")

KIB_PER_MIB = 1024
_timings: list[tuple[str, str]] = []


@pytest.fixture
def report_timing(request):
    """`report_timing(text)` adds a line to the "machine timings" section of the terminal summary."""
    def report(text: str) -> None:
        _timings.append((request.node.nodeid, text))
    return report


def pytest_terminal_summary(terminalreporter):
    # ru_maxrss is in KiB on Linux; children: the largest single child process (workers, hhr commands)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / KIB_PER_MIB
    terminalreporter.write_line(f"peak resident memory: this process {own:,.0f} MiB, "
                                f"its largest child process {children:,.0f} MiB")
    if _timings:
        terminalreporter.section("machine timings")
        for nodeid, text in _timings:
            terminalreporter.write_line(f"{nodeid}: {text}")


@pytest.fixture
def machine():
    """A one-LP machine that records its events."""
    from emu.machine import Machine
    return Machine(record_events=True)
