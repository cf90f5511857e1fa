"""Whether a guest's trapped instruction causes a VM exit under its VMCS's controls, and the exit qualification it reports (SDM Vol. 3C 26.1, 28.2.1)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from emu import decode, fast, msrs, traps
from emu.traps import Decision, Trap
from emu.vmcs import IO_BITMAP_PORTS
from emu.vmx_defs import (
    CR_QUAL_ACCESS_TYPE_SHIFT, CR_QUAL_GPR_SHIFT, MSR_BITMAP_HIGH_FIRST, MSR_BITMAP_HIGH_PART, MSR_BITMAP_LOW_FIRST,
    MSR_BITMAP_LOW_PART, MSR_BITMAP_RANGE, MSR_BITMAP_WRITE_PARTS, CrAccessType, ExitReason, PinBasedControls,
    PrimaryProcessorControls, make_io_qualification,
)

if TYPE_CHECKING:
    from emu.memory import HostMemory
    from emu.vmcs import ActiveVmcs

BITS_PER_BYTE = 8
LAST_PORT = 0xFFFF
CR3_NUMBER = 3
# The VMCS field that holds each kind of VM-execution control (SDM Vol. 3C 25.6.1, 25.6.2).
CONTROL_FIELDS = {PinBasedControls: "PIN_BASED_VM_EXEC_CONTROL", PrimaryProcessorControls: "CPU_BASED_VM_EXEC_CONTROL"}
PRIMARY_CONTROLS_FIELD = CONTROL_FIELDS[PrimaryProcessorControls]


def instruction_exits(trap: Trap, vmcs: "ActiveVmcs", insn: decode.Instruction, ram: "HostMemory") -> bool:
    """Whether the guest's instruction of row `trap` exits, as the row's decision says."""
    decision = trap.decision
    if decision is Decision.ALWAYS:
        return True
    if decision is Decision.NEVER:
        return False
    if decision is Decision.CONTROL:
        control, = trap.controls
        return bool(vmcs.read(CONTROL_FIELDS[type(control)]) & control)
    if decision is Decision.MSR_BITMAP:
        index = vmcs.context.reg(x86.UC_X86_REG_RCX) & msrs.LOW_HALF_MASK
        return msr_access_exits(vmcs, ram, index, writing=trap is traps.WRMSR)
    if decision is Decision.IO_BITMAP:
        access = decode.port_access(insn, vmcs.context.reg)
        return io_exits(vmcs, ram, access.port, access.size)
    raise ValueError(f"{trap.name}: an instruction's exit is not decided by {decision}")


def msr_access_exits(vmcs: "ActiveVmcs", ram: "HostMemory", index: int, writing: bool) -> bool:
    """RDMSR and WRMSR exit unless "use MSR bitmaps" is 1 and the MSR's bit in the bitmap is 0
    (SDM Vol. 3C 26.1.3, 25.6.9); MSRs outside the two ranges the bitmaps cover always exit."""
    if not vmcs.read(PRIMARY_CONTROLS_FIELD) & PrimaryProcessorControls.USE_MSR_BITMAPS:
        return True
    for first, part in ((MSR_BITMAP_LOW_FIRST, MSR_BITMAP_LOW_PART), (MSR_BITMAP_HIGH_FIRST, MSR_BITMAP_HIGH_PART)):
        if first <= index < first + MSR_BITMAP_RANGE:
            offset = index - first
            byte = vmcs.read("MSR_BITMAP") + (MSR_BITMAP_WRITE_PARTS if writing else 0) + part + offset // BITS_PER_BYTE
            if not ram.holds(byte, 1):
                return True
            return bool(ram.read(byte, 1)[0] >> (offset % BITS_PER_BYTE) & 1)
    return True


def io_exits(vmcs: "ActiveVmcs", ram: "HostMemory", port: int, size: int) -> bool:
    """SDM Vol. 3C 26.1.3: unconditional I/O exiting, or any bitmap bit of the accessed ports."""
    controls = vmcs.read(PRIMARY_CONTROLS_FIELD)
    if controls & PrimaryProcessorControls.USE_IO_BITMAPS:
        for p in range(port, port + size):
            if p > LAST_PORT:
                return True
            bitmap = vmcs.read("IO_BITMAP_A" if p < IO_BITMAP_PORTS else "IO_BITMAP_B")
            offset = p % IO_BITMAP_PORTS
            if not ram.holds(bitmap + offset // BITS_PER_BYTE):
                return True
            if ram.read(bitmap + offset // BITS_PER_BYTE, 1)[0] >> (offset % BITS_PER_BYTE) & 1:
                return True
        return False
    return bool(controls & PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING)


def qualification(trap: Trap, context, insn: decode.Instruction) -> int:
    """The exit qualification of an instruction's exit: I/O (SDM Vol. 3C Table 28-5), control-register
    access (Table 28-3), else 0."""
    if trap.exit_reason == ExitReason.IO_INSTRUCTION:
        access = decode.port_access(insn, context.reg)
        return make_io_qualification(access.port, access.size, access.is_in, string=access.string, rep=access.rep,
                                     immediate=access.immediate)
    if trap.exit_reason == ExitReason.CR_ACCESS:
        to_cr3 = trap is traps.MOV_TO_CR3
        register = decode.operands(insn)[1 if to_cr3 else 0].register
        access_type = CrAccessType.MOV_TO_CR if to_cr3 else CrAccessType.MOV_FROM_CR
        return (CR3_NUMBER | access_type << CR_QUAL_ACCESS_TYPE_SHIFT
                | fast.MODRM_REGISTER_ORDER.index(register) << CR_QUAL_GPR_SHIFT)
    return 0
