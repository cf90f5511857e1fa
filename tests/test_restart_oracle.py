"""The restart oracle sweep: the `cpustate` guest (several VPs on every LP) beside a gcc-built C
guest is hot-restarted in every direction, in every mode, on 1, 2 and 8 LPs, early, midway and late
in cpustate's life; cpustate_long beside a C guest is restarted 50 times in a row, alternating
versions. Every guest's console must be byte-identical to a run with no restart, and every guest
must exit 0.

CI runs a covering design (every pair of parameter values in at least one case, `covering_design`);
set HHR_ORACLE_FULL=1 to run the full product of the parameters (432 cases) by hand."""
from __future__ import annotations

import itertools
import os
import re
from functools import lru_cache

import pytest

from guests import c_examples
from tests.worker_process import in_own_process

DIRECTIONS = [("hv1", "hv2"), ("hv2", "hv1"), ("hv1", "hv1"), ("hv2", "hv2")]
MODES = ["precopy", "stop-and-copy", "suspend", "postcopy"]
LP_COUNTS = [1, 2, 8]
POINTS = {"early": 0.1, "middle": 0.5, "late": 0.9}    # where in cpustate's life the blackout falls (about)
RESTART_LEAD = 2_500_000        # instructions per LP from the doorbell to the blackout: the new hypervisor boots
C_GUESTS = ["sha256", "numeric", "memwalk"]     # guests/examples/NAME.c: gcc keeps their values in XMM registers
PARAMETERS = [DIRECTIONS, MODES, LP_COUNTS, list(POINTS), C_GUESTS]
FULL_PRODUCT = os.environ.get("HHR_ORACLE_FULL") == "1"

CPUSTATE_VPS_PER_LP = 2         # VPs are dealt to LPs round robin: every LP holds two of cpustate's
CPUSTATE = "cpustate"
LIFE_STEP = 250_000             # instructions between looks at the partition table (the reference run)
RUN_LIMIT = 2_000_000_000
ROW_RESTARTS = 50
ROW_LPS = 1
ROW_CPUSTATE = "cpustate_long"  # a restart takes about 2.5 million instructions: its life holds 50
ROW_CPUSTATE_VPS = 2
ROW_C_GUESTS = ["numeric"]      # beside cpustate_long in the row: doubles in XMM registers
ROW_MODES = ["precopy", "postcopy", "stop-and-copy"]     # the row cycles through the hot modes


def covering_design(columns: list[list]) -> list[tuple]:
    """Rows of the product of `columns` such that every pair of values of two columns is in some row
    (a covering array of strength 2), chosen greedily: each next row is the first of the product
    that covers the most pairs not yet covered."""
    uncovered = {(first, a, second, b) for first, second in itertools.combinations(range(len(columns)), 2)
                 for a in range(len(columns[first])) for b in range(len(columns[second]))}
    candidates = list(itertools.product(*(range(len(column)) for column in columns)))
    rows = []
    while uncovered:
        def gain(row: tuple) -> int:
            return sum((first, row[first], second, row[second]) in uncovered
                       for first, second in itertools.combinations(range(len(columns)), 2))
        best = max(candidates, key=gain)
        uncovered -= {(first, best[first], second, best[second])
                      for first, second in itertools.combinations(range(len(columns)), 2)}
        rows.append(tuple(column[index] for column, index in zip(columns, best)))
    return rows


def cases() -> list[tuple]:
    if FULL_PRODUCT:
        return list(itertools.product(*PARAMETERS))
    return covering_design(PARAMETERS)


def case_id(case: tuple) -> str:
    (source, target), mode, lps, point, c_guest = case
    return f"{source}-{target}-{mode}-{lps}lp-{point}-{c_guest}"


@pytest.fixture(scope="module")
def c_guests() -> dict[str, str]:
    """The C examples built with the system's gcc by the documented line: name to ELF file."""
    if c_examples.compiler() is None:
        pytest.skip("gcc is not installed: the C guests cannot be built")
    return {name: str(c_examples.build(name)) for name in C_GUESTS}


def guest_specs(cpustate: str, vps: int, c_guests: list[str]) -> tuple[str, ...]:
    return (f"{cpustate},vps={vps}", *c_guests)


def outcomes(document_guests: list[dict]) -> dict[str, tuple]:
    """Each guest's console, state and exit code, by name."""
    return {guest["name"]: (guest["console"], guest["state"], guest["exit_code"], guest["stop_reason"])
            for guest in document_guests}


@lru_cache(maxsize=None)
def reference(specs: tuple[str, ...], lps: int) -> tuple[dict, int]:
    """The run without a restart (under hv1: what a guest sees is the same under either hypervisor),
    in a process of its own like the restarts: each guest's outcome, and the instructions retired
    (all LPs) when cpustate ended, found by looking every LIFE_STEP instructions."""
    document = in_own_process(kind="reference", specs=list(specs), lps=lps, step=LIFE_STEP, run_limit=RUN_LIMIT)
    return outcomes(document["guests"]), document["first_guest_end"]


def assert_reference_is_clean(expected: dict, lps: int, cpustate_vps: int) -> None:
    """Without a restart every guest exits 0 and cpustate saw nothing change: else the sweep would
    compare against a broken run."""
    for name, (console, state, exit_code, stop_reason) in expected.items():
        assert (state, exit_code) == ("exited", 0), f"{name} without a restart ({lps} LPs): {state} " \
                                                    f"({stop_reason}), exit code {exit_code}, console:\n{console}"
    console = next(iter(expected.values()))[0]        # cpustate is the first guest
    lines = console.splitlines()
    assert [SUMMARY.fullmatch(line) is not None for line in lines] == [True] * cpustate_vps, console
    assert [int(SUMMARY.fullmatch(line).group(1)) for line in lines] == list(range(cpustate_vps))


SUMMARY = re.compile(r"cpustate vp (\d+): all \d+ values intact after \d+ checks")


def assert_same_as_without_restart(document: dict, expected: dict) -> None:
    broken = [entry for entry in document["restarts"] if entry["outcome"] not in ("committed", "resumed")]
    assert not broken, f"restarts not carried out: {broken}"
    assert document["machine_stop"]["reason"] == "debug-exit", document["machine_stop"]
    found = outcomes(document["guests"])
    for name, outcome in expected.items():
        assert found[name][0] == outcome[0], f"{name}'s console differs from the run without a restart"
        assert found[name][1:] == outcome[1:], f"{name} ended otherwise: {found[name][1:]}"


def test_the_covering_design_covers_every_pair_of_parameter_values():
    columns = [DIRECTIONS, MODES, LP_COUNTS, list(POINTS), ["a", "b", "c"]]
    design = covering_design(columns)
    for first, second in itertools.combinations(range(len(columns)), 2):
        wanted = set(itertools.product(columns[first], columns[second]))
        assert {(case[first], case[second]) for case in design} == wanted, (first, second)
    assert len(design) <= len(DIRECTIONS) * len(MODES) + len(MODES), "far more cases than pairs need"
    assert covering_design(PARAMETERS) == covering_design(PARAMETERS), "the same cases every run"


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_a_restart_changes_nothing_a_guest_sees(case, c_guests):
    (source, target), mode, lps, point, c_guest = case
    specs = guest_specs(CPUSTATE, CPUSTATE_VPS_PER_LP * lps, [c_guests[c_guest]])
    expected, cpustate_end = reference(specs, lps)
    assert_reference_is_clean(expected, lps, CPUSTATE_VPS_PER_LP * lps)
    window = cpustate_end - lps * RESTART_LEAD
    assert window > 0, f"cpustate ends {cpustate_end} instructions in: too soon for a restart on {lps} LPs"
    document = in_own_process(kind="restart", source=source, target=target, specs=list(specs), lps=lps,
                              request_at=int(window * POINTS[point]), mode=mode, run_limit=RUN_LIMIT)
    assert document["hypervisor"] == target
    assert_same_as_without_restart(document, expected)
    at_blackout = [vp["state"] for vp in document["restart"]["blackout"]["per_vp"] if vp["partition"] == 0]
    assert "running" in at_blackout, f"cpustate's VPs at the blackout: {at_blackout}: the case did not test it"


def test_fifty_restarts_in_a_row_alternating_versions_and_modes_change_nothing_a_guest_sees(c_guests):
    specs = guest_specs(ROW_CPUSTATE, ROW_CPUSTATE_VPS, [c_guests[name] for name in ROW_C_GUESTS])
    expected, cpustate_end = reference(specs, ROW_LPS)
    assert_reference_is_clean(expected, ROW_LPS, ROW_CPUSTATE_VPS)
    document = in_own_process(kind="row", specs=list(specs), lps=ROW_LPS, restarts=ROW_RESTARTS, modes=ROW_MODES,
                              request_at=int(cpustate_end * POINTS["early"]), run_limit=RUN_LIMIT)
    assert len(document["restarts"]) == ROW_RESTARTS, f"a restart failed: {document['restarts'][-1]}"
    assert {restart["mode"] for restart in document["restarts"]} == {mode.replace("-", "_") for mode in ROW_MODES}
    assert document["first_guest_ran_to_the_last"], "cpustate ended before the last restart: the row did not test it"
    assert_same_as_without_restart(document, expected)
