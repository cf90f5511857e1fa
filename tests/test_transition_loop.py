"""The C transition loop changes nothing but speed: the same programs with it on and off give the same
events, console, exit information, instruction counts and virtual time."""
from __future__ import annotations

import pytest

from emu.machine import Machine
from emu.vmx_defs import ExitReason, PrimaryProcessorControls
from tests.machine_programs import (
    CPUID_LOOP, EXIT_STOPPED_ON_EXIT, QUANTUM, build_guest, cpuid_guest_with_interrupts, default_controls,
    event_tuples, exit_log, exit_logger, exit_status, lines, putc, run_guest, run_root, timeout, vmx_program,
)
from hypervisors import bare_monitor

ALARM_SECONDS = 30


def run(fast_transitions: bool) -> Machine:
    machine = Machine(lps=2, quantum=QUANTUM, record_events=True, fast_transitions=fast_transitions)
    machine.run_result = run_root(machine, cpuid_guest_with_interrupts(machine))
    return machine


def test_loop_on_and_off_give_the_same_machine():
    fast, slow = run(True), run(False)
    assert fast.run_result.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), fast.run_result.stop.report
    assert event_tuples(fast) == event_tuples(slow)
    assert fast.io.console.text() == slow.io.console.text()
    assert fast.run_result == slow.run_result
    assert exit_log(fast) == exit_log(slow)
    assert fast.statistics()["exits_by_reason"] == slow.statistics()["exits_by_reason"]
    reasons = {record.reason for record in exit_log(fast)}
    assert {ExitReason.CPUID, ExitReason.VMCALL, ExitReason.HLT, ExitReason.EXTERNAL_INTERRUPT} <= reasons
    assert fast.statistics()["transitions_in_c"] > 0
    assert slow.statistics()["transitions_in_c"] == 0


@pytest.mark.parametrize("guest", [CPUID_LOOP, "xor eax, eax\ncpuid\nmov al, 0x41\nout 0xe9, al\nxor eax, eax\nhlt"])
def test_bare_monitor_guest_the_same_with_and_without_the_loop(guest):
    fast = bare_monitor.run_guest(guest, record_events=True)
    slow = bare_monitor.run_guest(guest, record_events=True, fast_transitions=False)
    assert event_tuples(fast.machine) == event_tuples(slow.machine)
    assert fast.console == slow.console
    assert fast.result == slow.result
    assert fast.machine.ram.read(bare_monitor.VMCS_REGION, bare_monitor.PAGE_SIZE) == \
        slow.machine.ram.read(bare_monitor.VMCS_REGION, bare_monitor.PAGE_SIZE)


def test_a_guest_the_loop_does_not_take_runs_on_the_python_path():
    """With interrupt-window exiting the loop declines the guest before running it: the machine must
    go on in Python rather than ask the loop again and again."""
    with timeout(ALARM_SECONDS):
        machine = Machine(record_events=True)
        guest = build_guest(machine, lines("cli", "spin:", "pause", "jmp spin"),
                            controls=default_controls(primary=PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING
                                                      | PrimaryProcessorControls.HLT_EXITING))
        result = run_root(machine, vmx_program(guest, exit_logger()), max_instructions=100_000)
    assert result.stop.reason == "instruction-limit"
    assert result.instructions >= 100_000


IO_FORMS = lines("mov al, 0x41", "out 0xe9, al", "mov dx, 0x3f8", "out dx, al", "in al, dx", "mov ax, 0x4242",
                 "out dx, ax", "in eax, 0x70", "mov eax, 0x43", "out dx, eax", "rep outsb", "xor eax, eax", "hlt")
IO_FORMS_INSTRUCTIONS = 7


def test_io_exits_are_the_same_with_and_without_the_loop():
    fast = bare_monitor.run_guest(IO_FORMS, record_events=True)
    slow = bare_monitor.run_guest(IO_FORMS, record_events=True, fast_transitions=False)
    assert event_tuples(fast.machine) == event_tuples(slow.machine)
    assert fast.console == slow.console and fast.result == slow.result
    io_exits = fast.result.exits_by_reason[ExitReason.IO_INSTRUCTION]
    assert io_exits == IO_FORMS_INSTRUCTIONS
    assert fast.machine.statistics()["transitions_in_c"] >= 2 * (io_exits - 1)   # all but the string OUT


IO_BITMAPS = 0x210000
EXITING_PORT = 0x80
BITS_PER_BYTE = 8


def test_io_bitmaps_the_same_with_and_without_the_loop():
    results = []
    for fast in (True, False):
        machine = Machine(record_events=True, fast_transitions=fast)
        machine.ram.write(IO_BITMAPS, bytes(2 * bare_monitor.PAGE_SIZE))
        machine.ram.write(IO_BITMAPS + EXITING_PORT // BITS_PER_BYTE, bytes([1 << EXITING_PORT % BITS_PER_BYTE]))
        guest = lines(putc("A"), f"mov dx, {EXITING_PORT:#x}", "out dx, al", "out 0x80, al", putc("B"), "hlt")
        controls = default_controls(primary=PrimaryProcessorControls.HLT_EXITING | PrimaryProcessorControls.USE_IO_BITMAPS)
        result, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,), controls=controls,
                              fields={"IO_BITMAP_A": IO_BITMAPS, "IO_BITMAP_B": IO_BITMAPS + bare_monitor.PAGE_SIZE})
        results.append((event_tuples(machine), machine.io.console.text(), result, exit_log(machine)))
    assert results[0] == results[1]
    assert [record.reason for record in results[0][3]] == [ExitReason.IO_INSTRUCTION] * 2 + [ExitReason.HLT]
    assert results[0][1] == "AB"


def test_hv1_runs_the_same_with_and_without_the_loop():
    """hv1 preempts its VPs with the VMX-preemption timer, serves I/O, CPUID and hypercalls, and injects
    timer ticks: the loop carries out those transitions, and the machine must not change."""
    from guests import catalog
    from hypervisors.boot import boot

    guests = [catalog.parse(spec) for spec in ("hello,vps=3", "hypercalls", "sieve", "hostile", "timer")]
    runs = []
    for fast in (True, False):
        booted = boot(guests, lps=2, record_events=True, fast_transitions=fast)
        result = booted.machine.run(max_instructions=20_000_000)
        runs.append((event_tuples(booted.machine), dict(booted.machine.io.console.channels),
                     result, booted.partitions(), booted.machine.statistics()["exits_by_reason"]))
        if fast:
            assert booted.machine.statistics()["transitions_in_c"] > 0
    assert runs[0] == runs[1]



def test_root_console_output_waits_in_the_loop_and_comes_out_the_same():
    """hv1's console OUTs in the loop's runs are queued in C (emu/fastpath.c hhr_port_out_hook) and
    published in order by Python (IoBus.queued_console_write): most of them with the loop on, none
    with it off, and the machine the same."""
    from guests import catalog
    from hypervisors.boot import boot

    guests = [catalog.parse(spec) for spec in ("hello,vps=3", "sieve")]
    runs = []
    for fast in (True, False):
        booted = boot(guests, lps=2, record_events=True, fast_transitions=fast)
        io = booted.machine.io
        queued = []
        publish_queued = io.queued_console_write
        io.queued_console_write = lambda *write: (queued.append(write), publish_queued(*write))
        result = booted.machine.run(max_instructions=5_000_000)
        console_bytes = sum(len(data) for data in io.console.channels.values())
        runs.append((event_tuples(booted.machine), dict(io.console.channels), result))
        if fast:
            assert console_bytes > 0 and len(queued) > console_bytes / 2
        else:
            assert queued == []
    assert runs[0] == runs[1]


def run_watching_publication(publish_each: bool, on_transition=None) -> tuple[Machine, list]:
    """`run`'s machine with every LP's loop told, as a trace tells it, to hand each event to Python
    between its runs (hhr_lp.publish_each), or not; also the VM exits and entries published once
    their LP's clock had moved past them."""
    machine = Machine(lps=2, quantum=QUANTUM, record_events=True)
    for lp in machine.lps:
        lp.run_state.publish_each = int(publish_each)
    late = []

    def on_event(event):
        if machine.lps[event.lp].now != event.time:
            late.append(event)
        if on_transition is not None:
            on_transition(event)
    machine.events.subscribe(on_event, {"vm-exit", "vm-entry"})
    machine.run_result = run_root(machine, cpuid_guest_with_interrupts(machine))
    return machine, late


def test_the_loop_publishes_each_transition_where_it_happens_when_asked():
    """With publish_each a VM exit or entry the loop makes is published before the LP runs on (its
    clock still at the event's time), and the machine is the one the loop off gives; without it the
    loop publishes them when it returns, later."""
    slow = run(False)
    each, late_each = run_watching_publication(True)
    batched, late_batched = run_watching_publication(False)
    for machine in (each, batched):
        assert machine.statistics()["transitions_in_c"] > 0
        assert event_tuples(machine) == event_tuples(slow)
        assert machine.run_result == slow.run_result
    assert late_each == []
    assert late_batched


class SubscriberFailure(Exception):
    pass


CPUID_EXITS_BEFORE_FAILING = 10   # by then the loop carries the guest's CPUID exits out in C


def test_a_subscriber_failing_while_the_loop_publishes_stops_the_run_with_its_exception():
    """The loop calls Python to publish: an exception there cannot cross C, so it ends the loop and
    the run raises it."""
    cpuid_exits = []

    def fail_once_the_loop_takes_cpuid_exits(event):
        if event.kind == "vm-exit" and event.data["reason"] == ExitReason.CPUID:
            cpuid_exits.append(event)
            if len(cpuid_exits) == CPUID_EXITS_BEFORE_FAILING:
                raise SubscriberFailure(event.seq)
    with pytest.raises(SubscriberFailure):
        run_watching_publication(True, fail_once_the_loop_takes_cpuid_exits)
    assert len(cpuid_exits) == CPUID_EXITS_BEFORE_FAILING
