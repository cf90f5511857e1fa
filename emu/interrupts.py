"""Delivery of interrupts and exceptions through a 64-bit IDT (SDM Vol. 3A 6.14), for root and guest contexts."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import x86_const as x86

from emu import fast
from emu.vmx_defs import U64_MASK as U64, ExceptionVector, Rflags

IDT_GATE_SIZE = 16
GATE_TYPE_INTERRUPT = 0xE
GATE_TYPE_TRAP = 0xF
GATE_TYPE_MASK = 0xF
GATE_PRESENT = 0x80
GATE_IST_MASK = 0x7
TSS_IST_OFFSET = 0x24          # IST1 at TSS+0x24, eight bytes each (SDM Vol. 3A Figure 8-11)
IST_SLOT_SIZE = 8
STACK_ALIGNMENT_MASK = ~0xF    # 64-bit delivery aligns RSP to 16 bytes (SDM 6.14.2)

# Error code for a fault on an IDT entry: IDT bit (1) set, index in bits 15:3 (SDM 6.13).
IDT_ERROR_CODE_FLAG = 0x2
SELECTOR_INDEX_SHIFT = 3


@dataclass
class DeliveryFault(Exception):
    """Delivery itself faulted: the vector and error code of the new exception, or an EPT fault."""

    vector: int
    error_code: int = 0
    translation: fast.Fault | None = None


def _idt_error_code(vector: int) -> int:
    return (vector << SELECTOR_INDEX_SHIFT) | IDT_ERROR_CODE_FLAG


def _check_translation(fault: fast.Fault | None, cr2_sink: list[int]) -> None:
    if fault is None:
        return
    if fault.kind == fast.FAULT_PAGE_FAULT:
        cr2_sink.append(fault.linear)
        raise DeliveryFault(ExceptionVector.PF, fault.page_fault_error_code, fault)
    raise DeliveryFault(ExceptionVector.GP if fault.kind == fast.FAULT_NONEXISTENT_MEMORY else -1, 0, fault)


def _read(context, linear: int, length: int, cr2_sink: list[int]) -> bytes:
    data, fault = context.read_linear_checked(linear, length)
    _check_translation(fault, cr2_sink)
    return data


def deliver(context, vector: int, error_code: int | None, return_rip: int, cr2_sink: list[int]) -> int:
    """Pushes the interrupt frame and enters the handler; returns the handler's RIP.

    Raises DeliveryFault when reading the gate or writing the frame faults (the caller turns that
    into a double fault, a triple fault, or for a guest an EPT-violation VM exit).
    """
    uc = context.uc
    _selector, idt_base, idt_limit, _flags = uc.reg_read(x86.UC_X86_REG_IDTR)
    gate_offset = vector * IDT_GATE_SIZE
    if gate_offset + IDT_GATE_SIZE - 1 > idt_limit:
        raise DeliveryFault(ExceptionVector.GP, _idt_error_code(vector))
    low, high = struct.unpack("<QQ", _read(context, idt_base + gate_offset, IDT_GATE_SIZE, cr2_sink))
    attributes = (low >> 40) & 0xFF
    gate_type = attributes & GATE_TYPE_MASK
    if not attributes & GATE_PRESENT or gate_type not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP):
        raise DeliveryFault(ExceptionVector.NP if gate_type in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP)
                            else ExceptionVector.GP, _idt_error_code(vector))
    target = (low & 0xFFFF) | (((low >> 48) & 0xFFFF) << 16) | ((high & 0xFFFF_FFFF) << 32)
    code_selector = (low >> 16) & 0xFFFF
    ist = (low >> 32) & GATE_IST_MASK
    rsp = uc.reg_read(x86.UC_X86_REG_RSP)
    if ist:
        _tr_selector, tss_base, _tr_limit, _tr_flags = uc.reg_read(x86.UC_X86_REG_TR)
        ist_slot = tss_base + TSS_IST_OFFSET + IST_SLOT_SIZE * (ist - 1)
        rsp = struct.unpack("<Q", _read(context, ist_slot, IST_SLOT_SIZE, cr2_sink))[0]
    rsp &= STACK_ALIGNMENT_MASK & U64
    rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    frame = [uc.reg_read(x86.UC_X86_REG_SS), uc.reg_read(x86.UC_X86_REG_RSP), rflags,
             uc.reg_read(x86.UC_X86_REG_CS), return_rip]
    if error_code is not None:
        frame.append(error_code)
    new_rsp = (rsp - 8 * len(frame)) & U64
    # The frame in memory, lowest address first: [error code,] RIP, CS, RFLAGS, RSP, SS.
    data = b"".join(struct.pack("<Q", value & U64) for value in reversed(frame))
    fault = context.write_linear(new_rsp, data)
    _check_translation(fault, cr2_sink)
    rflags &= ~(Rflags.TF | Rflags.NT | Rflags.RF | Rflags.VM)
    if gate_type == GATE_TYPE_INTERRUPT:
        rflags &= ~Rflags.IF
    uc.reg_write(x86.UC_X86_REG_RSP, new_rsp)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags)
    if code_selector != frame[3]:
        uc.reg_write(x86.UC_X86_REG_CS, code_selector)
    uc.reg_write(x86.UC_X86_REG_RIP, target)
    return target
