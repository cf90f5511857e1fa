"""Determinism: the same program on two LPs with timer interrupts, IPIs and a guest gives the same events twice."""
from __future__ import annotations

from emu.machine import Machine
from emu.vmx_defs import ExitControls, ExitReason, PinBasedControls
from tests.machine_programs import (
    EXIT_LOG_FULL, EXIT_OK, IPI_DESTINATION_SHIFT, IPI_PORT, ROOT_IDT, TIMER_ARM_PORT, TIMER_PERIOD_PORT,
    TIMER_VECTOR_PORT, build_guest, debug_exit, default_controls, exit_log, exit_logger, exit_status, lines,
    putc, run_root, set_interrupt_gate, vmx_program,
)

LP0_TICK, LP1_TICK, IPI_VECTOR = 0x41, 0x42, 0x43
LP0_PERIOD, LP1_PERIOD = 700, 1100
TICKS_BEFORE_STOP = 20
GUEST_CALL_EVERY = 300                   # guest loop iterations between VMCALLs
QUANTUM = 400                            # ticks per LP turn: small, so the two LPs interleave finely


def arm_periodic_timer(vector: int, period: int) -> str:
    return lines(f"mov dx, {TIMER_VECTOR_PORT:#x}", f"mov eax, {vector:#x}", "out dx, eax",
                 f"mov dx, {TIMER_PERIOD_PORT:#x}", f"mov eax, {period}", "out dx, eax",
                 f"mov dx, {TIMER_ARM_PORT:#x}", f"mov eax, {period}", "out dx, eax")


def root_timers_program() -> str:
    """LP 0 counts its own ticks and stops the machine; LP 1 ticks and sends LP 0 an IPI each tick."""
    return lines(
        set_interrupt_gate(ROOT_IDT, LP0_TICK, "lp0_tick"), set_interrupt_gate(ROOT_IDT, LP1_TICK, "lp1_tick"),
        set_interrupt_gate(ROOT_IDT, IPI_VECTOR, "lp0_ipi"),
        "xor r13, r13", "xor r14, r14",
        "test rdi, rdi", "jnz lp1",
        arm_periodic_timer(LP0_TICK, LP0_PERIOD), "sti",
        "lp0_work:", "inc r14", "imul r15, r14, 7", f"cmp r13, {TICKS_BEFORE_STOP}", "jb lp0_work",
        debug_exit(EXIT_OK),
        "lp1:", arm_periodic_timer(LP1_TICK, LP1_PERIOD), "sti",
        "lp1_work:", "inc r14", "jmp lp1_work",
        "lp0_tick:", "push rax", "push rdx", putc("a"), "inc r13", "pop rdx", "pop rax", "iretq",
        "lp0_ipi:", "push rax", "push rdx", putc("i"), "pop rdx", "pop rax", "iretq",
        "lp1_tick:", "push rax", "push rdx", putc("b"), f"mov dx, {IPI_PORT:#x}",
        f"mov eax, {0 << IPI_DESTINATION_SHIFT | IPI_VECTOR:#x}", "out dx, eax", "pop rdx", "pop rax", "iretq")


def run_twice(build) -> list[Machine]:
    machines = []
    for _ in range(2):
        machine = Machine(lps=2, quantum=QUANTUM, record_events=True)
        machine.run_result = build(machine)
        machines.append(machine)
    return machines


def assert_same(first: Machine, second: Machine) -> None:
    assert [e.as_tuple() for e in first.events.events] == [e.as_tuple() for e in second.events.events]
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


def guest_and_timer_program(machine: Machine) -> str:
    """LP 0 runs a guest that exits on each external interrupt and now and then with VMCALL; LP 1 sends
    LP 0 an IPI on each of its timer ticks. The run ends when LP 0's exit log is full."""
    guest_code = lines("xor ebx, ebx", "work:", "inc rbx", "mov rax, rbx", "xor edx, edx",
                       f"mov ecx, {GUEST_CALL_EVERY}", "div rcx", "test rdx, rdx", "jnz work", "vmcall", "jmp work")
    guest = build_guest(machine, guest_code,
                        controls=default_controls(pin=PinBasedControls.EXTERNAL_INTERRUPT_EXITING,
                                                  exit=ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT))
    lp1 = lines("lp1:", set_interrupt_gate(ROOT_IDT, LP1_TICK, "lp1_tick"), arm_periodic_timer(LP1_TICK, LP1_PERIOD),
                "sti", "lp1_work:", "pause", "jmp lp1_work",
                "lp1_tick:", putc("b"), f"mov dx, {IPI_PORT:#x}", f"mov eax, {IPI_VECTOR:#x}", "out dx, eax", "iretq")
    return lines("test rdi, rdi", "jnz lp1", vmx_program(guest, exit_logger()), lp1)


def test_guest_with_interrupt_exits_runs_the_same_twice():
    def build(machine: Machine):
        return run_root(machine, guest_and_timer_program(machine))

    first, second = run_twice(build)
    assert first.run_result.stop.exit_status == exit_status(EXIT_LOG_FULL), first.run_result.stop.report
    assert_same(first, second)
    reasons = [record.reason for record in exit_log(first)]
    assert exit_log(first) == exit_log(second)
    assert ExitReason.EXTERNAL_INTERRUPT in reasons and ExitReason.VMCALL in reasons
