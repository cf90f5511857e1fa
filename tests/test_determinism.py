"""Determinism: the same program on two LPs with timer interrupts, IPIs and a guest gives the same events twice."""
from __future__ import annotations

from emu.machine import Machine
from emu.vmx_defs import ExitReason
from tests.machine_programs import (
    EXIT_LOG_FULL, EXIT_OK, IPI_VECTOR, LP0_TICK, LP1_TICK, QUANTUM, TICKS_BEFORE_STOP, event_tuples, exit_log,
    exit_status, guest_and_timer_program, root_timers_program, run_root,
)


def run_twice(build) -> list[Machine]:
    machines = []
    for _ in range(2):
        machine = Machine(lps=2, quantum=QUANTUM, record_events=True)
        machine.run_result = build(machine)
        machines.append(machine)
    return machines


def assert_same(first: Machine, second: Machine) -> None:
    assert event_tuples(first) == event_tuples(second)
    assert first.io.console.text() == second.io.console.text()
    assert first.run_result == second.run_result


def test_two_lps_with_timers_and_ipis_run_the_same_twice():
    first, second = run_twice(lambda machine: run_root(machine, root_timers_program()))
    assert first.run_result.stop.exit_status == exit_status(EXIT_OK), first.run_result.stop.report
    assert_same(first, second)
    console = first.io.console.text()
    assert console.count("a") == TICKS_BEFORE_STOP and "b" in console and "i" in console
    interrupted = {(e.lp, e.data["vector"]) for e in first.events.events if e.kind == "interrupt"}
    assert interrupted == {(0, LP0_TICK), (0, IPI_VECTOR), (1, LP1_TICK)}


def test_guest_with_interrupt_exits_runs_the_same_twice():
    def build(machine: Machine):
        return run_root(machine, guest_and_timer_program(machine))

    first, second = run_twice(build)
    assert first.run_result.stop.exit_status == exit_status(EXIT_LOG_FULL), first.run_result.stop.report
    assert_same(first, second)
    reasons = [record.reason for record in exit_log(first)]
    assert exit_log(first) == exit_log(second)
    assert ExitReason.EXTERNAL_INTERRUPT in reasons and ExitReason.VMCALL in reasons
