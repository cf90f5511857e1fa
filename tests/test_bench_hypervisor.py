"""`hhr bench --hypervisor`: every figure is there and means what it says (values are reported, not judged)."""
from __future__ import annotations

import pytest

from bench import hypervisor_speed
from tools import cli


def test_boot_figure_is_the_first_vm_entry():
    figures = hypervisor_speed.boot_to_first_guest("hv1")
    assert 0 < figures["boot_virtual_time"] < 1_000_000
    assert figures["boot_host_ms"] > 0


def test_mixed_workload_runs_every_guest_to_a_clean_exit():
    figures = hypervisor_speed.mixed_workload("hv1")
    assert figures["mixed_guests_ok"] == figures["mixed_guests"] == len(hypervisor_speed.MIXED_WORKLOAD)
    assert 0 < figures["mixed_guest_instructions"] < figures["mixed_instructions"]
    assert figures["mixed_exits"] > 0


def test_bench_modes_parse():
    """`hhr bench` alone is the restart scenarios (tests/test_bench_restart.py runs them); the flags
    choose the other benches."""
    parser = cli.build_parser()
    default = parser.parse_args(["bench"])
    assert (default.machine, default.hypervisor, default.quick) == (False, False, False)
    chosen = parser.parse_args(["bench", "--quick", "--output", "somewhere", "--hypervisor", "--hv", "hv2"])
    assert (chosen.quick, chosen.output, chosen.hypervisor, chosen.hv) == (True, "somewhere", True, "hv2")


def test_inverse_call_round_trip_runs_every_call():
    from bench import machine_speed

    assert machine_speed.inverse_call_round_trip(50) > 0      # raises if the loop did not make 50 calls


def test_a_compiled_guest_runs_the_same_work_under_hv1_and_on_bare_unicorn():
    from bench import compiled_guests
    from guests import c_examples
    if c_examples.compiler() is None:
        pytest.skip("gcc is not installed: the C guests cannot be built")
    timing = compiled_guests.measure("memwalk")      # raises when the two consoles differ
    assert "walk of 1024 rounds" in timing.console and timing.machine_seconds > 0 and timing.bare_seconds > 0


def test_every_exit_kind_has_a_round_trip_in_the_c_loop_and_in_python():
    from bench import exit_kinds, machine_speed

    round_trips = exit_kinds.measure(exits=20)        # raises when a kind's loop did not make its exits
    round_trips[machine_speed.INVERSE_CALL_ROW] = {
        "c_loop_us": machine_speed.inverse_call_round_trip(20),
        "python_us": machine_speed.inverse_call_round_trip(20, fast_transitions=False)}
    assert {"CPUID", "VMCALL", "HLT (HLT exiting)", "EPT violation", "VMX-preemption timer"} <= set(round_trips)
    assert all(trip["c_loop_us"] > 0 and trip["python_us"] > 0 for trip in round_trips.values())
    table = machine_speed.round_trip_table(round_trips).splitlines()
    assert len(table) == 1 + len(round_trips)
    assert all(any(line.startswith(name) for line in table) for name in round_trips)
