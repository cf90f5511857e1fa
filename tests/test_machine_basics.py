"""Root-mode basics: firmware hand-off, IPIs between LPs, #PF and triple fault, MSRs, virtual time, CR3 events.

Each test runs a root program and checks what it observed (result slots, console, exit status) or what
the machine reported (run result, stop report, events).
"""
from __future__ import annotations

import pytest

from emu.machine import FIRMWARE_PML4, Machine
from emu.vmx_caps import msr_values
from emu.vmx_defs import RFLAGS_ARITHMETIC, ExceptionVector
from tests.machine_programs import (
    CLOCK_HIGH_PORT, CLOCK_LOW_PORT, COM1, EXIT_FAULT, EXIT_OK, PAGE_SHIFT, PAGE_SIZE, QWORD, RESULTS, RFLAGS_CF,
    RFLAGS_ZF, ROOT_IDT, ROOT_IDT_LIMIT, ROOT_STACK_SIZE, ROOT_STACK_TOP, SCRATCH, SLOT_FAULT_CR2,
    SLOT_FAULT_ERROR_CODE, SLOT_FAULT_RIP, SLOT_FAULT_VECTOR, VMXON_REGION, arm_timer, debug_exit, events_of,
    exit_status, fault_recorder, label_address, lines, putc, result, results, run_root, save, save_flags,
    send_ipi, set_interrupt_gate, U64,
)

UNMAPPED = 0x80_0000_0238               # PML4 entry 1 of the firmware's page tables is not present
PAGE_FAULT_WRITE = 1 << 1
IPI_VECTOR = 0x50
TICK_VECTOR = 0x41
TICK_PERIOD = 1000
TICKS_WANTED = 5
ARRIVED_COUNTER = SCRATCH
IA32_FEATURE_CONTROL = 0x3A
FEATURE_CONTROL_LOCKED_VMX_OUTSIDE_SMX = 0x5
UNKNOWN_MSR = 0x1234_5678
NEW_PML4 = SCRATCH + 0x2000
INSTRUCTIONS_FROM_RDTSC_TO_RDTSC = 3      # rdtsc, mov, mov, then the second rdtsc reads
CLOCK_READ_SLACK = 20                    # the clock port is read in mid-block: a few ticks ahead
SLOT_PER_LP = 16                         # result slots: LP n uses n * SLOT_PER_LP onwards


def machine_with(lps: int) -> Machine:
    return Machine(lps=lps, record_events=True)


def per_lp_slot(offset: int) -> str:
    """rax = address of this LP's result slot `offset` (LP index in rdi)."""
    return lines("mov rax, rdi", f"imul rax, rax, {SLOT_PER_LP * QWORD}", f"add rax, {RESULTS + offset * QWORD:#x}")


@pytest.mark.parametrize("lps", [2, 4])
def test_start_hands_each_lp_its_index_stack_and_argument(lps):
    machine = machine_with(lps)
    argument = 0xA5A5_0000_1234
    body = lines(per_lp_slot(0), "mov [rax], rdi", "mov [rax + 8], rsi", "mov [rax + 16], rsp",
                 f"mov rbx, {ARRIVED_COUNTER:#x}", "lock inc qword ptr [rbx]",
                 "test rdi, rdi", "jnz rest",
                 "wait_all:", "pause", f"cmp qword ptr [rbx], {lps}", "jne wait_all", debug_exit(EXIT_OK),
                 "rest:", "cli", "hlt", "jmp rest")
    run = run_root(machine, body, argument=argument)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    for lp in range(lps):
        index, rsi, rsp = results(machine, 3, lp * SLOT_PER_LP)
        assert (index, rsi, rsp) == (lp, argument, ROOT_STACK_TOP - lp * ROOT_STACK_SIZE)


def test_two_lps_exchange_ipis_through_their_own_idts():
    machine = machine_with(2)
    # Each LP loads its own IDT page, ROOT_IDT + index * PAGE_SIZE, through a 10-byte descriptor on the stack.
    own_idt = lines("mov r12, rdi", f"shl r12, {PAGE_SHIFT}", f"add r12, {ROOT_IDT:#x}",
                    "sub rsp, 16", f"mov word ptr [rsp], {ROOT_IDT_LIMIT:#x}", "mov [rsp + 2], r12", "lidt [rsp]",
                    "add rsp, 16")
    body = lines(own_idt,
                 "test rdi, rdi", "jnz lp1",
                 set_interrupt_gate("r12", IPI_VECTOR, "lp0_handler"), "sti", send_ipi(IPI_VECTOR, destination=1),
                 "lp0_wait:", "hlt", "jmp lp0_wait",
                 "lp1:", set_interrupt_gate("r12", IPI_VECTOR, "lp1_handler"), "sti",
                 "lp1_wait:", "hlt", "jmp lp1_wait",
                 "lp0_handler:", putc("A"), debug_exit(EXIT_OK),
                 "lp1_handler:", putc("B"), send_ipi(IPI_VECTOR, destination=0), "iretq")
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert machine.io.console.text() == "BA"
    assert [(e.lp, e.data["to"], e.data["vector"]) for e in events_of(machine, "ipi")] == \
        [(0, 1, IPI_VECTOR), (1, 0, IPI_VECTOR)]
    assert [(e.lp, e.data["vector"]) for e in events_of(machine, "interrupt")] == [(1, IPI_VECTOR), (0, IPI_VECTOR)]


def test_periodic_timer_interrupts_in_root(machine):
    body = lines(set_interrupt_gate(ROOT_IDT, TICK_VECTOR, "tick"), "xor r13, r13",
                 arm_timer(TICK_VECTOR, TICK_PERIOD, periodic=True),
                 "sti", "spin:", f"cmp r13, {TICKS_WANTED}", "jb spin", save(0, "r13"), debug_exit(EXIT_OK),
                 "tick:", "inc r13", "iretq")
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == TICKS_WANTED
    times = [e.time for e in events_of(machine, "interrupt")]
    assert len(times) == TICKS_WANTED
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(abs(gap - TICK_PERIOD) <= 4 for gap in gaps), gaps


@pytest.mark.parametrize("access, error_code", [("mov rbx, [rax]", 0), ("mov [rax], rbx", PAGE_FAULT_WRITE)])
def test_page_fault_delivered_through_root_idt(machine, access, error_code):
    body = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.PF, "fault_14"), f"mov rax, {UNMAPPED:#x}",
                 "faulting:", access, debug_exit(EXIT_OK), fault_recorder(ExceptionVector.PF, True))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_FAULT), run.stop.report
    assert result(machine, SLOT_FAULT_VECTOR) == ExceptionVector.PF
    assert result(machine, SLOT_FAULT_RIP) == label_address(body, "faulting")
    assert result(machine, SLOT_FAULT_ERROR_CODE) == error_code
    assert result(machine, SLOT_FAULT_CR2) == UNMAPPED
    (event,) = events_of(machine, "page-fault")
    assert event.data["address"] == UNMAPPED


def test_triple_fault_stops_the_machine_with_a_report():
    machine = machine_with(2)
    body = lines("test rdi, rdi", "jnz lp1", "lp0_spin:", "pause", "jmp lp0_spin",
                 "lp1:", f"mov rax, {UNMAPPED:#x}", "faulting:", "mov rbx, [rax]", debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.reason == "triple-fault"
    assert run.stop.lp == 1
    rip = label_address(body, "faulting")
    assert f"LP 1  RIP {rip:#x}  CR2 {UNMAPPED:#x}" in run.stop.report
    assert [e.data["vector"] for e in events_of(machine, "delivery-fault")] == [ExceptionVector.PF,
                                                                                ExceptionVector.DF]


def test_rdmsr_reports_vmx_capabilities(machine):
    indices = sorted(msr_values()) + [IA32_FEATURE_CONTROL]
    reads = [lines(f"mov ecx, {index:#x}", "rdmsr", "shl rdx, 32", "or rax, rdx", save(slot))
             for slot, index in enumerate(indices)]
    run = run_root(machine, lines(*reads, debug_exit(EXIT_OK)))
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    expected = {**msr_values(), IA32_FEATURE_CONTROL: FEATURE_CONTROL_LOCKED_VMX_OUTSIDE_SMX}
    assert dict(zip(indices, results(machine, len(indices)))) == expected


IA32_VMX_BASIC = 0x480
VMX_BASIC_REGION_SIZE_SHIFT, VMX_BASIC_REGION_SIZE_MASK = 32, 0x1FFF          # SDM Vol. 3D A.1
VMX_BASIC_MEMORY_TYPE_SHIFT, VMX_BASIC_MEMORY_TYPE_MASK = 50, 0xF
VMX_BASIC_TRUE_CONTROLS_BIT = 55
WRITE_BACK = 6
CR4_VMXE_BIT = 13


def test_vmxon_region_built_from_ia32_vmx_basic(machine):
    """What a hypervisor does: revision identifier from IA32_VMX_BASIC[30:0] into the VMXON region."""
    body = lines(f"mov ecx, {IA32_VMX_BASIC:#x}", "rdmsr", "shl rdx, 32", "or rax, rdx", save(0),
                 f"mov rbx, {VMXON_REGION:#x}", "mov dword ptr [rbx], eax",
                 "mov rax, cr4", f"bts rax, {CR4_VMXE_BIT}", "mov cr4, rax", "push rbx", "vmxon [rsp]", "pop rbx",
                 "pushfq", "pop rax", save(1), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    basic, flags = results(machine, 2)
    assert flags & (RFLAGS_CF | RFLAGS_ZF) == 0, "VMXON with the reported revision identifier must succeed"
    assert basic >> VMX_BASIC_REGION_SIZE_SHIFT & VMX_BASIC_REGION_SIZE_MASK == PAGE_SIZE
    assert basic >> VMX_BASIC_MEMORY_TYPE_SHIFT & VMX_BASIC_MEMORY_TYPE_MASK == WRITE_BACK
    assert basic >> VMX_BASIC_TRUE_CONTROLS_BIT & 1
    assert [e.data["ok"] for e in events_of(machine, "vmxon")] == [True]


def test_rdmsr_of_an_unknown_msr_raises_general_protection(machine):
    body = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.GP, "fault_13"), f"mov ecx, {UNKNOWN_MSR:#x}",
                 "faulting:", "rdmsr", debug_exit(EXIT_OK), fault_recorder(ExceptionVector.GP, True))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_FAULT)
    assert result(machine, SLOT_FAULT_VECTOR) == ExceptionVector.GP
    assert result(machine, SLOT_FAULT_RIP) == label_address(body, "faulting")


def time_program(loop_count: int) -> str:
    """RDTSC, a loop of two instructions per iteration, RDTSC, the clock port, and RDTSC back to back."""
    read_tsc = lines("rdtsc", "shl rdx, 32", "or rax, rdx")
    return lines(read_tsc, save(0),
                 f"mov rcx, {loop_count}", "delay:", "dec rcx", "jnz delay",
                 read_tsc, save(1),
                 f"mov dx, {CLOCK_LOW_PORT:#x}", "in eax, dx", "mov ebx, eax", f"mov dx, {CLOCK_HIGH_PORT:#x}",
                 "in eax, dx", "shl rax, 32",
                 "or rax, rbx", save(2),
                 "rdtsc", "mov r8, rax", "mov r9, rdx", "rdtsc", "sub rax, r8", save(3),
                 debug_exit(EXIT_OK))


def test_rdtsc_and_clock_port_count_virtual_time():
    short, long_ = 1000, 3000
    observed = {}
    for loops in (short, long_, short):
        machine = machine_with(1)
        run = run_root(machine, time_program(loops))
        assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
        tsc_before, tsc_after, clock, back_to_back = results(machine, 4)
        assert back_to_back == INSTRUCTIONS_FROM_RDTSC_TO_RDTSC, "RDTSC advances one tick per instruction"
        assert 0 < clock - tsc_after < CLOCK_READ_SLACK
        assert clock <= run.virtual_time
        if loops in observed:
            assert observed[loops] == (tsc_before, tsc_after, clock), "virtual time is the same on every run"
        observed[loops] = (tsc_before, tsc_after, clock)
    elapsed = {loops: after - before for loops, (before, after, _clock) in observed.items()}
    assert elapsed[long_] - elapsed[short] == 2 * (long_ - short)


def test_mov_to_cr3_is_an_event(machine):
    body = lines("mov rax, cr3", f"mov rbx, {NEW_PML4:#x}", "mov rcx, [rax]", "mov [rbx], rcx",
                 "to_new: mov cr3, rbx", f"mov rdx, {RESULTS:#x}", "mov qword ptr [rdx], 0x77",
                 "to_old: mov cr3, rax", "mov rdx, cr3", save(1, "rdx"), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert results(machine, 2) == [0x77, FIRMWARE_PML4]
    writes = [(e.data["old"], e.data["new"], e.data["rip"]) for e in events_of(machine, "cr3-write")]
    assert writes == [(FIRMWARE_PML4, NEW_PML4, label_address(body, "to_new")),
                      (NEW_PML4, FIRMWARE_PML4, label_address(body, "to_old"))]


def test_rdrand_rdseed_and_rdtscp_are_the_machine_s():
    """RDRAND and RDSEED draw from the machine's deterministic sequence with CF = 1 and the other
    status flags clear; a 32-bit destination zero-extends, a 16-bit one keeps the rest (SDM Vol. 1
    3.4.1.1); RDTSCP's ECX is the LP index."""
    body = lines("mov rax, -1", "rdrand rax", save(0), save_flags(1),
                 "mov rbx, -1", "rdrand ebx", save(2, "rbx"),
                 "mov rcx, -1", "rdrand cx", save(3, "rcx"),
                 "mov rdx, -1", "rdseed rdx", save(4, "rdx"),
                 "mov rcx, -1", "rdtscp", save(5, "rcx"), debug_exit(EXIT_OK))
    runs = []
    for _ in range(2):
        machine = machine_with(1)
        run = run_root(machine, body)
        assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
        runs.append(results(machine, 6))
    assert runs[0] == runs[1], "the sequence is the same on every run"
    rax, flags, rbx, rcx, rdx, lp_index = runs[0]
    assert len({rax, rdx}) == 2 and rax not in (0, U64)
    assert flags & RFLAGS_ARITHMETIC == RFLAGS_CF
    assert rbx >> 32 == 0
    assert rcx >> 16 == U64 >> 16
    assert lp_index == 0


def test_debug_exit_stops_right_after_the_out(machine):
    body = lines("mov al, 0x10", "out 0xf4, al", "mov rax, 1", save(0), "hlt")
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK)
    assert result(machine, 0) == 0


class PortHandlerFailed(RuntimeError):
    """Raised by the test's subscriber while the machine handles an OUT."""


@pytest.mark.parametrize("access", ["out", "in"])
def test_an_exception_while_a_port_access_is_handled_ends_the_run_and_reaches_the_caller(access):
    # The IN and OUT hooks are cffi callbacks (emu/fast.py add_io_hooks): an exception raised in them
    # cannot cross Unicorn's C frames; it is kept, the run stops (at the end of the block, as Unicorn's
    # emu_stop does), and the machine's caller gets it.
    machine = machine_with(1)
    kind = "io-out" if access == "out" else "io-in"

    def fail(event):
        raise PortHandlerFailed(f"{event.kind} {event.data['port']:#x}")

    machine.events.subscribe(fail, frozenset({kind}))
    body = lines(putc("A") if access == "out" else lines(f"mov dx, {CLOCK_LOW_PORT:#x}", "in eax, dx"),
                 debug_exit(EXIT_OK))
    port = COM1 if access == "out" else CLOCK_LOW_PORT
    with pytest.raises(PortHandlerFailed, match=f"{kind} {port:#x}"):
        run_root(machine, body)
