"""hhr's observable behaviour (tools/fingerprint.py) is what tests/data/fingerprint.json says it is.

A refactor must leave every digest as it was. A change meant to alter behaviour (virtual ticks,
trace bytes, guest output, fuzz results) rewrites the file with `python -m tools.fingerprint --write`
and its commit says which scenarios changed and why.
"""
from __future__ import annotations

import json

import pytest

from tools import fingerprint


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(fingerprint.COMMITTED.read_text())


def test_the_committed_fingerprint_names_every_scenario(committed):
    assert sorted(committed) == sorted(fingerprint.SCENARIOS)


@pytest.mark.parametrize("name", list(fingerprint.SCENARIOS))
def test_behaviour_matches_the_committed_fingerprint(name, committed):
    assert fingerprint.run_scenario(name, fingerprint.SCENARIOS[name]) == committed[name], (
        f"{name} behaves differently from tests/data/fingerprint.json: if that is meant, "
        f"rewrite it with `python -m tools.fingerprint --write` and say why in the commit")


def test_host_time_figures_are_left_out_and_virtual_ones_kept():
    report = {"host_ms": 1.5, "blackout_host_ms": 2.0, "restart_host_s": 0.1, "host_pages": {"free": 7},
              "virtual_ticks": 42, "machine": {"date": "today"}, "by": "x 4 times (host 7 times)"}
    assert fingerprint.without_host_time(report) == {"host_pages": {"free": 7}, "virtual_ticks": 42,
                                                     "by": "x 4 times (host N times)"}
