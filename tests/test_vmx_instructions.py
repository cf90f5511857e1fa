"""VMX instructions in root mode (success and each failure) and the VM exits a guest can cause.

Every test runs a root program on the machine; outcomes are what the program sees: RFLAGS after the
instruction, VM_INSTRUCTION_ERROR read back with VMREAD, the VM-exit information fields of each exit.
See: SDM Vol. 3C 31.2 (VMsucceed / VMfailInvalid / VMfailValid), 31.3 (instructions), 31.4 (errors).
"""
from __future__ import annotations

import struct

import pytest
from unicorn import unicorn_const

from emu import context as ctxmod
from emu import vmcs_fields as vf
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx import DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT
from emu.vmx_defs import (
    EXIT_REASON_VM_ENTRY_FAILURE, INTR_INFO_VALID, IO_QUAL_DIRECTION_IN, IO_QUAL_IMMEDIATE_OPERAND,
    IO_QUAL_PORT_SHIFT, IO_QUAL_REP,
    IO_QUAL_SIZE_MASK, IO_QUAL_STRING, ExceptionVector, ExitControls, ExitReason, InterruptionType,
    PinBasedControls, PrimaryProcessorControls, Rflags, VmInstructionError, make_interruption_info,
)
from tests.machine_programs import (
    ENCODING, EXIT_OK, EXIT_STOPPED_ON_EXIT, GUEST_CODE, GUEST_DATA, GUEST_IDT, PAGE_SIZE,
    RFLAGS_CF, RFLAGS_ZF, ROOT_IDT, ROOT_STACK_TOP, SCRATCH,
    GUEST_PML4, U64, VMCS_REGION, VMXON_REGION, arm_timer, assemble, build_guest, debug_exit,
    default_controls, enable_vmx, event_kinds, events_of, exit_log, exit_status, expect_invalid_opcode,
    label_address, lines, make_current, putc, result, results, run_guest, run_root, save, save_flags,
    set_interrupt_gate, vmread, vmwrite, vmx_on_with_current_vmcs, vmx_pointer_instruction, vmx_program,
    write_revision,
)

VMSUCCEED = ("VMsucceed", None)
VMFAIL_INVALID = ("VMfailInvalid", None)
UNSUPPORTED_ENCODING = 0x6034      # natural-width control index 26: not a field of this machine
NOT_A_VMCS_ADDRESS = 0x123         # not 4 KiB aligned
BEYOND_MAXPHYADDR = 1 << CAPS.maxphyaddr
WRONG_REVISION = CAPS.vmcs_revision_id ^ 1
INVEPT_BAD_TYPE = 3
TIMER_VECTOR = 0x40
INJECTED_VECTOR = 0x30
TIMER_TICKS = 2000
IO_BITMAP_A_ADDRESS = 0x210000
POST_CODE_PORT = 0x80
BITS_PER_BYTE = 8


def fail_valid(error: int) -> tuple[str, int]:
    return ("VMfailValid", int(error))


def observe(slot: int) -> str:
    """After a VMX instruction: RFLAGS to `slot`, VM_INSTRUCTION_ERROR (or -1) to `slot + 1`."""
    return lines(save_flags(slot), "mov rcx, -1", vmread("rcx", "VM_INSTRUCTION_ERROR"), save(slot + 1, "rcx"))


def outcome(machine, slot: int) -> tuple[str, int | None]:
    flags = result(machine, slot)
    if flags & RFLAGS_CF and not flags & RFLAGS_ZF:
        return VMFAIL_INVALID
    if flags & RFLAGS_ZF and not flags & RFLAGS_CF:
        return fail_valid(result(machine, slot + 1))
    if not flags & (RFLAGS_CF | RFLAGS_ZF):
        return VMSUCCEED
    return ("both CF and ZF", flags)


def run_ok(machine, body: str):
    run = run_root(machine, lines(body, debug_exit(EXIT_OK)))
    assert run.stop.reason == "debug-exit", run.stop.report
    assert run.stop.exit_status == exit_status(EXIT_OK)
    return run


# --- VMXON / VMXOFF ------------------------------------------------------------------------------------
def test_vmxon_without_cr4_vmxe_raises_invalid_opcode(machine):
    expect_invalid_opcode(machine, lines(write_revision(VMXON_REGION), f"mov rax, {VMXON_REGION:#x}", "push rax"),
                          "vmxon [rsp]")


def test_vmxon_with_wrong_revision_fails_invalid(machine):
    run_ok(machine, lines(write_revision(VMXON_REGION, WRONG_REVISION), enable_vmx(), save_flags(0)))
    assert outcome(machine, 0) == VMFAIL_INVALID
    assert [e.data["ok"] for e in events_of(machine, "vmxon")] == [False]


def test_vmxon_twice(machine):
    body = lines(write_revision(VMXON_REGION), write_revision(VMCS_REGION),
                 enable_vmx(), observe(0),
                 vmx_pointer_instruction("vmxon", VMXON_REGION), observe(2),   # no current VMCS yet
                 make_current(),
                 vmx_pointer_instruction("vmxon", VMXON_REGION), observe(4))
    run_ok(machine, body)
    assert outcome(machine, 0) == VMSUCCEED
    assert outcome(machine, 2) == VMFAIL_INVALID
    assert outcome(machine, 4) == fail_valid(VmInstructionError.VMXON_IN_VMX_ROOT)


def test_vmxoff_leaves_vmx_operation(machine):
    expect_invalid_opcode(machine, lines(vmx_on_with_current_vmcs(), "vmxoff", save_flags(0),
                                         f"mov rax, {ENCODING['VM_EXIT_REASON']:#x}"), "vmread rcx, rax")
    assert outcome(machine, 0) == VMSUCCEED
    assert [kind for kind in event_kinds(machine) if kind.startswith("vmxo")] == ["vmxon", "vmxoff"]


def test_vmxoff_outside_vmx_operation_raises_invalid_opcode(machine):
    expect_invalid_opcode(machine, "", "vmxoff")


# --- VMCLEAR / VMPTRLD / VMPTRST -----------------------------------------------------------------------
def test_vmclear_failures(machine):
    body = lines(vmx_on_with_current_vmcs(),
                 vmx_pointer_instruction("vmclear", VMCS_REGION + NOT_A_VMCS_ADDRESS), observe(0),
                 vmx_pointer_instruction("vmclear", VMXON_REGION), observe(2),
                 vmx_pointer_instruction("vmclear", machine.ram.size), observe(4))
    run_ok(machine, body)
    assert outcome(machine, 0) == fail_valid(VmInstructionError.VMCLEAR_INVALID_ADDRESS)
    assert outcome(machine, 2) == fail_valid(VmInstructionError.VMCLEAR_VMXON_POINTER)
    assert outcome(machine, 4) == fail_valid(VmInstructionError.VMCLEAR_INVALID_ADDRESS)


def test_vmptrld_failures(machine):
    second = VMCS_REGION + 0x1000
    body = lines(vmx_on_with_current_vmcs(), write_revision(second, WRONG_REVISION),
                 vmx_pointer_instruction("vmptrld", VMCS_REGION + NOT_A_VMCS_ADDRESS), observe(0),
                 vmx_pointer_instruction("vmptrld", BEYOND_MAXPHYADDR), observe(2),
                 vmx_pointer_instruction("vmptrld", VMXON_REGION), observe(4),
                 vmx_pointer_instruction("vmptrld", second), observe(6),
                 f"mov rax, {SCRATCH:#x}", "vmptrst [rax]")
    run_ok(machine, body)
    assert outcome(machine, 0) == fail_valid(VmInstructionError.VMPTRLD_INVALID_ADDRESS)
    assert outcome(machine, 2) == fail_valid(VmInstructionError.VMPTRLD_INVALID_ADDRESS)
    assert outcome(machine, 4) == fail_valid(VmInstructionError.VMPTRLD_VMXON_POINTER)
    assert outcome(machine, 6) == fail_valid(VmInstructionError.VMPTRLD_INCORRECT_REVISION_ID)
    assert machine.ram.read_u64(SCRATCH) == VMCS_REGION, "a failed VMPTRLD changed the current VMCS"


def test_vmptrld_without_current_vmcs_fails_invalid(machine):
    body = lines(write_revision(VMXON_REGION), enable_vmx(),
                 vmx_pointer_instruction("vmptrld", VMXON_REGION), observe(0))
    run_ok(machine, body)
    assert outcome(machine, 0) == VMFAIL_INVALID


def test_vmptrst_stores_current_pointer_or_all_ones(machine):
    body = lines(write_revision(VMXON_REGION), write_revision(VMCS_REGION), enable_vmx(),
                 f"mov rax, {SCRATCH:#x}", "vmptrst [rax]", save_flags(0),
                 make_current(),
                 f"mov rax, {SCRATCH + 8:#x}", "vmptrst [rax]", save_flags(1),
                 vmx_pointer_instruction("vmclear", VMCS_REGION),
                 f"mov rax, {SCRATCH + 16:#x}", "vmptrst [rax]")
    run_ok(machine, body)
    assert machine.ram.read_u64(SCRATCH) == U64
    assert machine.ram.read_u64(SCRATCH + 8) == VMCS_REGION
    assert machine.ram.read_u64(SCRATCH + 16) == U64, "VMCLEAR of the current VMCS must make it not current"
    assert outcome(machine, 0) == VMSUCCEED and outcome(machine, 1) == VMSUCCEED


# --- VMREAD / VMWRITE ----------------------------------------------------------------------------------
def test_vmread_vmwrite_without_current_vmcs_fail_invalid(machine):
    body = lines(write_revision(VMXON_REGION), enable_vmx(),
                 "mov rcx, 0x1234", vmread("rcx", "GUEST_RIP"), save_flags(0), save(1, "rcx"),
                 vmwrite("GUEST_RIP", 0x1000), save_flags(2))
    run_ok(machine, body)
    assert result(machine, 0) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_CF
    assert result(machine, 1) == 0x1234, "a failed VMREAD wrote its destination"
    assert result(machine, 2) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_CF


def test_vmread_vmwrite_field_errors(machine):
    assert vf.lookup(UNSUPPORTED_ENCODING) is None
    body = lines(vmx_on_with_current_vmcs(),
                 f"mov rax, {UNSUPPORTED_ENCODING:#x}", "vmread rcx, rax", observe(0),
                 f"mov rax, {UNSUPPORTED_ENCODING:#x}", "mov rbx, 1", "vmwrite rax, rbx", observe(2),
                 vmwrite("VM_EXIT_REASON", 1), observe(4),
                 # High half of a 32-bit field does not exist.
                 f"mov rax, {ENCODING['EXCEPTION_BITMAP'] | vf.ENCODING_ACCESS_HIGH:#x}", "vmread rcx, rax", observe(6),
                 # Bits 63:32 of the encoding operand must be zero.
                 f"mov rax, {1 << 32 | ENCODING['GUEST_RIP']:#x}", "vmread rcx, rax", observe(8))
    run_ok(machine, body)
    assert outcome(machine, 0) == fail_valid(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
    assert outcome(machine, 2) == fail_valid(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
    assert outcome(machine, 4) == fail_valid(VmInstructionError.VMWRITE_READ_ONLY_COMPONENT)
    assert outcome(machine, 6) == fail_valid(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
    assert outcome(machine, 8) == fail_valid(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)


def test_vmread_vmwrite_widths_and_64_bit_high_access(machine):
    full = 0x1122_3344_5566_7788
    high_encoding = ENCODING["TSC_OFFSET"] | vf.ENCODING_ACCESS_HIGH
    body = lines(vmx_on_with_current_vmcs(),
                 vmwrite("TSC_OFFSET", full), observe(0),
                 f"mov rax, {high_encoding:#x}", "vmread rcx, rax", save(2, "rcx"),
                 f"mov rax, {high_encoding:#x}", "mov rbx, 0xAABBCCDD", "vmwrite rax, rbx", observe(3),
                 vmread("rcx", "TSC_OFFSET"), save(5, "rcx"),
                 vmwrite("GUEST_CS_SELECTOR", 0x12345), vmread("rcx", "GUEST_CS_SELECTOR"), save(6, "rcx"),
                 vmwrite("EXCEPTION_BITMAP", 0x1_2345_6789), vmread("rcx", "EXCEPTION_BITMAP"), save(7, "rcx"),
                 # Memory operands: VMWRITE from memory, VMREAD to memory.
                 f"mov rbx, {SCRATCH:#x}", "mov qword ptr [rbx], 0x5555",
                 f"mov rax, {ENCODING['GUEST_RSP']:#x}", "vmwrite rax, qword ptr [rbx]",
                 f"mov rbx, {SCRATCH + 8:#x}", "vmread qword ptr [rbx], rax")
    run_ok(machine, body)
    assert outcome(machine, 0) == VMSUCCEED
    assert result(machine, 2) == full >> 32
    assert outcome(machine, 3) == VMSUCCEED
    assert result(machine, 5) == 0xAABB_CCDD_5566_7788
    assert result(machine, 6) == 0x2345, "16-bit fields keep 16 bits"
    assert result(machine, 7) == 0x2345_6789, "32-bit fields keep 32 bits"
    assert machine.ram.read_u64(SCRATCH + 8) == 0x5555


def test_vmcs_image_round_trip_through_vmclear_and_vmptrld(machine):
    """VMWRITE, VMCLEAR writes the image at the documented offsets, edits to it are seen by VMPTRLD."""
    written = {"GUEST_RIP": 0x12_3456_789A, "EXCEPTION_BITMAP": 0x4242, "TSC_OFFSET": 0x1122_3344_5566_7788,
               "GUEST_CS_SELECTOR": 0x1234, "INVERSE_HYPERCALL_ENTRY": 0xDEAD_BEEF}
    edited_field, edited_value = "EXCEPTION_BITMAP", 0x8000_0001
    names = list(written)
    edit = lines(f"mov rax, {VMCS_REGION + vf.BY_NAME[edited_field].offset:#x}",
                 f"mov rbx, {edited_value:#x}", "mov qword ptr [rax], rbx")
    reads = [lines(vmread("rcx", name), save(10 + i, "rcx")) for i, name in enumerate(names)]
    body = lines(vmx_on_with_current_vmcs(), *(vmwrite(n, v) for n, v in written.items()),
                 vmx_pointer_instruction("vmclear", VMCS_REGION), observe(0),
                 # Snapshot the image VMCLEAR wrote, before the program edits one slot of it.
                 *(lines(f"mov rax, {VMCS_REGION + vf.BY_NAME[n].offset:#x}", "mov rcx, [rax]", save(20 + i, "rcx"))
                   for i, n in enumerate(names)),
                 edit,
                 vmx_pointer_instruction("vmptrld", VMCS_REGION), observe(2), *reads)
    run_ok(machine, body)
    assert outcome(machine, 0) == VMSUCCEED and outcome(machine, 2) == VMSUCCEED
    image = dict(zip(names, results(machine, len(names), 20)))
    assert image == written
    assert machine.ram.read_u32(VMCS_REGION + vf.VMCS_LAUNCH_STATE_OFFSET) == vf.LAUNCH_STATE_CLEAR
    assert machine.ram.read_u32(VMCS_REGION + vf.VMCS_REVISION_ID_OFFSET) == CAPS.vmcs_revision_id
    reloaded = dict(zip(names, results(machine, len(names), 10)))
    assert reloaded == {**written, edited_field: edited_value}


# --- VMLAUNCH / VMRESUME / VMCALL / INVEPT -------------------------------------------------------------
def test_vmresume_before_launch_and_vmlaunch_without_vmcs(machine):
    body = lines(write_revision(VMXON_REGION), write_revision(VMCS_REGION), enable_vmx(),
                 "vmlaunch", save_flags(0),
                 make_current(), "vmresume", observe(2))
    run_ok(machine, body)
    assert result(machine, 0) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_CF
    assert outcome(machine, 2) == fail_valid(VmInstructionError.VMRESUME_NONLAUNCHED_VMCS)


def test_vmlaunch_of_a_launched_vmcs_fails(machine):
    on_exit = lines("vmlaunch", observe(0), "jmp vm_exit_stop")
    run, _guest = run_guest(machine, "vmcall", on_exit=on_exit)
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert exit_log(machine)[0].reason == ExitReason.VMCALL
    assert outcome(machine, 0) == fail_valid(VmInstructionError.VMLAUNCH_NONCLEAR_VMCS)


def test_vmcall_in_root_fails_valid(machine):
    run_ok(machine, lines(vmx_on_with_current_vmcs(), "vmcall", observe(0)))
    assert outcome(machine, 0) == fail_valid(VmInstructionError.VMCALL_IN_VMX_ROOT)


def test_invept_types(machine):
    descriptor = lines(f"mov rbx, {SCRATCH:#x}", "mov qword ptr [rbx], 0x5000", "mov qword ptr [rbx + 8], 0")
    body = lines(vmx_on_with_current_vmcs(), descriptor,
                 f"mov rax, {INVEPT_BAD_TYPE}", "invept rax, [rbx]", observe(0),
                 "mov rax, 1", "invept rax, [rbx]", observe(2),
                 "mov rax, 2", "invept rax, [rbx]", observe(4))
    run_ok(machine, body)
    assert outcome(machine, 0) == fail_valid(VmInstructionError.INVALID_INVEPT_INVVPID_OPERAND)
    assert outcome(machine, 2) == VMSUCCEED
    assert outcome(machine, 4) == VMSUCCEED
    assert [e.data["type"] for e in events_of(machine, "invept")] == [1, 2]


# --- VM exits --------------------------------------------------------------------------------------------
def test_cpuid_io_vmcall_hlt_exits(machine):
    guest = lines("mov eax, 1", "cpuid_at: cpuid", "mov dx, 0x3f8", "mov al, 0x47", "out_at: out dx, al",
                  "mov rax, 42", "vmcall_at: vmcall", "hlt_at: hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,),
                       controls=default_controls(primary=PrimaryProcessorControls.HLT_EXITING
                                                 | PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    log = exit_log(machine)
    assert [r.reason for r in log] == [ExitReason.CPUID, ExitReason.IO_INSTRUCTION, ExitReason.VMCALL,
                                       ExitReason.HLT]
    where = [label_address(guest, name, GUEST_CODE, root_program=False)
             for name in ("cpuid_at", "out_at", "vmcall_at", "hlt_at")]
    assert [r.guest_rip for r in log] == where
    assert [r.instruction_length for r in log] == [len(assemble(i, GUEST_CODE)) for i in ("cpuid", "out dx, al",
                                                                                         "vmcall", "hlt")]
    assert log[0].guest_rax == 1 and log[2].guest_rax == 42
    assert machine.io.console.text() == "", "an intercepted OUT reached the device"
    assert run.exits_by_reason == {ExitReason.CPUID: 1, ExitReason.IO_INSTRUCTION: 1, ExitReason.VMCALL: 1,
                                   ExitReason.HLT: 1}


def decode_io(qualification: int) -> tuple[int, int, str, bool, bool, bool]:
    """(port, size in bytes, direction, string, rep, immediate) from an I/O exit qualification."""
    return (qualification >> IO_QUAL_PORT_SHIFT & 0xFFFF, (qualification & IO_QUAL_SIZE_MASK) + 1,
            "in" if qualification & IO_QUAL_DIRECTION_IN else "out", bool(qualification & IO_QUAL_STRING),
            bool(qualification & IO_QUAL_REP), bool(qualification & IO_QUAL_IMMEDIATE_OPERAND))


def test_io_exit_qualification_is_decoded(machine):
    guest = lines("mov dx, 0x3f8", "out dx, al",
                  "in eax, 0x60",
                  "mov dx, 0x1234", "out dx, ax",
                  "mov dx, 0x3fd", "in al, dx",
                  f"mov rsi, {GUEST_DATA:#x}", "mov rcx, 2", "mov dx, 0x80", "rep outsb",
                  "hlt")
    controls = default_controls(primary=PrimaryProcessorControls.HLT_EXITING
                                | PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING)
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,), controls=controls)
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    io = [decode_io(r.qualification) for r in exit_log(machine) if r.reason == ExitReason.IO_INSTRUCTION]
    assert io == [(0x3F8, 1, "out", False, False, False),
                  (0x60, 4, "in", False, False, True),
                  (0x1234, 2, "out", False, False, False),
                  (0x3FD, 1, "in", False, False, False),
                  (0x80, 1, "out", True, True, False)]


def test_io_bitmap_selects_ports(machine):
    bitmap_a, bitmap_b = IO_BITMAP_A_ADDRESS, IO_BITMAP_A_ADDRESS + PAGE_SIZE
    exiting_port = POST_CODE_PORT
    machine.ram.write(bitmap_a, bytes(PAGE_SIZE))
    machine.ram.write(bitmap_b, bytes(PAGE_SIZE))
    machine.ram.write(bitmap_a + exiting_port // BITS_PER_BYTE, bytes([1 << exiting_port % BITS_PER_BYTE]))
    guest = lines(putc("A"), f"mov dx, {exiting_port:#x}", "out dx, al", putc("B"), "hlt")
    controls = default_controls(primary=PrimaryProcessorControls.HLT_EXITING | PrimaryProcessorControls.USE_IO_BITMAPS)
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,), controls=controls,
                       fields={"IO_BITMAP_A": bitmap_a, "IO_BITMAP_B": bitmap_b})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [r.reason for r in exit_log(machine)] == [ExitReason.IO_INSTRUCTION, ExitReason.HLT]
    assert decode_io(exit_log(machine)[0].qualification)[0] == exiting_port
    assert machine.io.console.text() == "AB"


GUEST_VMX_INSTRUCTIONS = [
    ("vmcall", ExitReason.VMCALL), ("vmclear [rax]", ExitReason.VMCLEAR), ("vmlaunch", ExitReason.VMLAUNCH),
    ("vmptrld [rax]", ExitReason.VMPTRLD), ("vmptrst [rax]", ExitReason.VMPTRST),
    ("vmread rbx, rax", ExitReason.VMREAD), ("vmresume", ExitReason.VMRESUME),
    ("vmwrite rax, rbx", ExitReason.VMWRITE), ("vmxoff", ExitReason.VMXOFF), ("vmxon [rax]", ExitReason.VMXON),
    ("invept rax, [rbx]", ExitReason.INVEPT), ("invvpid rax, [rbx]", ExitReason.INVVPID),
    ("vmfunc", ExitReason.VMFUNC),
]


def test_vmx_instructions_in_a_guest_exit_with_their_reason(machine):
    guest = lines(f"mov rax, {GUEST_DATA:#x}", f"mov rbx, {GUEST_DATA:#x}",
                  *(instruction for instruction, _ in GUEST_VMX_INSTRUCTIONS), "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    log = exit_log(machine)
    assert [r.reason for r in log] == [reason for _, reason in GUEST_VMX_INSTRUCTIONS] + [ExitReason.HLT]
    lengths = [len(assemble(instruction, GUEST_CODE)) for instruction, _ in GUEST_VMX_INSTRUCTIONS]
    assert [r.instruction_length for r in log[:-1]] == lengths
    assert event_kinds(machine).count("vmxon") == 1, "the guest's VMXON ran in root mode"


def test_exception_bitmap_turns_ud2_into_an_exit(machine):
    guest = lines("ud2_at: ud2", "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.EXCEPTION_NMI,),
                       fields={"EXCEPTION_BITMAP": 1 << ExceptionVector.UD})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.EXCEPTION_NMI
    assert record.interruption_info == make_interruption_info(ExceptionVector.UD, InterruptionType.HARDWARE_EXCEPTION)
    assert record.guest_rip == GUEST_CODE


def test_ud2_without_bitmap_bit_goes_through_the_guest_idt(machine):
    guest = lines(set_interrupt_gate(GUEST_IDT, ExceptionVector.UD, "ud_handler"), "ud2_at: ud2", "hlt",
                  "ud_handler:", putc("U"), "mov rax, [rsp]", "vmcall")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.VMCALL, ExitReason.HLT))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.VMCALL
    assert record.guest_rax == label_address(guest, "ud2_at", GUEST_CODE, root_program=False)
    assert machine.io.console.text() == "U"


def test_int3_exit_leaves_guest_rip_at_the_instruction_with_length_one(machine):
    guest = lines("nop", "int3_at: int3", "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.EXCEPTION_NMI,),
                       fields={"EXCEPTION_BITMAP": 1 << ExceptionVector.BP})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.interruption_info == make_interruption_info(ExceptionVector.BP, InterruptionType.SOFTWARE_EXCEPTION)
    assert record.guest_rip == label_address(guest, "int3_at", GUEST_CODE, root_program=False)
    assert record.instruction_length == 1


def test_int_n_with_vector_three_is_a_software_interrupt_the_bitmap_ignores(machine):
    guest = lines(set_interrupt_gate(GUEST_IDT, ExceptionVector.BP, "bp_handler"), "int 3", "hlt",
                  "bp_handler:", putc("B"), "vmcall")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.VMCALL, ExitReason.EXCEPTION_NMI),
                       fields={"EXCEPTION_BITMAP": 1 << ExceptionVector.BP})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [r.reason for r in exit_log(machine)] == [ExitReason.VMCALL]
    assert machine.io.console.text() == "B"


CR3_NUMBER = 3
CR_ACCESS_TYPE_SHIFT = 4
CR_GPR_SHIFT = 8
MOV_TO_CR, MOV_FROM_CR = 0, 1
R9_NUMBER = 9
MOV_CR3_R9_LENGTH = 4    # REX.B, 0F 22 or 0F 20, ModRM


@pytest.mark.parametrize("control, instruction, access", [
    (PrimaryProcessorControls.CR3_LOAD_EXITING, "mov cr3, r9", MOV_TO_CR),
    (PrimaryProcessorControls.CR3_STORE_EXITING, "mov r9, cr3", MOV_FROM_CR),
])
def test_cr3_access_exits_with_its_qualification(machine, control, instruction, access):
    guest = lines("mov r9, cr3", "cr3_access:", instruction, "hlt") if access == MOV_TO_CR else \
        lines("cr3_access:", instruction, "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.CR_ACCESS,),
                       controls=default_controls(primary=PrimaryProcessorControls.HLT_EXITING | control))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.CR_ACCESS
    assert record.qualification == CR3_NUMBER | access << CR_ACCESS_TYPE_SHIFT | R9_NUMBER << CR_GPR_SHIFT
    assert record.guest_rip == label_address(guest, "cr3_access", GUEST_CODE, root_program=False)
    assert record.instruction_length == MOV_CR3_R9_LENGTH


def test_cr3_moves_without_exiting_run_in_the_guest(machine):
    guest = lines("mov rbx, cr3", "mov cr3, rbx", "mov rax, cr3", "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.HLT
    assert record.guest_rax == GUEST_PML4
    (write,) = events_of(machine, "cr3-write")
    assert write.data["new"] == GUEST_PML4 and write.data["context"].startswith("vmcs@")


SOFTWARE_INTERRUPT_VECTOR = 0x30


def test_guest_iretq_returns_to_the_code_segment_the_vmcs_gave_it(machine):
    """The guest never loads CS or SS itself: the selectors of the VMCS guest-state area are what
    its interrupt frame holds and what IRETQ reloads (SDM Vol. 3C 27.3.2.2)."""
    guest = lines(set_interrupt_gate(GUEST_IDT, SOFTWARE_INTERRUPT_VECTOR, "handler"),
                  f"int {SOFTWARE_INTERRUPT_VECTOR:#x}", putc("R"), "hlt",
                  "handler:", putc("I"), "iretq")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [record.reason for record in exit_log(machine)] == [ExitReason.HLT]
    assert machine.io.console.text() == "IR"


MSR_LIST = SCRATCH                 # host-physical address of the VM-entry MSR-load list
IA32_LSTAR = 0xC000_0082
IA32_FS_BASE = 0xC000_0100
LSTAR_VALUE = 0xFFFF_8000_1234_5000


def write_msr_list(machine, entries) -> None:
    machine.ram.write(MSR_LIST, b"".join(struct.pack("<IIQ", index, 0, value) for index, value in entries))


def test_vm_entry_msr_load_list_loads_the_guest_msrs(machine):
    write_msr_list(machine, [(IA32_LSTAR, LSTAR_VALUE)])
    run, _ = run_guest(machine, "hlt", stop_reasons=(ExitReason.HLT,),
                       fields={"VM_ENTRY_MSR_LOAD_COUNT": 1, "VM_ENTRY_MSR_LOAD_ADDR": MSR_LIST})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [record.reason for record in exit_log(machine)] == [ExitReason.HLT]
    assert machine.active_vmcs[VMCS_REGION].context.uc.msr_read(IA32_LSTAR) == LSTAR_VALUE


def test_vm_entry_msr_load_failure_exits_with_reason_34_and_the_entry_number(machine):
    write_msr_list(machine, [(IA32_LSTAR, LSTAR_VALUE), (IA32_FS_BASE, 0)])
    run, _ = run_guest(machine, "hlt", on_exit="jmp vm_exit_stop",
                       fields={"VM_ENTRY_MSR_LOAD_COUNT": 2, "VM_ENTRY_MSR_LOAD_ADDR": MSR_LIST})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == EXIT_REASON_VM_ENTRY_FAILURE | ExitReason.MSR_LOADING
    assert record.qualification == 2
    assert events_of(machine, "vm-entry") == []


def test_page_fault_exit_reports_linear_address_and_error_code(machine):
    unmapped = 0x80_0000_0000          # PML4 entry 1 of the guest's page tables is not present
    guest = lines(f"mov rax, {unmapped:#x}", "mov qword ptr [rax], 1", "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.EXCEPTION_NMI,),
                       fields={"EXCEPTION_BITMAP": 1 << ExceptionVector.PF})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    page_fault_write = 1 << 1
    assert record.qualification == unmapped
    assert record.interruption_info == make_interruption_info(ExceptionVector.PF, InterruptionType.HARDWARE_EXCEPTION,
                                                              deliver_error_code=True)
    assert record.interruption_error == page_fault_write


def test_guest_without_idt_divides_by_zero_triple_faults(machine):
    guest = lines("xor ecx, ecx", "xor edx, edx", "mov eax, 1", "div ecx", "hlt")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.TRIPLE_FAULT,),
                       fields={"GUEST_IDTR_BASE": 0, "GUEST_IDTR_LIMIT": 0})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [r.reason for r in exit_log(machine)] == [ExitReason.TRIPLE_FAULT]


def test_preemption_timer_exit(machine):
    timer_value = 5000
    guest = lines("xor eax, eax", "spin:", "inc rax", "jmp spin")
    on_exit = lines(vmread("rbx", "VMX_PREEMPTION_TIMER_VALUE"), save(0, "rbx"))
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.PREEMPTION_TIMER,), on_exit=on_exit,
                       controls=default_controls(pin=PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER,
                                                 exit=ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE),
                       fields={"VMX_PREEMPTION_TIMER_VALUE": timer_value})
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.PREEMPTION_TIMER
    (entry,) = events_of(machine, "vm-entry")
    (exit_,) = events_of(machine, "vm-exit")
    guest_ticks = exit_.time - entry.time
    assert timer_value <= guest_ticks <= timer_value + 2
    loop_iterations = record.guest_rax
    assert abs(2 * loop_iterations - timer_value) <= 2, "two instructions per iteration"
    assert result(machine, 0) == 0, "the saved timer value is what is left: nothing"


@pytest.mark.parametrize("acknowledge", [True, False])
def test_external_interrupt_exit(machine, acknowledge):
    # After the exit the root opens its interrupt window: an acknowledged interrupt was consumed by the
    # exit, an unacknowledged one is still pending and reaches the root's IDT handler.
    root_window = lines(set_interrupt_gate(ROOT_IDT, TIMER_VECTOR, "root_timer"), "xor r13, r13", "sti",
                        f"mov ecx, {TIMER_TICKS}", "window: loop window", "cli", save(0, "r13"), "jmp vm_exit_stop",
                        "root_timer:", "inc r13", "iretq")
    exit_controls = ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT if acknowledge else 0
    run, _ = run_guest(machine, "spin: jmp spin", before_launch=arm_timer(TIMER_VECTOR, TIMER_TICKS),
                       on_exit=root_window,
                       controls=default_controls(pin=PinBasedControls.EXTERNAL_INTERRUPT_EXITING, exit=exit_controls))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.EXTERNAL_INTERRUPT
    if acknowledge:
        assert record.interruption_info == make_interruption_info(TIMER_VECTOR, InterruptionType.EXTERNAL_INTERRUPT)
        assert result(machine, 0) == 0, "the acknowledged interrupt was delivered again"
    else:
        assert record.interruption_info == 0
        assert result(machine, 0) == 1, "the unacknowledged interrupt did not reach the root IDT"


def test_event_injection_on_vm_entry(machine):
    guest = lines(set_interrupt_gate(GUEST_IDT, INJECTED_VECTOR, "injected"), "sti", "first_exit: vmcall",
                  "spin: jmp spin",
                  "injected:", putc("I"), "mov rax, [rsp]", "vmcall")
    info = make_interruption_info(INJECTED_VECTOR, InterruptionType.EXTERNAL_INTERRUPT)
    on_exit = lines("cmp rcx, 1", "jne after_injection", vmwrite("VM_ENTRY_INTR_INFO_FIELD", info),
                    "jmp vm_exit_resume",
                    "after_injection:", vmread("rbx", "VM_ENTRY_INTR_INFO_FIELD"), save(0, "rbx"), "jmp vm_exit_stop")
    run, _ = run_guest(machine, guest, on_exit=on_exit)
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    first, second = exit_log(machine)
    assert machine.io.console.text() == "I"
    after_vmcall = label_address(guest, "spin", GUEST_CODE, root_program=False)
    assert second.reason == ExitReason.VMCALL and second.guest_rax == after_vmcall, \
        "the injected interrupt's frame must hold the RIP the entry resumed at"
    assert result(machine, 0) & INTR_INFO_VALID == 0, "VM exit clears the valid bit of the entry field"
    assert [e.data["vector"] for e in events_of(machine, "inject")] == [INJECTED_VECTOR]


def test_guest_takes_its_own_timer_interrupt_without_exiting(machine):
    guest = lines(set_interrupt_gate(GUEST_IDT, TIMER_VECTOR, "tick"), arm_timer(TIMER_VECTOR, TIMER_TICKS),
                  "sti", "spin: jmp spin",
                  "tick:", putc("T"), f"mov rax, {TIMER_VECTOR:#x}", "vmcall")
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.VMCALL,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [(r.reason, r.guest_rax) for r in exit_log(machine)] == [(ExitReason.VMCALL, TIMER_VECTOR)]
    assert machine.io.console.text() == "T"


def test_exit_loads_host_state(machine):
    """After an exit the root runs at HOST_RIP on HOST_RSP with RFLAGS = 2 and IDTR limit FFFFH (SDM 28.5)."""
    guest = build_guest(machine, lines("stc", "vmcall"))   # carry set in the guest, not after the exit
    handler = lines("vm_exit:", "pushfq", "pop rbx", save(0, "rbx"), "mov rbx, rsp", save(1, "rbx"),
                    f"mov rbx, {SCRATCH:#x}", "sidt [rbx]", debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == Rflags.FIXED1
    assert result(machine, 1) == ROOT_STACK_TOP
    limit_bytes, base_bytes = 2, 8
    assert machine.ram.read(SCRATCH, limit_bytes + base_bytes) == \
        DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT.to_bytes(limit_bytes, "little") + ROOT_IDT.to_bytes(base_bytes, "little")


def test_a_guest_the_emulator_cannot_continue_ends_with_a_clean_exit(machine, monkeypatch):
    """Unicorn errors that are no architectural event (none is known to happen) end the guest with
    the machine-specific exit 97, qualification = Unicorn's error, instead of escaping the machine."""
    classify = ctxmod.ExecutionContext.classify

    def failing_classify(self, error, watch_interrupt_window=False):
        stop = classify(self, error, watch_interrupt_window)
        if self.kind == ctxmod.GUEST and stop.kind == ctxmod.STOP_TRAPPED_INSTRUCTION:
            return ctxmod.Stop(ctxmod.STOP_EMULATOR_ERROR, stop.rip, error=unicorn_const.UC_ERR_MAP)
        return stop

    monkeypatch.setattr(ctxmod.ExecutionContext, "classify", failing_classify)
    run, _ = run_guest(machine, lines("nop", "stuck: hlt"), on_exit="jmp vm_exit_stop")
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.GUEST_CANNOT_CONTINUE
    assert record.qualification == unicorn_const.UC_ERR_MAP
    assert record.guest_rip == label_address(lines("nop", "stuck: hlt"), "stuck", GUEST_CODE, root_program=False)
