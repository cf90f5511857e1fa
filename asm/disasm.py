"""Disassembly that knows our machine's own VMCALLR and keeps going over bytes capstone rejects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_MODE_64, Cs, CsInsn
from capstone import x86_const

from .isa import VMCALLR_MNEMONIC, VMCALLR_OPCODE

MAX_INSTRUCTION_LENGTH = 15  # See: SDM Vol. 2A 2.3.11 "AVX Instruction Length"
DECODE_WINDOW = 4096  # bytes handed to capstone at a time (slicing the whole image per stop is quadratic)
DATA_BYTES_PER_ROW = 8
UNDECODABLE_MNEMONIC = ".byte"

_capstone: Cs | None = None


def _disassembler() -> Cs:
    global _capstone
    if _capstone is None:
        _capstone = Cs(CS_ARCH_X86, CS_MODE_64)
        _capstone.detail = True
    return _capstone


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction; `detail` is capstone's record (None for vmcallr and undecodable bytes)."""

    address: int
    raw: bytes
    mnemonic: str
    op_str: str
    detail: CsInsn | None = None

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    def memory_operands(self) -> list:
        """capstone's memory operands (each has .mem.base, .mem.index, .mem.disp)."""
        if self.detail is None:
            return []
        return [operand for operand in self.detail.operands if operand.type == x86_const.X86_OP_MEM]

    def immediates(self) -> list[int]:
        """Immediate operand values as capstone reports them (sign-extended to 64 bits, signed)."""
        if self.detail is None:
            return []
        return [operand.imm for operand in self.detail.operands if operand.type == x86_const.X86_OP_IMM]

    @property
    def is_branch(self) -> bool:
        """A jump or call (its immediate, if any, is a target address)."""
        return self.detail is not None and (self.detail.group(CS_GRP_JUMP) or self.detail.group(CS_GRP_CALL))

    def target(self) -> int | None:
        """The address a direct jump/call goes to, or a RIP-relative operand points at."""
        if self.detail is None:
            return None
        if self.is_branch:
            immediates = self.immediates()
            if immediates:
                return immediates[0]
        for operand in self.memory_operands():
            if operand.mem.base == x86_const.X86_REG_RIP and operand.mem.index == 0:
                return self.address + self.size + operand.mem.disp
        return None


def decode(code: bytes, address: int) -> Iterator[Instruction]:
    """Decode all of code as instructions placed at address; VMCALLR is decoded as `vmcallr`, any other
    byte capstone cannot decode becomes a one-byte `.byte 0xNN` and decoding goes on after it."""
    disassembler = _disassembler()
    offset = 0
    while offset < len(code):
        window_end = min(offset + DECODE_WINDOW, len(code))
        for insn in disassembler.disasm(code[offset:window_end], address + offset):
            yield Instruction(insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str, insn)
            offset += insn.size
        if offset >= len(code):
            break
        if window_end < len(code) and window_end - offset < MAX_INSTRUCTION_LENGTH:
            continue  # capstone stopped at an instruction cut by the window: decode it in the next one
        if code[offset:offset + len(VMCALLR_OPCODE)] == VMCALLR_OPCODE:
            yield Instruction(address + offset, VMCALLR_OPCODE, VMCALLR_MNEMONIC, "")
            offset += len(VMCALLR_OPCODE)
        else:
            yield Instruction(address + offset, code[offset:offset + 1], UNDECODABLE_MNEMONIC, f"0x{code[offset]:02x}")
            offset += 1


def _data_rows(code: bytes, address: int) -> Iterator[tuple[int, bytes, str]]:
    """Rows (address, bytes, text) for bytes emitted by data directives; a run of zeros is one `.zero N`."""
    if code and not any(code):
        yield address, code[:DATA_BYTES_PER_ROW], f".zero {len(code)}"
        return
    for offset in range(0, len(code), DATA_BYTES_PER_ROW):
        row = code[offset:offset + DATA_BYTES_PER_ROW]
        yield address + offset, row, ".byte " + ", ".join(f"0x{byte:02x}" for byte in row)


def listing(
    code: bytes,
    address: int,
    *,
    symbolize: Callable[[int], str] | None = None,
    contains: Callable[[int], bool] | None = None,
    data_ranges: Sequence[tuple[int, int]] = (),
) -> list[str]:
    """Lines `0x100010  entry+0x10  0f 01 c1  vmcall`. Bytes inside data_ranges are shown as data;
    jump, call and RIP-relative targets for which contains() is true get a `<symbol>` note."""
    rows: list[tuple[int, bytes, str]] = []
    cursor = address
    end = address + len(code)
    for data_start, data_end in sorted(data_ranges) + [(end, end)]:
        data_start, data_end = max(data_start, cursor), min(data_end, end)
        if data_start > cursor:
            for instruction in decode(code[cursor - address:data_start - address], cursor):
                text = instruction.text
                target = instruction.target()
                if symbolize is not None and target is not None and (contains is None or contains(target)):
                    text += f"  <{symbolize(target)}>"
                rows.append((instruction.address, instruction.raw, text))
        if data_end > data_start:
            rows.extend(_data_rows(code[data_start - address:data_end - address], data_start))
        cursor = max(cursor, data_end)
    symbols = [symbolize(row_address) for row_address, _, _ in rows] if symbolize else [""] * len(rows)
    symbol_width = max((len(symbol) for symbol in symbols), default=0)
    bytes_width = max((len(raw) * 3 - 1 for _, raw, _ in rows), default=0)
    lines = []
    for (row_address, raw, text), symbol in zip(rows, symbols):
        columns = [f"{row_address:#x}"]
        if symbolize is not None:
            columns.append(symbol.ljust(symbol_width))
        columns += [raw.hex(" ").ljust(bytes_width), text]
        lines.append("  ".join(columns).rstrip())
    return lines
