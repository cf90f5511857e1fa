"""What the machine does for a trapped instruction that causes no VM exit: the functions emu/traps.py names as each row's emulation.

Each takes the logical processor, the context that executed the instruction and the decoded
instruction; it carries the instruction out and retires it (RIP past it, one instruction counted),
or raises RaiseException, leaving RIP at the instruction. The LP provides `now`, `publish`,
`charge`, `guest`, `io` (the I/O bus) and, through its `host`, the machine's random generator.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from emu import decode, msrs
from emu.instruction_fault import RaiseException
from emu.vmx_defs import MSR_IA32_EFER, RFLAGS_ARITHMETIC, U32_MASK as U32, ExceptionVector, Rflags

if TYPE_CHECKING:
    from emu.context import ExecutionContext
    from emu.lp import LogicalProcessor

BITS_PER_BYTE = 8
HIGH_HALF_SHIFT = 32


def retire(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """The instruction completed: RIP past it, and it counts as one instruction."""
    context.set_reg(x86.UC_X86_REG_RIP, insn.address + insn.size)
    lp.charge(context, 1)


def read_msr(now: int, context: "ExecutionContext", index: int) -> int:
    """RDMSR of `index` in a context (docs/machine.md 5.5); RaiseException(#GP) if unsupported."""
    if index in msrs.VMX_CAPABILITY_MSRS:
        return msrs.VMX_CAPABILITY_MSRS[index]
    if index == msrs.IA32_FEATURE_CONTROL:
        return msrs.FEATURE_CONTROL_LOCKED_VMX
    if index == msrs.IA32_TSC:
        return now
    if index in msrs.NATIVE_MSRS:
        return context.read_msr(index)
    raise RaiseException(ExceptionVector.GP, 0)


def rdmsr(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """EDX:EAX = the MSR of ECX (SDM Vol. 2B RDMSR)."""
    regs = context.regs        # the fast register path; only 64-bit registers are read through it
    value = read_msr(lp.now, context, regs.read(x86.UC_X86_REG_RCX) & U32)
    regs.write(x86.UC_X86_REG_RAX, value & U32)
    regs.write(x86.UC_X86_REG_RDX, value >> HIGH_HALF_SHIFT)
    retire(lp, context, insn)


def wrmsr(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """The MSR of ECX = EDX:EAX, or #GP(0) for an MSR or value it refuses (SDM Vol. 2B WRMSR)."""
    regs = context.regs
    index = regs.read(x86.UC_X86_REG_RCX) & U32
    value = (regs.read(x86.UC_X86_REG_RDX) & U32) << HIGH_HALF_SHIFT | (regs.read(x86.UC_X86_REG_RAX) & U32)
    if index not in msrs.NATIVE_MSRS or not msrs.write_is_valid(index, value):
        raise RaiseException(ExceptionVector.GP, 0)
    if index == MSR_IA32_EFER:
        value = msrs.efer_write(context.read_msr(index), value)
        if value is None:
            raise RaiseException(ExceptionVector.GP, 0)
    context.write_msr(index, value)
    retire(lp, context, insn)


def rdtsc(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """RDTSC and RDTSCP: EDX:EAX = the LP's `now`; RDTSCP also ECX = IA32_TSC_AUX (SDM Vol. 2B)."""
    regs = context.regs
    tsc = lp.now
    regs.write(x86.UC_X86_REG_RAX, tsc & U32)
    regs.write(x86.UC_X86_REG_RDX, tsc >> HIGH_HALF_SHIFT)
    if insn.mnemonic == "rdtscp":
        regs.write(x86.UC_X86_REG_RCX, context.read_msr(msrs.IA32_TSC_AUX))
    retire(lp, context, insn)


def rdrand(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """RDRAND and RDSEED: the machine's next random value, truncated to the destination; CF = 1 and
    the other arithmetic flags 0 (SDM Vol. 2B RDRAND). They never fail."""
    regs = context.regs
    register = decode.operands(insn)[0]
    value = lp.host.next_random() & ((1 << (BITS_PER_BYTE * register.size)) - 1)
    if register.size == decode.DWORD_SIZE:   # a 32-bit destination zero-extends (SDM Vol. 1 3.4.1.1)
        regs.write(decode.QWORD_REGISTER_OF_DWORD[register.register], value)
    else:
        regs.write(register.register, value)
    regs.write(x86.UC_X86_REG_RFLAGS, (regs.read(x86.UC_X86_REG_RFLAGS) & ~RFLAGS_ARITHMETIC) | Rflags.CF)
    retire(lp, context, insn)


def mov_to_cr3(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """CR3 = the source register (no check of reserved bits); publishes a `cr3-write` event."""
    regs = context.regs
    value = regs.read(decode.operands(insn)[1].register)
    old = regs.read(x86.UC_X86_REG_CR3)
    regs.write(x86.UC_X86_REG_CR3, value)
    lp.publish("cr3-write", old=old, new=value, rip=insn.address, context=context.name)
    retire(lp, context, insn)


def mov_from_cr3(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """The destination register = CR3."""
    regs = context.regs
    regs.write(decode.operands(insn)[0].register, regs.read(x86.UC_X86_REG_CR3))
    retire(lp, context, insn)


def port_io(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """IN and OUT reach the machine's devices (docs/machine.md 6); string I/O is not emulated and
    raises #GP(0) (docs/machine.md 7.8.3)."""
    access = decode.port_access(insn, context.reg)
    if access.string:
        raise RaiseException(ExceptionVector.GP, 0)
    io = lp.io
    if access.is_in:
        context.set_reg(access.data_register, io.read(access.port, access.size))
    else:
        io.write(access.port, access.size,
                 context.reg(access.data_register) & ((1 << (BITS_PER_BYTE * access.size)) - 1))
    retire(lp, context, insn)


def halt(lp: "LogicalProcessor", context: "ExecutionContext", insn: decode.Instruction) -> None:
    """HLT in a guest without "HLT exiting": the guest enters the HLT activity state with RIP past the
    HLT, until an interrupt or a VM exit (docs/machine.md 7.11). It retires no instruction."""
    context.set_reg(x86.UC_X86_REG_RIP, insn.address + insn.size)
    lp.guest.halted = True
