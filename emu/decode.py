"""Instruction decoding for the machine: instruction counts of translated blocks, trapped instructions, operands."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import capstone
from capstone import x86_const as cs_x86
from unicorn import x86_const as uc_x86

from asm.isa import VMCALLR_OPCODE  # the one definition of our inverse-hypercall encoding
from emu import traps
from emu.fast import USES_SCALARS, USES_X87_SSE
from emu.vmx_defs import U64_MASK as U64

VMCALLR_LENGTH = len(VMCALLR_OPCODE)
MAX_INSTRUCTION_LENGTH = 15

# Instructions that never execute natively in a context of the given kind: execution stops in front
# of them (Unicorn exit points) and the machine emulates them or turns them into VM exits. The list
# is emu/traps.py's (Catch.EXIT_POINT); MOV to and from CR3 and the debug-exit OUT trap only with
# their operands.
ROOT_TRAPPED_MNEMONICS = traps.trapped_mnemonics(guest=False)
GUEST_TRAPPED_MNEMONICS = traps.trapped_mnemonics(guest=True)
_ROOT_TRAPPED_FORMS = traps.trapped_operand_forms(guest=False)
_GUEST_TRAPPED_FORMS = traps.trapped_operand_forms(guest=True)
_OPERAND_FORM_MNEMONICS = frozenset(mnemonic for trap in _GUEST_TRAPPED_FORMS + _ROOT_TRAPPED_FORMS
                                    for mnemonic in trap.mnemonics)

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


base_mnemonic = traps.base_mnemonic


def _is_trapped(mnemonic: str, op_str: str, guest: bool) -> bool:
    if base_mnemonic(mnemonic) in (GUEST_TRAPPED_MNEMONICS if guest else ROOT_TRAPPED_MNEMONICS):
        return True
    if mnemonic not in _OPERAND_FORM_MNEMONICS:
        return False
    return any(trap.matches(mnemonic, op_str) for trap in (_GUEST_TRAPPED_FORMS if guest else _ROOT_TRAPPED_FORMS))


def is_trapped(instruction: "Instruction", guest: bool) -> bool:
    """Whether a context of that kind traps this instruction."""
    return _is_trapped(instruction.mnemonic, instruction.op_str, guest)


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
    count = 0
    trap_addresses: list[int] = []
    uses = 0
    offset = 0
    for _addr, size, mnemonic, op_str in _md.disasm_lite(code, address):
        count += 1
        if _is_trapped(mnemonic, op_str, guest):
            trap_addresses.append(address + offset)
        uses |= shared_state_uses(base_mnemonic(mnemonic), op_str)
        offset += size
    if offset < len(code):
        count += 1  # the undecodable instruction that ends the block
    return BlockScan(count, tuple(trap_addresses), uses)


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


# I/O instructions (SDM Vol. 2B IN, INS, OUT, OUTS): the sizes of the string forms, whose port is DX.
STRING_IO_SIZES = {"insb": 1, "insw": 2, "insd": 4, "outsb": 1, "outsw": 2, "outsd": 4}
REPEAT_PREFIX_BYTES = (0xF3, 0xF2)
PORT_MASK = 0xFFFF


@dataclass(frozen=True)
class PortAccess:
    """What an IN, OUT, INS or OUTS accesses: the facts of its I/O exit qualification (SDM Vol. 3C
    Table 28-5) and, for IN and OUT, the register that holds or receives the data."""

    port: int
    size: int
    is_in: bool
    string: bool
    rep: bool
    immediate: bool
    data_register: int | None


def port_access(insn: Instruction, read_register) -> PortAccess:
    """The access of an I/O instruction; `read_register(unicorn_register)` gives DX."""
    mnemonic = base_mnemonic(insn.mnemonic)
    is_in = mnemonic.startswith("in")
    if mnemonic in STRING_IO_SIZES:
        return PortAccess(read_register(uc_x86.UC_X86_REG_DX) & PORT_MASK, STRING_IO_SIZES[mnemonic], is_in,
                          True, insn.prefix[0] in REPEAT_PREFIX_BYTES, False, None)
    port_op, data_op = (insn.operands[1], insn.operands[0]) if is_in else (insn.operands[0], insn.operands[1])
    immediate = port_op.type == cs_x86.X86_OP_IMM
    port = port_op.imm if immediate else read_register(uc_x86.UC_X86_REG_DX)
    return PortAccess(port & PORT_MASK, data_op.size, is_in, False, False, immediate, unicorn_register(data_op.reg))


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

