"""Instruction decoding for the machine: instruction counts of translated blocks, trapped instructions, operands."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import capstone
from capstone import x86_const as cs_x86
from unicorn import x86_const as uc_x86

# Our inverse-hypercall instruction uses the reserved two-byte opcode 0F 0A (SDM Vol. 2D Table A-3).
VMCALLR_OPCODE = b"\x0f\x0a"
VMCALLR_LENGTH = len(VMCALLR_OPCODE)
MAX_INSTRUCTION_LENGTH = 15

# Instructions that never execute natively in a context of the given kind: execution stops in front
# of them (Unicorn exit points) and the machine emulates them or turns them into VM exits.
ROOT_TRAPPED_MNEMONICS = frozenset({"rdmsr", "wrmsr", "rdtsc", "rdtscp", "rdrand", "rdseed"})
GUEST_TRAPPED_MNEMONICS = frozenset({
    "cpuid", "hlt", "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
    "rdmsr", "wrmsr", "rdtsc", "rdtscp", "xsetbv", "invd", "rdrand", "rdseed",
})
# MOV to CR3 is trapped in root mode so that every address-space switch is an exact event.
CR3_REGISTER_NAME = "cr3"

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md_detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md_detail.detail = True


def _is_trapped(mnemonic: str, op_str: str, trapped: frozenset[str]) -> bool:
    if mnemonic in trapped:
        return True
    return (trapped is ROOT_TRAPPED_MNEMONICS and mnemonic == "mov"
            and op_str.startswith(CR3_REGISTER_NAME + ","))


@lru_cache(maxsize=1 << 16)
def scan_block(code: bytes, address: int, guest: bool) -> tuple[int, tuple[int, ...]]:
    """Counts the instructions of a block and lists the addresses of trapped instructions in it.

    Bytes capstone cannot decode (a VMX-like instruction of ours, or a genuinely invalid one) end
    the block in Unicorn as #UD; they count as one instruction.
    """
    trapped = GUEST_TRAPPED_MNEMONICS if guest else ROOT_TRAPPED_MNEMONICS
    count = 0
    traps: list[int] = []
    offset = 0
    for _addr, size, mnemonic, op_str in _md.disasm_lite(code, address):
        count += 1
        if _is_trapped(mnemonic, op_str, trapped):
            traps.append(address + offset)
        offset += size
    if offset < len(code):
        count += 1  # the undecodable instruction that ends the block
    return count, tuple(traps)


@lru_cache(maxsize=1 << 14)
def decode_one(code: bytes, address: int):
    """Decodes the first instruction of `code` with operand details, or None."""
    for insn in _md_detail.disasm(code[:MAX_INSTRUCTION_LENGTH], address, 1):
        return insn
    return None


def instruction_length(code: bytes) -> int:
    if code.startswith(VMCALLR_OPCODE):
        return VMCALLR_LENGTH
    insn = decode_one(bytes(code[:MAX_INSTRUCTION_LENGTH]), 0)
    return insn.size if insn is not None else 1


@lru_cache(maxsize=None)
def unicorn_register(capstone_reg: int) -> int:
    """Maps a capstone register id to Unicorn's by name (rax -> UC_X86_REG_RAX)."""
    name = _md_detail.reg_name(capstone_reg).upper()
    return getattr(uc_x86, f"UC_X86_REG_{name}")


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


def operands(insn) -> list[MemoryOperand | RegisterOperand]:
    result: list[MemoryOperand | RegisterOperand] = []
    for op in insn.operands:
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
