"""Pytest setup for the machine tests: repository root on sys.path, hypothesis limits, a timing report."""
from __future__ import annotations

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

_timings: list[tuple[str, str]] = []


@pytest.fixture
def report_timing(request):
    """`report_timing(text)` adds a line to the "machine timings" section of the terminal summary."""
    def report(text: str) -> None:
        _timings.append((request.node.nodeid, text))
    return report


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.section("machine timings")
        for nodeid, text in _timings:
            terminalreporter.write_line(f"{nodeid}: {text}")


@pytest.fixture
def machine():
    """A one-LP machine that records its events."""
    from emu.machine import Machine
    return Machine(record_events=True)
