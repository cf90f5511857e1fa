"""Machine features for the hypervisor hot-restart protocol (docs/machine.md 8.3 and 6.9).

- The VMX-preemption timer bounds an inverse hypercall: a service guest that never returns is ended
  like any VM-exit condition during the call (VMfailValid(67), VM_EXIT_REASON 52), and root goes on.
- The restart-phase port: root marks protocol phases in the event stream; to a guest it is an
  ordinary port (an I/O exit, or an unclaimed port when the guest reaches the bus).

Every case runs with the C transition loop on and off, and both runs must give the same machine.
"""
from __future__ import annotations

import pytest

from emu.ports import RESTART_PHASE_PORT
from emu.machine import Machine
from emu.vmx import VMCALLR_ENDED_BY_VM_EXIT
from emu.vmx_defs import (
    ExitControls, ExitReason, PinBasedControls, PrimaryProcessorControls, make_io_qualification,
)
from tests.machine_programs import (
    CPUID_LOOP, EXIT_OK, EXIT_STOPPED_ON_EXIT, GUEST_CODE, GUEST_INVERSE_HANDLER, GUEST_INVERSE_STACK_TOP,
    RFLAGS_CF, RFLAGS_ZF, VMCS_REGION, arm_timer, debug_exit, default_controls, event_tuples, events_of, exit_log,
    exit_status, label_address, lines, result, results, run_guest, run_root, save, save_flags, timeout, vmread,
    vmwrite,
)

VMCALLR = ".byte 0x0f, 0x0a"
CALL_NUMBER = 9
CALL_ARGUMENT = 4
HANDLER_SCRATCH = 0xDEAD
CALL_TIMEOUT = 500                  # preemption-timer ticks the inverse hypercall may run
GUEST_SLICE = 1_000_000             # the timer value outside the call: never reached in these tests
GUEST_RESUMED_MARKER = 0x77
ALARM_SECONDS = 60
ROOT_TIMER_VECTOR = 0x40

# The guest exits at once with VMCALL (the root then calls into it), and again when it is back on
# its own path, then stops at CPUID (HLT does not exit: the halted service below needs HLT to halt).
GUEST_MAIN = lines("vmcall", f"mov rax, {GUEST_RESUMED_MARKER:#x}", "back_home: vmcall", "cpuid")
# A hung service: it overwrites RAX (which root must not see) and spins forever.
HUNG_HANDLER = lines(f"mov rax, {HANDLER_SCRATCH:#x}", "spin:", "jmp spin")
# A halted service: HLT without HLT exiting, interrupts held pending: only the timer can end it.
HALTED_HANDLER = lines(f"mov rax, {HANDLER_SCRATCH:#x}", "halted:", "hlt", "jmp halted")
# A service that answers at once: RAX + RDI.
QUICK_HANDLER = lines("add rax, rdi", "vmcall")

CALL_SLOTS = 11                     # what root records around its VMCALLR, from slot 20 on
(SLOT_RIP_BEFORE, SLOT_RSP_BEFORE, SLOT_RFLAGS_BEFORE, SLOT_FLAGS, SLOT_RAX, SLOT_ERROR, SLOT_EXIT_REASON,
 SLOT_RIP_AFTER, SLOT_RSP_AFTER, SLOT_RFLAGS_AFTER, SLOT_TIMER_AFTER) = range(20, 20 + CALL_SLOTS)

TIMER_CONTROLS = default_controls(primary=0, pin=PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER,
                                  exit=ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE)


def timed_inverse_call_on_first_exit(timeout_ticks: int) -> str:
    """on_exit code: at the first exit, arm the call's timeout and VMCALLR; record what root sees after
    it (flags, RAX, error, exit reason, guest RIP/RSP/RFLAGS, the saved timer), then give the guest its
    long slice back and resume it."""
    return lines(
        "cmp rcx, 1", "jne vm_exit_continue",
        vmread("rbx", "GUEST_RIP"), save(SLOT_RIP_BEFORE, "rbx"),
        vmread("rbx", "GUEST_RSP"), save(SLOT_RSP_BEFORE, "rbx"),
        vmread("rbx", "GUEST_RFLAGS"), save(SLOT_RFLAGS_BEFORE, "rbx"),
        vmwrite("VMX_PREEMPTION_TIMER_VALUE", timeout_ticks),
        f"mov rax, {CALL_NUMBER}", f"mov rdi, {CALL_ARGUMENT}",
        VMCALLR,
        save_flags(SLOT_FLAGS), save(SLOT_RAX),
        "mov rcx, -1", vmread("rcx", "VM_INSTRUCTION_ERROR"), save(SLOT_ERROR, "rcx"),
        vmread("rbx", "VM_EXIT_REASON"), save(SLOT_EXIT_REASON, "rbx"),
        vmread("rbx", "GUEST_RIP"), save(SLOT_RIP_AFTER, "rbx"),
        vmread("rbx", "GUEST_RSP"), save(SLOT_RSP_AFTER, "rbx"),
        vmread("rbx", "GUEST_RFLAGS"), save(SLOT_RFLAGS_AFTER, "rbx"),
        vmread("rbx", "VMX_PREEMPTION_TIMER_VALUE"), save(SLOT_TIMER_AFTER, "rbx"),
        vmwrite("VMX_PREEMPTION_TIMER_VALUE", GUEST_SLICE),
        "jmp vm_exit_resume")


def run_timed_call(fast_transitions: bool, handler: str, timeout_ticks: int = CALL_TIMEOUT,
                   controls: dict[str, int] | None = None) -> Machine:
    machine = Machine(record_events=True, fast_transitions=fast_transitions)
    fields = {"INVERSE_HYPERCALL_ENTRY": GUEST_INVERSE_HANDLER, "INVERSE_HYPERCALL_STACK": GUEST_INVERSE_STACK_TOP,
              "VMX_PREEMPTION_TIMER_VALUE": GUEST_SLICE}
    with timeout(ALARM_SECONDS):
        run, _ = run_guest(machine, GUEST_MAIN, extra_code={GUEST_INVERSE_HANDLER: handler},
                           controls=controls or TIMER_CONTROLS, fields=fields,
                           on_exit=timed_inverse_call_on_first_exit(timeout_ticks), stop_reasons=(ExitReason.CPUID,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    machine.run_result = run
    return machine


def both_ways(handler: str, **options) -> Machine:
    """The run with the C transition loop and without it; they must give the same machine."""
    fast, slow = run_timed_call(True, handler, **options), run_timed_call(False, handler, **options)
    assert event_tuples(fast) == event_tuples(slow)
    assert fast.run_result == slow.run_result
    assert exit_log(fast) == exit_log(slow)
    assert results(fast, CALL_SLOTS, SLOT_RIP_BEFORE) == results(slow, CALL_SLOTS, SLOT_RIP_BEFORE)
    assert fast.statistics()["exits_by_reason"] == slow.statistics()["exits_by_reason"]
    assert fast.statistics()["inverse_calls_by_number"] == slow.statistics()["inverse_calls_by_number"]
    return fast


def call_entry_and_return(machine: Machine):
    """The VMCALLR's vm-entry event (the one right after the vmcallr event) and its vmcallr-return."""
    (call,) = events_of(machine, "vmcallr")
    entry = machine.events.events[call.seq + 1]
    assert entry.kind == "vm-entry" and entry.data["launch"] is False
    (returned,) = events_of(machine, "vmcallr-return")
    return entry, returned


def assert_guest_path_resumed(machine: Machine) -> None:
    """After the call the guest goes on from its first VMCALL: root resumed it, nothing else exited."""
    log = exit_log(machine)
    assert [record.reason for record in log] == [ExitReason.VMCALL, ExitReason.VMCALL, ExitReason.CPUID]
    assert log[1].guest_rax == GUEST_RESUMED_MARKER
    assert log[1].guest_rip == label_address(GUEST_MAIN, "back_home", GUEST_CODE, root_program=False)


@pytest.mark.parametrize("handler", [HUNG_HANDLER, HALTED_HANDLER], ids=["spinning", "halted"])
def test_the_preemption_timer_ends_a_hung_inverse_call(handler):
    machine = both_ways(handler)
    assert result(machine, SLOT_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_ZF, "VMfailValid"
    assert result(machine, SLOT_ERROR) == VMCALLR_ENDED_BY_VM_EXIT
    assert result(machine, SLOT_EXIT_REASON) == ExitReason.PREEMPTION_TIMER
    assert result(machine, SLOT_RAX) == CALL_NUMBER, "root's GPRs stay as they were at the VMCALLR"
    for before, after in ((SLOT_RIP_BEFORE, SLOT_RIP_AFTER), (SLOT_RSP_BEFORE, SLOT_RSP_AFTER),
                          (SLOT_RFLAGS_BEFORE, SLOT_RFLAGS_AFTER)):
        assert result(machine, after) == result(machine, before)
    assert result(machine, SLOT_TIMER_AFTER) == 0, "the saved timer value after the timer fired"
    assert_guest_path_resumed(machine)
    entry, returned = call_entry_and_return(machine)
    assert returned.data == {"vmcs": entry.data["vmcs"], "ok": False, "result": None,
                             "exit_reason": int(ExitReason.PREEMPTION_TIMER)}
    # The call ran until the deadline (the spinning guest's blocks are one instruction long; the
    # halted guest idles to the exact tick).
    assert returned.time == entry.time + CALL_TIMEOUT
    assert all(event.data["reason"] != ExitReason.PREEMPTION_TIMER for event in events_of(machine, "vm-exit"))
    assert ExitReason.PREEMPTION_TIMER not in machine.statistics()["exits_by_reason"]
    assert machine.statistics()["inverse_calls_by_number"] == {CALL_NUMBER: 1}
    vmfails = [event.data["error"] for event in events_of(machine, "vmfail")]
    assert vmfails == [VMCALLR_ENDED_BY_VM_EXIT]


def test_a_timeout_of_zero_ends_the_call_before_the_guest_runs():
    machine = both_ways(HUNG_HANDLER, timeout_ticks=0)
    assert result(machine, SLOT_ERROR) == VMCALLR_ENDED_BY_VM_EXIT
    assert result(machine, SLOT_EXIT_REASON) == ExitReason.PREEMPTION_TIMER
    entry, returned = call_entry_and_return(machine)
    assert returned.time == entry.time
    assert machine.statistics()["instructions_by_context"][f"vmcs@{VMCS_REGION:#x}"] == 1, \
        "the guest retired only its own `mov rax` (exiting instructions do not retire), nothing of the handler"


def test_a_call_that_returns_before_the_timer_is_unaffected():
    machine = both_ways(QUICK_HANDLER)
    assert result(machine, SLOT_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == 0, "VMsucceed"
    assert result(machine, SLOT_RAX) == CALL_NUMBER + CALL_ARGUMENT
    assert result(machine, SLOT_RIP_AFTER) == result(machine, SLOT_RIP_BEFORE)
    assert result(machine, SLOT_RSP_AFTER) == result(machine, SLOT_RSP_BEFORE)
    assert result(machine, SLOT_RFLAGS_AFTER) == result(machine, SLOT_RFLAGS_BEFORE)
    assert_guest_path_resumed(machine)
    entry, returned = call_entry_and_return(machine)
    assert returned.data["ok"] is True and returned.data["result"] == CALL_NUMBER + CALL_ARGUMENT
    assert returned.data["exit_reason"] is None
    # Saved like at a VM exit: the ticks of the timeout the call did not use.
    assert result(machine, SLOT_TIMER_AFTER) == CALL_TIMEOUT - (returned.time - entry.time)
    assert 0 < returned.time - entry.time < CALL_TIMEOUT
    assert not events_of(machine, "vmfail")


def test_without_save_the_timer_value_stays_as_written():
    controls = default_controls(primary=0, pin=PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER)
    for handler in (HUNG_HANDLER, QUICK_HANDLER):
        machine = both_ways(handler, controls=controls)
        assert result(machine, SLOT_TIMER_AFTER) == CALL_TIMEOUT


# --- the restart-phase port ---------------------------------------------------------------------------
PHASES = (1, 2, 0xFFFF_FFFE, 7)
SLOT_INITIAL, SLOT_READ_BACK = 0, 1
SLOT_TSC = 10                           # one slot per phase: RDTSC right after its OUT


def publish_phase(value: int | str) -> str:
    source = f"mov eax, {value:#x}" if isinstance(value, int) else f"mov eax, {value}"
    return lines(f"mov dx, {RESTART_PHASE_PORT:#x}", source, "out dx, eax")


def read_tsc(slot: int) -> str:
    return lines("rdtsc", "shl rdx, 32", "or rax, rdx", save(slot))


@pytest.mark.parametrize("fast_transitions", [True, False])
def test_root_writes_publish_restart_phases(fast_transitions):
    machine = Machine(record_events=True, fast_transitions=fast_transitions)
    body = lines(f"mov dx, {RESTART_PHASE_PORT:#x}", "in eax, dx", save(SLOT_INITIAL),
                 *(lines(publish_phase(phase), read_tsc(SLOT_TSC + index)) for index, phase in enumerate(PHASES)),
                 f"mov dx, {RESTART_PHASE_PORT:#x}", "in eax, dx", save(SLOT_READ_BACK),
                 debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, SLOT_INITIAL) == 0, "the port reads 0 at reset"
    assert result(machine, SLOT_READ_BACK) == PHASES[-1]
    marks = events_of(machine, "restart-phase")
    assert [mark.data for mark in marks] == [{"phase": phase} for phase in PHASES]
    assert all(mark.lp == 0 for mark in marks)
    # The OUT is the last instruction of its block (the RDTSC after it is trapped), so the event's
    # time, counted in whole blocks, is exactly the count RDTSC reads next.
    assert [mark.time for mark in marks] == results(machine, len(PHASES), SLOT_TSC)
    # Each mark follows the io-out of its OUT, at the same time; nothing else is counted.
    for mark in marks:
        before = machine.events.events[mark.seq - 1]
        assert before.kind == "io-out" and before.data["port"] == RESTART_PHASE_PORT
        assert before.time == mark.time
    assert machine.statistics()["exits_by_reason"] == {}


def test_restart_phases_from_an_exit_handler_the_same_with_and_without_the_loop():
    """Root marks a phase at every VM exit, most of them taken by the C transition loop (CPUID)."""
    streams = []
    for fast in (True, False):
        machine = Machine(record_events=True, fast_transitions=fast)
        run, _ = run_guest(machine, CPUID_LOOP, stop_reasons=(ExitReason.HLT,), on_exit=publish_phase("ecx"))
        assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
        exits = len(exit_log(machine))
        assert [mark.data["phase"] for mark in events_of(machine, "restart-phase")] == list(range(1, exits + 1))
        assert machine.io.restart_phase == exits
        streams.append((event_tuples(machine), run))
    assert streams[0] == streams[1]


def test_a_guest_out_to_the_phase_port_is_an_ordinary_io_exit():
    guest = lines(f"mov dx, {RESTART_PHASE_PORT:#x}", "mov eax, 5", "out dx, eax", "hlt")
    controls = default_controls(primary=PrimaryProcessorControls.HLT_EXITING
                                | PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING)
    runs = []
    for fast in (True, False):
        machine = Machine(record_events=True, fast_transitions=fast)
        run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,), controls=controls)
        assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
        log = exit_log(machine)
        assert [record.reason for record in log] == [ExitReason.IO_INSTRUCTION, ExitReason.HLT]
        assert log[0].qualification == make_io_qualification(RESTART_PHASE_PORT, 4, is_in=False)
        assert events_of(machine, "restart-phase") == []
        assert [event for event in events_of(machine, "io-out") if event.data["port"] == RESTART_PHASE_PORT] == []
        assert machine.io.restart_phase == 0
        runs.append(event_tuples(machine))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("fast_transitions", [True, False])
def test_a_guest_that_reaches_the_bus_finds_the_phase_port_unclaimed(fast_transitions):
    """Without an I/O exit the guest's OUT is ignored and its IN reads all ones, not root's phase."""
    guest = lines(f"mov dx, {RESTART_PHASE_PORT:#x}", "mov eax, 5", "out dx, eax", "in eax, dx", "hlt")
    machine = Machine(record_events=True, fast_transitions=fast_transitions)
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,), before_launch=publish_phase(3))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.guest_rax == 0xFFFF_FFFF
    assert [mark.data for mark in events_of(machine, "restart-phase")] == [{"phase": 3}]
    assert machine.io.restart_phase == 3
    assert [event.data["value"] for event in events_of(machine, "io-out")
            if event.data["port"] == RESTART_PHASE_PORT] == [3, 5]


def test_a_halted_call_without_the_timer_leaves_the_machine_idle():
    """Without the preemption timer nothing ends a halted inverse call: a vector that becomes pending
    (the root's timer here) is held, so it cannot wake the guest, and the machine stops `idle`
    instead of idling for ever."""
    controls = default_controls(primary=0, pin=PinBasedControls.EXTERNAL_INTERRUPT_EXITING)
    on_exit = lines("cmp rcx, 1", "jne vm_exit_continue", arm_timer(ROOT_TIMER_VECTOR, 100), VMCALLR,
                    debug_exit(EXIT_OK))
    for fast in (True, False):
        machine = Machine(record_events=True, fast_transitions=fast)
        with timeout(ALARM_SECONDS):
            run, _ = run_guest(machine, GUEST_MAIN, extra_code={GUEST_INVERSE_HANDLER: HALTED_HANDLER},
                               controls=controls, on_exit=on_exit,
                               fields={"INVERSE_HYPERCALL_ENTRY": GUEST_INVERSE_HANDLER})
        assert run.stop.reason == "idle", run.stop.report
        assert machine.lps[0].pending_vectors == [ROOT_TIMER_VECTOR]
        assert events_of(machine, "vmcallr-return") == []
