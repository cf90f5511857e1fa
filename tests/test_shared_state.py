"""State real hardware shares between root and guest (docs/machine.md 7.4): x87/SSE, CR2, DR0-DR6 and
the MSRs VMX does not switch cross every VM exit and entry; MSR bitmaps and the VM-exit MSR lists."""
from __future__ import annotations

import struct

import pytest

from emu import fast, msrs
from emu.machine import Machine
from emu.vmx_defs import ExceptionVector, ExitReason, PrimaryProcessorControls
from tests.machine_programs import (
    EXIT_FAULT, EXIT_OK, GUEST_DATA, ROOT_IDT, SCRATCH, build_guest, debug_exit, default_controls,
    exit_status, fault_recorder, lines, result, run_root, save, set_interrupt_gate, vmread, vmwrite,
    vmx_program, SLOT_FAULT_VECTOR, SLOT_FAULT_ERROR_CODE,
)

GUEST_XMM0 = 0x1122_3344_5566_7788
GUEST_MXCSR = 0x7F80 | (1 << 13)        # all exceptions masked, round down (SDM Vol. 1 10.2.3)
GUEST_CR2 = 0xDEAD_B000
GUEST_DR0 = 0x0000_7000_1234_5678
GUEST_LSTAR = 0xFFFF_8000_0010_2000
ROOT_XMM1 = 0x0BAD_F00D_CAFE_BABE
ROOT_CR2 = 0x4242_0000
ROOT_DR1 = 0x0000_1111_2222_3333
ROOT_KERNEL_GS_BASE = 0xFFFF_8800_0000_1000
FXSAVE_MXCSR_OFFSET = 24                # SDM Vol. 1 Table 10-2
FXSAVE_XMM0_OFFSET = 160
FXSAVE_AREA = SCRATCH + 0x1000          # 16-byte aligned
EXIT_ROUND_TRIPS = 3


def mov_imm(register: str, value: int) -> str:
    return f"mov {register}, {value:#x}"


# The guest sets its shared state, exits with VMCALL, then reads back what root left for it.
GUEST_SETS_AND_READS = lines(
    mov_imm("rax", GUEST_XMM0), "movq xmm0, rax",
    f"mov dword ptr [{GUEST_DATA:#x}], {GUEST_MXCSR:#x}", f"ldmxcsr [{GUEST_DATA:#x}]",
    "fld1", "fldpi",
    mov_imm("rax", GUEST_CR2), "mov cr2, rax",
    mov_imm("rax", GUEST_DR0), "mov dr0, rax",
    "vmcall",
    "movq rax, xmm1", f"mov [{GUEST_DATA + 8:#x}], rax",
    "mov rax, cr2", f"mov [{GUEST_DATA + 16:#x}], rax",
    "mov rax, dr1", f"mov [{GUEST_DATA + 24:#x}], rax",
    "hlt")

# Root, after the VMCALL exit: what the guest left, as hardware would show it, then values for the guest.
ROOT_EXIT_HANDLER = lines(
    "vm_exit:",
    vmread("rbx", "VM_EXIT_REASON"), f"cmp rbx, {int(ExitReason.HLT)}", "je guest_done",
    "movq rax, xmm0", save(0),
    f"stmxcsr [{SCRATCH:#x}]", f"mov eax, [{SCRATCH:#x}]", save(1),
    "mov rax, cr2", save(2),
    "mov rax, dr0", save(3),
    f"mov rax, {FXSAVE_AREA:#x}", "fxsave [rax]",
    mov_imm("rax", ROOT_XMM1), "movq xmm1, rax",
    mov_imm("rax", ROOT_CR2), "mov cr2, rax",
    mov_imm("rax", ROOT_DR1), "mov dr1, rax",
    vmread("rcx", "GUEST_RIP"), vmread("rdx", "VM_EXIT_INSTRUCTION_LEN"), "add rcx, rdx",
    vmwrite("GUEST_RIP", "rcx"),
    "vmresume",
    debug_exit(0x7E),
    "guest_done:",
    debug_exit(EXIT_OK))


@pytest.mark.parametrize("fast_transitions", [True, False])
def test_guest_state_crosses_exit_and_entry_both_ways(fast_transitions):
    machine = Machine(fast_transitions=fast_transitions)
    guest = build_guest(machine, GUEST_SETS_AND_READS)
    run = run_root(machine, vmx_program(guest, ROOT_EXIT_HANDLER))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    # After the exit root sees the guest's values (SDM Vol. 3C 28.3: VM exits do not switch them).
    assert result(machine, 0) == GUEST_XMM0
    assert result(machine, 1) == GUEST_MXCSR
    assert result(machine, 2) == GUEST_CR2
    assert result(machine, 3) == GUEST_DR0
    image = machine.ram.read(FXSAVE_AREA, 512)
    assert struct.unpack_from("<I", image, FXSAVE_MXCSR_OFFSET)[0] == GUEST_MXCSR
    assert struct.unpack_from("<Q", image, FXSAVE_XMM0_OFFSET)[0] == GUEST_XMM0
    # After the entry the guest sees what root left.
    assert guest.read_u64(GUEST_DATA + 8) == ROOT_XMM1
    assert guest.read_u64(GUEST_DATA + 16) == ROOT_CR2
    assert guest.read_u64(GUEST_DATA + 24) == ROOT_DR1


def test_no_copy_when_neither_side_touches_shared_state():
    """A CPUID loop with plain root code: the lazy switch copies nothing."""
    machine = Machine()
    guest = build_guest(machine, lines("mov r9d, 50", "again:", "cpuid", "dec r9d", "jnz again", "hlt"))
    handler = lines("vm_exit:", vmread("rbx", "VM_EXIT_REASON"), f"cmp rbx, {int(ExitReason.HLT)}",
                    "je done", vmread("rbx", "GUEST_RIP"), "add rbx, 2", vmwrite("GUEST_RIP", "rbx"),
                    "vmresume", "done:", debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert machine.exit_counts[ExitReason.CPUID] == 50
    assert list(machine.lps[0].shared.copies) == [0, 0]


def test_a_cleared_vmcs_leaves_the_shared_state_on_its_lp():
    """VMCLEAR right after the exit (root has touched nothing): the guest's XMM0 is still the LP's."""
    machine = Machine()
    guest = build_guest(machine, lines(mov_imm("rax", GUEST_XMM0), "movq xmm0, rax", "vmcall"))
    handler = lines("vm_exit:", "mov rax, 0x201000", "push rax", "vmclear [rsp]", "pop rax",
                    "movq rax, xmm0", save(0), debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == GUEST_XMM0


def msr_bitmap_guest(machine, *, intercept_lstar_write: bool):
    bitmap = 0x3F0000
    if intercept_lstar_write:
        offset = msrs.IA32_LSTAR - 0xC000_0000
        machine.ram.write(bitmap + 3072 + offset // 8, bytes([1 << (offset % 8)]))
    code = lines(
        f"mov ecx, {msrs.IA32_LSTAR:#x}", mov_imm("rax", GUEST_LSTAR & 0xFFFF_FFFF),
        mov_imm("rdx", GUEST_LSTAR >> 32), "wrmsr",
        f"mov ecx, {msrs.IA32_KERNEL_GS_BASE:#x}", "rdmsr", "shl rdx, 32", "or rax, rdx",
        f"mov [{GUEST_DATA:#x}], rax",
        "vmcall", "hlt")
    controls = default_controls(primary=PrimaryProcessorControls.HLT_EXITING
                                | PrimaryProcessorControls.USE_MSR_BITMAPS)
    return build_guest(machine, code, controls=controls, fields={"MSR_BITMAP": bitmap})


def test_msr_bitmap_passes_shared_msrs_through():
    machine = Machine()
    guest = msr_bitmap_guest(machine, intercept_lstar_write=False)
    before = lines(f"mov ecx, {msrs.IA32_KERNEL_GS_BASE:#x}", mov_imm("rax", ROOT_KERNEL_GS_BASE & 0xFFFF_FFFF),
                   mov_imm("rdx", ROOT_KERNEL_GS_BASE >> 32), "wrmsr")
    handler = lines("vm_exit:", vmread("rbx", "VM_EXIT_REASON"), "mov rax, rbx", save(0),
                    f"mov ecx, {msrs.IA32_LSTAR:#x}", "rdmsr", "shl rdx, 32", "or rax, rdx", save(1),
                    debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler, before_launch=before))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == ExitReason.VMCALL        # neither WRMSR nor RDMSR exited
    assert result(machine, 1) == GUEST_LSTAR              # the guest's WRMSR reached the LP's LSTAR
    assert guest.read_u64(GUEST_DATA) == ROOT_KERNEL_GS_BASE


def test_msr_bitmap_bit_set_makes_the_access_exit():
    machine = Machine()
    guest = msr_bitmap_guest(machine, intercept_lstar_write=True)
    handler = lines("vm_exit:", "mov r12, rcx", vmread("rbx", "VM_EXIT_REASON"), "mov rax, rbx", save(0),
                    "mov rax, r12", save(1),
                    debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == ExitReason.WRMSR
    assert result(machine, 1) & 0xFFFF_FFFF == msrs.IA32_LSTAR


@pytest.mark.parametrize("index,value", [
    (msrs.IA32_LSTAR, 0x0000_8000_0000_0000),       # not canonical
    (msrs.IA32_KERNEL_GS_BASE, 0x1234_0000_0000_0000),
    (msrs.IA32_FMASK, 1 << 32),                      # bits 63:32 reserved
    (msrs.IA32_TSC_AUX, 1 << 40),
    (msrs.IA32_PAT, 0x0007_0406_0007_0402),          # type 2 is reserved
])
def test_wrmsr_refuses_what_a_processor_refuses(index, value):
    machine = Machine()
    program = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.GP, "fault_13"),
                    f"mov ecx, {index:#x}", mov_imm("rax", value & 0xFFFF_FFFF), mov_imm("rdx", value >> 32),
                    "wrmsr", debug_exit(EXIT_OK), fault_recorder(ExceptionVector.GP, True))
    run = run_root(machine, program)
    assert run.stop.exit_status == exit_status(EXIT_FAULT), run.stop.report
    assert result(machine, SLOT_FAULT_VECTOR) == ExceptionVector.GP
    assert result(machine, SLOT_FAULT_ERROR_CODE) == 0


def test_tsc_aux_is_writable_and_rdtscp_returns_it():
    machine = Machine(lps=1)
    program = lines(f"mov ecx, {msrs.IA32_TSC_AUX:#x}", "rdmsr", save(0),
                    "mov eax, 0x5A5A", "xor edx, edx", "wrmsr", "rdtscp", "mov rax, rcx", save(1),
                    debug_exit(EXIT_OK))
    run = run_root(machine, program)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == 0               # LP 0's index
    assert result(machine, 1) == 0x5A5A


def test_exit_msr_store_and_load_lists():
    """SDM Vol. 3C 28.4, 28.6: the guest's LSTAR is stored at the exit, root's STAR loaded after it."""
    machine = Machine()
    store_list, load_list = 0x3E0000, 0x3E1000
    root_star = 0x0023_0010_0000_0000
    machine.ram.write(store_list, struct.pack("<IIQ", msrs.IA32_LSTAR, 0, 0))
    machine.ram.write(load_list, struct.pack("<IIQ", msrs.IA32_STAR, 0, root_star))
    guest = build_guest(machine, lines(f"mov ecx, {msrs.IA32_LSTAR:#x}", "vmcall"),
                        fields={"VM_EXIT_MSR_STORE_COUNT": 1, "VM_EXIT_MSR_STORE_ADDR": store_list,
                                "VM_EXIT_MSR_LOAD_COUNT": 1, "VM_EXIT_MSR_LOAD_ADDR": load_list})
    before = lines(f"mov ecx, {msrs.IA32_LSTAR:#x}", mov_imm("rax", GUEST_LSTAR & 0xFFFF_FFFF),
                   mov_imm("rdx", GUEST_LSTAR >> 32), "wrmsr")
    handler = lines("vm_exit:", f"mov ecx, {msrs.IA32_STAR:#x}", "rdmsr", "shl rdx, 32", "or rax, rdx",
                    save(0), debug_exit(EXIT_OK))
    run = run_root(machine, vmx_program(guest, handler, before_launch=before))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert struct.unpack("<IIQ", machine.ram.read(store_list, 16))[2] == GUEST_LSTAR
    assert result(machine, 0) == root_star


def test_snapshot_restores_which_instance_holds_the_shared_state():
    machine = Machine()
    guest = build_guest(machine, GUEST_SETS_AND_READS)
    program = vmx_program(guest, ROOT_EXIT_HANDLER)
    first = run_root(machine, program, max_instructions=200)
    snapshot = machine.snapshot()
    finished = machine.run()
    outcome = (finished.stop.exit_status, [result(machine, slot) for slot in range(4)],
               guest.read_u64(GUEST_DATA + 8), guest.read_u64(GUEST_DATA + 16))
    machine.restore(snapshot)
    again = machine.run()
    assert first.stop is None or first.stop.reason == "instruction-limit"
    assert (again.stop.exit_status, [result(machine, slot) for slot in range(4)],
            guest.read_u64(GUEST_DATA + 8), guest.read_u64(GUEST_DATA + 16)) == outcome
    assert outcome[0] == exit_status(EXIT_OK)


@pytest.mark.parametrize("value,faults", [(0xD01, False), (0x401, True), (0xD00 | (1 << 20), True)])
def test_wrmsr_to_efer_keeps_long_mode(value, faults):
    """SCE and NXE may change; LME may not while paging is on, reserved bits never (SDM Vol. 3A 9.8.5)."""
    machine = Machine()
    program = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.GP, "fault_13"),
                    "mov ecx, 0xC0000080", mov_imm("rax", value), "xor edx, edx", "wrmsr", "rdmsr", save(0),
                    debug_exit(EXIT_OK), fault_recorder(ExceptionVector.GP, True))
    run = run_root(machine, program)
    assert run.stop.exit_status == exit_status(EXIT_FAULT if faults else EXIT_OK), run.stop.report
    if not faults:
        assert result(machine, 0) == 0xD01
