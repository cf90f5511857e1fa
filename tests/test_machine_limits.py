"""The machine's stops and limits: an idle machine stops, the instruction limit holds to a block, self-IPIs are
prompt, exception vectors are refused by devices, a non-canonical RIP raises #GP.

A regression in the idle tests would make the machine spin forever, so each test runs under an alarm.
"""
from __future__ import annotations

import pytest

from emu.machine import Machine
from emu.vmx_defs import ExceptionVector
from tests.machine_programs import (
    CLOCK_LOW_PORT, EXIT_FAULT, EXIT_OK, ROOT_IDT, SLOT_FAULT_RIP, SLOT_FAULT_VECTOR, TIMER_ARM_PORT,
    TIMER_VECTOR_PORT, debug_exit, exit_status, fault_recorder, lines, result, run_root, save, send_ipi,
    set_interrupt_gate, assemble, events_of, timeout,
)

ALARM_SECONDS = 60
SELF_IPI_VECTOR = 0x50
INSTRUCTION_LIMIT = 1000
LONGEST_LOOP_BLOCK = 2                   # `inc rax; jmp spin` is one block of two instructions
SELF_IPI_MOST_TICKS = 16                 # the IPI lands at the end of the sender's block
EXCEPTION_VECTOR_FOR_TIMER = ExceptionVector.NP
TIMER_DEVICE_VECTOR = 0x40
TIMER_TICKS = 100
SPIN_ITERATIONS = 10_000
NONCANONICAL_BELOW_END_OF_RUN = 0x7FFF_FFFF_FFFF_F000
NONCANONICAL_END_OF_RUN = 0x8000_0000_0000_0000
MOV_RAX_RBX = bytes([0x48, 0x89, 0xD8])      # as long as `mov cr3, rax` (0F 22 D8)


@pytest.fixture(autouse=True)
def alarm():
    with timeout(ALARM_SECONDS):
        yield


def test_halted_with_interrupts_off_and_a_vector_pending_stops_idle():
    machine = Machine(record_events=True)
    run = run_root(machine, lines("cli", send_ipi(SELF_IPI_VECTOR), "halt:", "hlt", "jmp halt"))
    assert run.stop.reason == "idle"
    assert machine.lps[0].pending_vectors == [SELF_IPI_VECTOR]


def test_halted_with_an_unread_doorbell_message_stops_idle():
    machine = Machine()
    machine.ring_doorbell([1, 2, 3])
    run = run_root(machine, lines("cli", "halt:", "hlt", "jmp halt"))
    assert run.stop.reason == "idle"


@pytest.mark.parametrize("lps", [1, 2])
def test_instruction_limit_holds_to_one_block(lps):
    machine = Machine(lps=lps)
    run = run_root(machine, lines("spin:", "inc rax", "jmp spin"), max_instructions=INSTRUCTION_LIMIT)
    assert run.stop.reason == "instruction-limit"
    assert INSTRUCTION_LIMIT <= run.instructions <= INSTRUCTION_LIMIT + LONGEST_LOOP_BLOCK


def test_self_ipi_is_taken_at_the_end_of_the_sending_block():
    machine = Machine()
    body = lines(set_interrupt_gate(ROOT_IDT, SELF_IPI_VECTOR, "handler"), "sti",
                 f"mov dx, {CLOCK_LOW_PORT:#x}", "in eax, dx", "mov r14, rax", send_ipi(SELF_IPI_VECTOR),
                 "spin:", "pause", "jmp spin",
                 "handler:", f"mov dx, {CLOCK_LOW_PORT:#x}", "in eax, dx", "sub rax, r14", save(0),
                 debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) <= SELF_IPI_MOST_TICKS


@pytest.mark.parametrize("vector, expected_exit", [(TIMER_DEVICE_VECTOR, EXIT_FAULT),
                                                    (EXCEPTION_VECTOR_FOR_TIMER, EXIT_OK)])
def test_timer_armed_mid_run_fires_on_time_and_refuses_exception_vectors(machine, vector, expected_exit):
    body = lines(set_interrupt_gate(ROOT_IDT, vector, "fired"),
                 f"mov dx, {TIMER_VECTOR_PORT:#x}", f"mov eax, {int(vector)}", "out dx, eax",
                 f"mov dx, {TIMER_ARM_PORT:#x}", f"mov eax, {TIMER_TICKS}", "out dx, eax", "sti",
                 f"mov rcx, {SPIN_ITERATIONS}", "spin:", "dec rcx", "jnz spin", debug_exit(EXIT_OK),
                 "fired:", "mov rax, rcx", save(0), debug_exit(EXIT_FAULT))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(expected_exit), run.stop.report
    if expected_exit == EXIT_FAULT:   # taken within a block of the deadline, long before the loop ends
        assert result(machine, 0) >= SPIN_ITERATIONS - TIMER_TICKS


@pytest.mark.parametrize("target", [NONCANONICAL_BELOW_END_OF_RUN, NONCANONICAL_END_OF_RUN])
def test_jump_to_a_noncanonical_address_raises_general_protection(machine, target):
    # Unicorn is told the page below the end-of-run address is host page 0: code there must never run.
    machine.load(0, assemble(debug_exit(EXIT_OK), 0))
    body = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.GP, "fault_13"), f"mov rax, {target:#x}",
                 "jmp rax", debug_exit(EXIT_OK), fault_recorder(ExceptionVector.GP, True))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_FAULT), run.stop.report
    assert result(machine, SLOT_FAULT_VECTOR) == ExceptionVector.GP
    assert result(machine, SLOT_FAULT_RIP) == target


def test_a_trap_point_whose_instruction_was_replaced_is_forgotten(machine):
    """`mov cr3, rax` at `patchable` is trapped once; the program then rewrites it into
    `mov rax, rbx` (same length), which must run as itself, not as a CR3 load."""
    replacement_value = 0x1234
    patch = [f"mov byte ptr [rdi + {offset}], {byte:#x}" for offset, byte in enumerate(MOV_RAX_RBX)]
    body = lines("mov rax, cr3", "call patchable", "lea rdi, [rip + patchable]", *patch,
                 f"mov rbx, {replacement_value:#x}", "call patchable", save(0), debug_exit(EXIT_OK),
                 "patchable:", "mov cr3, rax", "ret")
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, 0) == replacement_value
    assert len(events_of(machine, "cr3-write")) == 1
