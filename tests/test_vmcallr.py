"""VMCALLR, the inverse hypercall (opcode 0F 0A): root calls into a guest handler, the guest returns with VMCALL.

The round trip and every failure are observed by root programs: RAX and RFLAGS after VMCALLR,
VM_INSTRUCTION_ERROR and VM_EXIT_REASON read back with VMREAD, and the machine's events.
"""
from __future__ import annotations

import pytest

from emu.vmx import (
    VMCALLR_ENDED_BY_VM_EXIT, VMCALLR_NO_ENTRY_POINT, VMCALLR_NOT_LAUNCHED,
)
from emu.vmx_defs import ExitReason
from tests.machine_programs import (
    EXIT_OK, EXIT_STOPPED_ON_EXIT, GUEST_CODE, GUEST_INVERSE_HANDLER, GUEST_INVERSE_STACK_TOP,
    GUEST_RAM_BASE, GUEST_SHARED, RFLAGS_CF, RFLAGS_ZF, VMCS_REGION, VMXON_REGION,
    debug_exit, enable_vmx, events_of, exit_log, exit_status, expect_invalid_opcode, label_address, lines,
    result, run_guest, run_root, save, save_flags, vmread, vmx_on_with_current_vmcs, write_revision,
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
