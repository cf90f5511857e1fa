"""VMCALLR, the inverse hypercall (opcode 0F 0A): root calls into a guest handler, the guest returns with VMCALL.

The round trip and every failure are observed by root programs: RAX and RFLAGS after VMCALLR,
VM_INSTRUCTION_ERROR and VM_EXIT_REASON read back with VMREAD, and the machine's events.
"""
from __future__ import annotations

import pytest

from emu.machine import Machine
from emu.vmx import (
    VMCALLR_ENDED_BY_VM_EXIT, VMCALLR_NO_ENTRY_POINT, VMCALLR_NOT_LAUNCHED, VmxUnit,
)
from emu.vmx_defs import ExitReason
from tests.machine_programs import (
    EXIT_OK, EXIT_STOPPED_ON_EXIT, GUEST_CODE, GUEST_INVERSE_HANDLER, GUEST_INVERSE_STACK_TOP,
    GUEST_RAM_BASE, GUEST_SHARED, PAGE_SIZE, RFLAGS_CF, RFLAGS_ZF, VMCS_REGION, VMXON_REGION,
    debug_exit, enable_vmx, event_tuples, events_of, exit_log, exit_status, expect_invalid_opcode, label_address, lines,
    result, run_guest, run_root, save, save_flags, vmread, vmwrite, vmx_on_with_current_vmcs, write_revision,
)

VMCALLR = ".byte 0x0f, 0x0a"
VMCALLR_LENGTH = 2
CALL_NUMBER = 7
CALL_ARGUMENT = 5
SHARED_VALUE = 1000
GUEST_RESUMED_MARKER = 0x77

# The guest: exits once (the root then calls into it), and reports when it is back on its own path.
GUEST_MAIN = lines("vmcall", f"mov rax, {GUEST_RESUMED_MARKER:#x}", "back_home: vmcall", "hlt")
# The handler computes RAX + RDI * shared[0] and notes the stack it was given in shared[1].
GUEST_HANDLER = lines(f"mov rbx, {GUEST_SHARED:#x}", "mov [rbx + 8], rsp", "mov rcx, [rbx]", "imul rdi, rcx",
                      "add rax, rdi", "vmcall")

SLOT_RIP_BEFORE, SLOT_RSP_BEFORE, SLOT_FLAGS, SLOT_RAX, SLOT_RIP_AFTER, SLOT_RSP_AFTER = range(10, 16)
SLOT_ERROR, SLOT_EXIT_REASON = 16, 17


def inverse_call_on_first_exit(guest_shared_hpa: int) -> str:
    """on_exit code: at the first exit, fill the shared page and VMCALLR; record what the root sees."""
    return lines(
        "cmp rcx, 1", "jne vm_exit_continue",
        vmread("rbx", "GUEST_RIP"), save(SLOT_RIP_BEFORE, "rbx"),
        vmread("rbx", "GUEST_RSP"), save(SLOT_RSP_BEFORE, "rbx"),
        f"mov rbx, {guest_shared_hpa:#x}", f"mov qword ptr [rbx], {SHARED_VALUE}",
        f"mov rax, {CALL_NUMBER}", f"mov rdi, {CALL_ARGUMENT}",
        VMCALLR,
        save_flags(SLOT_FLAGS), save(SLOT_RAX),
        "mov rcx, -1", vmread("rcx", "VM_INSTRUCTION_ERROR"), save(SLOT_ERROR, "rcx"),
        vmread("rbx", "VM_EXIT_REASON"), save(SLOT_EXIT_REASON, "rbx"),
        vmread("rbx", "GUEST_RIP"), save(SLOT_RIP_AFTER, "rbx"),
        vmread("rbx", "GUEST_RSP"), save(SLOT_RSP_AFTER, "rbx"),
        "jmp vm_exit_resume")


def run_inverse_call(machine, handler: str, entry: int | None = GUEST_INVERSE_HANDLER):
    fields = {"INVERSE_HYPERCALL_STACK": GUEST_INVERSE_STACK_TOP}
    if entry is not None:
        fields["INVERSE_HYPERCALL_ENTRY"] = entry
    # The shared page's host address is fixed by the default EPT: GPA 0 maps to GUEST_RAM_BASE.
    run, guest = run_guest(machine, GUEST_MAIN, extra_code={GUEST_INVERSE_HANDLER: handler},
                           fields=fields, on_exit=inverse_call_on_first_exit(GUEST_RAM_BASE + GUEST_SHARED),
                           stop_reasons=(ExitReason.HLT,))
    assert guest.hpa(GUEST_SHARED) == GUEST_RAM_BASE + GUEST_SHARED
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    return run, guest


def test_inverse_hypercall_round_trip(machine):
    run, guest = run_inverse_call(machine, GUEST_HANDLER)
    assert result(machine, SLOT_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == 0
    assert result(machine, SLOT_RAX) == CALL_NUMBER + CALL_ARGUMENT * SHARED_VALUE
    assert guest.read_u64(GUEST_SHARED + 8) == GUEST_INVERSE_STACK_TOP, "the handler ran on its own stack"
    assert result(machine, SLOT_RIP_AFTER) == result(machine, SLOT_RIP_BEFORE), "guest RIP changed"
    assert result(machine, SLOT_RSP_AFTER) == result(machine, SLOT_RSP_BEFORE), "guest RSP changed"
    log = exit_log(machine)
    assert [r.reason for r in log] == [ExitReason.VMCALL, ExitReason.VMCALL, ExitReason.HLT], \
        "the handler's VMCALL must end the inverse call, not exit"
    assert log[1].guest_rax == GUEST_RESUMED_MARKER
    assert log[1].guest_rip == label_address(GUEST_MAIN, "back_home", GUEST_CODE, root_program=False)
    (call,) = events_of(machine, "vmcallr")
    (returned,) = events_of(machine, "vmcallr-return")
    assert call.data["call"] == CALL_NUMBER and call.seq < returned.seq
    assert returned.data["ok"] is True and returned.data["result"] == result(machine, SLOT_RAX)
    assert machine.inverse_call_counts == {CALL_NUMBER: 1}


@pytest.mark.parametrize("instruction, reason", [("cpuid", ExitReason.CPUID), ("hlt", ExitReason.HLT)])
def test_inverse_hypercall_ended_by_a_vm_exit(machine, instruction, reason):
    run, _ = run_inverse_call(machine, lines("mov eax, 1", instruction, "vmcall"))
    assert result(machine, SLOT_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_ZF
    assert result(machine, SLOT_ERROR) == VMCALLR_ENDED_BY_VM_EXIT
    assert result(machine, SLOT_EXIT_REASON) == reason
    assert result(machine, SLOT_RIP_AFTER) == result(machine, SLOT_RIP_BEFORE)
    assert [r.reason for r in exit_log(machine)] == [ExitReason.VMCALL, ExitReason.VMCALL, ExitReason.HLT], \
        "after a failed inverse call the guest goes on from where it was"
    (returned,) = events_of(machine, "vmcallr-return")
    assert returned.data["ok"] is False and returned.data["exit_reason"] == reason


def test_inverse_hypercall_without_entry_point(machine):
    run_inverse_call(machine, GUEST_HANDLER, entry=None)
    assert result(machine, SLOT_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_ZF
    assert result(machine, SLOT_ERROR) == VMCALLR_NO_ENTRY_POINT
    assert events_of(machine, "vmcallr") == []


def test_inverse_hypercall_outside_vmx_operation_raises_invalid_opcode(machine):
    expect_invalid_opcode(machine, "", VMCALLR)


def test_inverse_hypercall_without_current_vmcs_fails_invalid(machine):
    run = run_root(machine, lines(write_revision(VMXON_REGION), write_revision(VMCS_REGION), enable_vmx(), VMCALLR,
                                  save_flags(0), debug_exit(EXIT_OK)))
    assert run.stop.exit_status == exit_status(EXIT_OK)
    assert result(machine, 0) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_CF


def test_inverse_hypercall_on_a_vmcs_never_launched(machine):
    body = lines(vmx_on_with_current_vmcs(), VMCALLR, save_flags(0),
                 vmread("rcx", "VM_INSTRUCTION_ERROR"), save(1, "rcx"), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK)
    assert result(machine, 0) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_ZF
    assert result(machine, 1) == VMCALLR_NOT_LAUNCHED


def test_inverse_hypercall_instruction_in_a_guest_exits(machine):
    run, _ = run_guest(machine, lines("mov rax, 3", VMCALLR, "hlt"), stop_reasons=(ExitReason.VMCALLR,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.VMCALLR
    assert record.instruction_length == VMCALLR_LENGTH
    assert record.guest_rax == 3
    assert events_of(machine, "vmcallr") == []


# --- the C transition loop (emu/fastpath.c) carries out VMCALLR and its return -----------------------
def inverse_call_rewriting_guest_rip(guest_shared_hpa: int) -> str:
    """As inverse_call_on_first_exit, after writing GUEST_RIP with its own value: the VMCALLR then
    finds a live field software wrote, which its entry loads first (docs/machine.md 8.3 step 8)."""
    return inverse_call_on_first_exit(guest_shared_hpa).replace(
        f"mov rax, {CALL_NUMBER}", lines(vmread("rbx", "GUEST_RIP"), vmwrite("GUEST_RIP", "rbx"),
                                         f"mov rax, {CALL_NUMBER}"), 1)


class PythonCalls:
    """Counts the calls of VmxUnit's Python VMCALLR and return, which the loop must not need."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.returns = 0
        vmcallr, returning = VmxUnit.vmcallr, VmxUnit.return_from_inverse_call

        def counted_vmcallr(unit, *args):
            self.calls += 1
            return vmcallr(unit, *args)

        def counted_return(unit, *args):
            self.returns += 1
            return returning(unit, *args)

        monkeypatch.setattr(VmxUnit, "vmcallr", counted_vmcallr)
        monkeypatch.setattr(VmxUnit, "return_from_inverse_call", counted_return)


def run_both_ways(handler: str, *, on_exit=inverse_call_on_first_exit, stack: int | None = GUEST_INVERSE_STACK_TOP,
                  monkeypatch=None):
    """The same inverse call with the C loop on and off: each machine, and the Python calls of the first."""
    machines = []
    python_calls = None
    for fast_transitions in (True, False):
        machine = Machine(record_events=True, fast_transitions=fast_transitions)
        if fast_transitions and monkeypatch is not None:
            python_calls = PythonCalls(monkeypatch)
        fields = {"INVERSE_HYPERCALL_ENTRY": GUEST_INVERSE_HANDLER}
        if stack is not None:
            fields["INVERSE_HYPERCALL_STACK"] = stack
        run, _ = run_guest(machine, GUEST_MAIN, extra_code={GUEST_INVERSE_HANDLER: handler}, fields=fields,
                           on_exit=on_exit(GUEST_RAM_BASE + GUEST_SHARED), stop_reasons=(ExitReason.HLT,))
        assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
        machine.run_result = run
        if python_calls is not None:
            monkeypatch.undo()
        machines.append(machine)
    return machines[0], machines[1], python_calls


def assert_same_machine(fast: Machine, slow: Machine) -> None:
    assert event_tuples(fast) == event_tuples(slow)
    assert fast.run_result == slow.run_result
    assert exit_log(fast) == exit_log(slow)
    assert [result(fast, slot) for slot in range(SLOT_RIP_BEFORE, SLOT_EXIT_REASON + 1)] == \
        [result(slow, slot) for slot in range(SLOT_RIP_BEFORE, SLOT_EXIT_REASON + 1)]
    assert fast.inverse_call_counts == slow.inverse_call_counts
    assert fast.statistics()["exits_by_reason"] == slow.statistics()["exits_by_reason"]
    assert fast.ram.read(VMCS_REGION, PAGE_SIZE) == slow.ram.read(VMCS_REGION, PAGE_SIZE)


@pytest.mark.parametrize("on_exit", [inverse_call_on_first_exit, inverse_call_rewriting_guest_rip],
                         ids=["plain", "guest-rip-written"])
@pytest.mark.parametrize("stack", [GUEST_INVERSE_STACK_TOP, None], ids=["own-stack", "guest-stack"])
def test_the_loop_carries_out_the_round_trip_as_python_does(monkeypatch, on_exit, stack):
    fast, slow, python_calls = run_both_ways(GUEST_HANDLER, on_exit=on_exit, stack=stack, monkeypatch=monkeypatch)
    assert_same_machine(fast, slow)
    assert result(fast, SLOT_RAX) == CALL_NUMBER + CALL_ARGUMENT * SHARED_VALUE
    assert (python_calls.calls, python_calls.returns) == (0, 0), "the C loop left the call to Python"
    assert fast.statistics()["transitions_in_c"] > 0 and slow.statistics()["transitions_in_c"] == 0


@pytest.mark.parametrize("ending", ["cpuid", "hlt", "rdmsr", "ud2"])
def test_a_call_ended_by_a_vm_exit_is_the_same_with_the_loop(monkeypatch, ending):
    """The loop enters the call; whatever ends it but the guest's VMCALL is Python's, as before."""
    fast, slow, python_calls = run_both_ways(lines("mov eax, 1", ending, "vmcall"), monkeypatch=monkeypatch)
    assert_same_machine(fast, slow)
    assert python_calls.calls == 0 and python_calls.returns == 0
    (returned,) = events_of(fast, "vmcallr-return")
    assert returned.data["ok"] is False
