"""Instruction decoding for the machine: instruction counts of translated blocks, trapped instructions, operands."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import capstone
from capstone import x86_const as cs_x86
from unicorn import x86_const as uc_x86

from asm.isa import VMCALLR_OPCODE  # the one definition of our inverse-hypercall encoding
from emu.ports import DEBUG_EXIT_PORT
from emu.fast import USES_SCALARS, USES_X87_SSE
from emu.vmx_defs import U64_MASK as U64

VMCALLR_LENGTH = len(VMCALLR_OPCODE)
MAX_INSTRUCTION_LENGTH = 15

# Instructions that never execute natively in a context of the given kind: execution stops in front
# of them (Unicorn exit points) and the machine emulates them or turns them into VM exits.
ROOT_TRAPPED_MNEMONICS = frozenset({"rdmsr", "wrmsr", "rdtsc", "rdtscp", "rdrand", "rdseed"})
GUEST_TRAPPED_MNEMONICS = frozenset({
    "cpuid", "hlt", "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
    "rdmsr", "wrmsr", "rdtsc", "rdtscp", "xsetbv", "invd", "rdrand", "rdseed",
})
# An OUT with the debug-exit port as its immediate operand is trapped in every context.
DEBUG_EXIT_OUT_PREFIX = f"{DEBUG_EXIT_PORT:#x},"
# MOV to CR3 is trapped (root and guest) so that every address-space switch is an exact event and a
# guest's can be a CR-access VM exit; a guest's MOV from CR3 is trapped for CR3-store exiting.
CR3_REGISTER_NAME = "cr3"

# Instructions that read or change state VMX leaves shared between root and guest (docs/machine.md
# 7.4): an instance runs a block holding one only after taking the LP's current values.
X87_MNEMONIC_PREFIX = "f"           # every x87 instruction (SDM Vol. 1 8.2), FXSAVE and FXRSTOR too
X87_SSE_MNEMONICS = frozenset({
    "wait", "emms", "ldmxcsr", "stmxcsr",
    # SSE conversions to a general register from memory name no vector register, yet set MXCSR flags
    "cvtsd2si", "cvttsd2si", "cvtss2si", "cvttss2si", "xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec",
    "xsavec64", "xsaves", "xsaves64", "xrstor", "xrstor64", "xrstors", "xrstors64",
})
VECTOR_REGISTER_PATTERN = re.compile(r"\b[xyz]?mm\d")   # an MMX, XMM, YMM or ZMM operand
# CR2 and DR0-DR7 by MOV; KERNEL_GS_BASE by SWAPGS; STAR, LSTAR, CSTAR and FMASK by SYSCALL and
# SYSRET (SDM Vol. 3A 5.8.8); TSC_AUX by RDTSCP and RDPID.
SHARED_SCALAR_REGISTER_PATTERN = re.compile(r"\b(cr2|dr\d)\b")
SHARED_SCALAR_MNEMONICS = frozenset({"swapgs", "syscall", "sysret", "sysretq", "rdtscp", "rdpid"})


def shared_state_uses(mnemonic: str, op_str: str) -> int:
    """The classes of shared state (fast.USES_*) an instruction may read or change."""
    uses = 0
    if mnemonic.startswith(X87_MNEMONIC_PREFIX) or mnemonic in X87_SSE_MNEMONICS or \
            VECTOR_REGISTER_PATTERN.search(op_str):
        uses |= USES_X87_SSE
    if mnemonic in SHARED_SCALAR_MNEMONICS or SHARED_SCALAR_REGISTER_PATTERN.search(op_str):
        uses |= USES_SCALARS
    return uses


_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md_detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md_detail.detail = True


# Capstone prints a REP/REPE/REPNE prefix as part of the mnemonic ("rep outsb").
REPEAT_PREFIXES = ("rep ", "repe ", "repne ", "repz ", "repnz ")


def base_mnemonic(mnemonic: str) -> str:
    """The mnemonic without a repeat prefix: "rep outsb" -> "outsb"."""
    for prefix in REPEAT_PREFIXES:
        if mnemonic.startswith(prefix):
            return mnemonic[len(prefix):]
    return mnemonic


def is_mov_to_cr3(mnemonic: str, op_str: str) -> bool:
    return mnemonic == "mov" and op_str.startswith(CR3_REGISTER_NAME + ",")


def is_mov_from_cr3(mnemonic: str, op_str: str) -> bool:
    return mnemonic == "mov" and op_str.endswith(", " + CR3_REGISTER_NAME)


def _is_trapped(mnemonic: str, op_str: str, trapped: frozenset[str]) -> bool:
    if base_mnemonic(mnemonic) in trapped:
        return True
    if mnemonic == "out" and op_str.startswith(DEBUG_EXIT_OUT_PREFIX):
        return True   # the machine stops right after it, not at the end of the block
    if is_mov_to_cr3(mnemonic, op_str):
        return True
    # A guest's CR3 reads are trapped too, for CR3-store exiting (SDM Vol. 3C 26.1.3).
    return trapped is GUEST_TRAPPED_MNEMONICS and is_mov_from_cr3(mnemonic, op_str)


def is_trapped(instruction: "Instruction", guest: bool) -> bool:
    """Whether a context of that kind traps this instruction."""
    return _is_trapped(instruction.mnemonic, instruction.op_str,
                       GUEST_TRAPPED_MNEMONICS if guest else ROOT_TRAPPED_MNEMONICS)


@dataclass(frozen=True)
class BlockScan:
    """What the machine needs to know of a translated block before it runs."""

    count: int                  # instructions
    traps: tuple[int, ...]      # addresses of the trapped instructions in it
    uses: int                   # classes of shared state it touches (fast.USES_*)


@lru_cache(maxsize=1 << 16)
def scan_block(code: bytes, address: int, guest: bool) -> BlockScan:
    """Counts the instructions of a block, lists the addresses of trapped instructions in it and
    the shared state it touches.

    Bytes capstone cannot decode (a VMX-like instruction of ours, or a genuinely invalid one) end
    the block in Unicorn as #UD; they count as one instruction.
    """
    trapped = GUEST_TRAPPED_MNEMONICS if guest else ROOT_TRAPPED_MNEMONICS
    count = 0
    traps: list[int] = []
    uses = 0
    offset = 0
    for _addr, size, mnemonic, op_str in _md.disasm_lite(code, address):
        count += 1
        if _is_trapped(mnemonic, op_str, trapped):
            traps.append(address + offset)
        uses |= shared_state_uses(base_mnemonic(mnemonic), op_str)
        offset += size
    if offset < len(code):
        count += 1  # the undecodable instruction that ends the block
    return BlockScan(count, tuple(traps), uses)


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction with what the machine asks of it, computed once (capstone's
    attribute access decodes again on every read)."""

    address: int
    size: int
    mnemonic: str
    op_str: str
    prefix: tuple[int, ...]
    operands: tuple          # capstone's operand records (kind, register, immediate, memory)
    parsed: tuple            # the same as RegisterOperand / MemoryOperand, for the machine
    decoded: object          # capstone's instruction, which owns the operand records


@lru_cache(maxsize=1 << 14)
def decode_one(code: bytes, address: int) -> Instruction | None:
    """Decodes the first instruction of `code` with operand details, or None."""
    for insn in _md_detail.disasm(code[:MAX_INSTRUCTION_LENGTH], address, 1):
        cs_operands = tuple(insn.operands)
        return Instruction(insn.address, insn.size, insn.mnemonic, insn.op_str, tuple(insn.prefix),
                           cs_operands, tuple(_parse_operands(cs_operands)), insn)
    return None


@lru_cache(maxsize=None)
def unicorn_register(capstone_reg: int) -> int:
    """Maps a capstone register id to Unicorn's by name (rax -> UC_X86_REG_RAX)."""
    name = _md_detail.reg_name(capstone_reg).upper()
    return getattr(uc_x86, f"UC_X86_REG_{name}")


_LEGACY_GENERAL_REGISTERS = ("AX", "BX", "CX", "DX", "SI", "DI", "BP", "SP")
_NUMBERED_GENERAL_REGISTERS = range(8, 16)
# The 64-bit register a 32-bit general register is the low half of: writing the 32-bit one
# zero-extends into it (SDM Vol. 1 3.4.1.1).
QWORD_REGISTER_OF_DWORD = {
    **{getattr(uc_x86, f"UC_X86_REG_E{name}"): getattr(uc_x86, f"UC_X86_REG_R{name}")
       for name in _LEGACY_GENERAL_REGISTERS},
    **{getattr(uc_x86, f"UC_X86_REG_R{number}D"): getattr(uc_x86, f"UC_X86_REG_R{number}")
       for number in _NUMBERED_GENERAL_REGISTERS},
}
DWORD_SIZE = 4


@dataclass(frozen=True)
class MemoryOperand:
    """An effective-address computation: base + index * scale + displacement (SDM Vol. 1 3.7.5)."""

    base: int | None
    index: int | None
    scale: int
    displacement: int
    rip_relative: bool
    size: int


@dataclass(frozen=True)
class RegisterOperand:
    register: int
    size: int


def operands(insn: Instruction) -> tuple[MemoryOperand | RegisterOperand, ...]:
    """Register and memory operands in Intel order (immediates left out)."""
    return insn.parsed


def _parse_operands(cs_operands) -> list[MemoryOperand | RegisterOperand]:
    result: list[MemoryOperand | RegisterOperand] = []
    for op in cs_operands:
        if op.type == cs_x86.X86_OP_REG:
            result.append(RegisterOperand(unicorn_register(op.reg), op.size))
        elif op.type == cs_x86.X86_OP_MEM:
            mem = op.mem
            rip = mem.base == cs_x86.X86_REG_RIP
            result.append(MemoryOperand(
                None if mem.base in (0, cs_x86.X86_REG_RIP) else unicorn_register(mem.base),
                None if mem.index == 0 else unicorn_register(mem.index),
                mem.scale, mem.disp, rip, op.size))
    return result


# Memory an instruction touches besides its explicit operands: the stack (SDM Vol. 1 6.2, 6.4).
STACK_SLOT = 8
IRETQ_FRAME_SIZE = 5 * STACK_SLOT
STACK_WRITES = frozenset({"push", "pushfq", "call"})
STACK_READS = {"pop": STACK_SLOT, "popfq": STACK_SLOT, "ret": STACK_SLOT, "iretq": IRETQ_FRAME_SIZE}
_SEGMENT_BASES = {cs_x86.X86_REG_FS: uc_x86.UC_X86_REG_FS_BASE, cs_x86.X86_REG_GS: uc_x86.UC_X86_REG_GS_BASE}


@dataclass(frozen=True)
class MemoryAccess:
    linear: int
    size: int
    reads: bool
    writes: bool


def memory_accesses(insn, read_register) -> list[MemoryAccess]:
    """The linear ranges an instruction reads or writes: memory operands, then implicit stack slots.

    `read_register(unicorn_register)` gives register values before the instruction runs.
    """
    accesses = []
    for op in insn.operands:
        if op.type != cs_x86.X86_OP_MEM:
            continue
        mem = op.mem
        address = mem.disp
        if mem.base == cs_x86.X86_REG_RIP:
            address += insn.address + insn.size
        elif mem.base:
            address += read_register(unicorn_register(mem.base))
        if mem.index:
            address += read_register(unicorn_register(mem.index)) * mem.scale
        if mem.segment in _SEGMENT_BASES:
            address += read_register(_SEGMENT_BASES[mem.segment])
        access = op.access or capstone.CS_AC_READ
        accesses.append(MemoryAccess(address & U64, op.size, bool(access & capstone.CS_AC_READ),
                                     bool(access & capstone.CS_AC_WRITE)))
    mnemonic = base_mnemonic(insn.mnemonic)
    rsp = read_register(uc_x86.UC_X86_REG_RSP)
    if mnemonic in STACK_WRITES:
        accesses.append(MemoryAccess((rsp - STACK_SLOT) & U64, STACK_SLOT, False, True))
    elif mnemonic in STACK_READS:
        accesses.append(MemoryAccess(rsp, STACK_READS[mnemonic], True, False))
    return accesses

