"""Checks of the encodings keystone chose silently: implicit RIP-relative operands, sign-extended labels."""

from __future__ import annotations

from typing import Mapping

from capstone import x86_const

from . import disasm
from .errors import AsmError
from .preprocess import Statement

# A 32-bit immediate or displacement is sign-extended to 64 bits (See: SDM Vol. 2A 2.2.1.3 and 2.2.1.5):
# it reaches 0..2 GiB and the top 2 GiB only.
SIGN_EXTENDED_LIMIT = 1 << 31
RIP_RELATIVE_ADVICE = (
    "load the address into a register (mov rax, ADDRESS; mov qword ptr [rax], ...) "
    "or, for a label, write [rip + label]"
)
SIGN_EXTENSION_ADVICE = "write [rip + label], lea reg, [rip + label] or movabs reg, label"


def check_encoding(statement: Statement, piece: bytes, address: int, references: tuple[str, ...],
                   symbols: Mapping[str, int]) -> None:
    """Refuse the two encodings keystone chooses silently that do not mean what the source says:
    1. a memory operand with no register (`[0x3000]`) made RIP-relative (`[rip + disp]`);
    2. a label at or above 2 GiB put into a sign-extended 32-bit immediate or displacement."""
    high_labels = [name for name in references if symbols[name] >= SIGN_EXTENDED_LIMIT]
    if "[" not in statement.body and not high_labels:
        return  # no memory operand written and no label that could be sign-extended: nothing to check
    for instruction in disasm.decode(piece, address):
        for operand in instruction.memory_operands():
            if operand.mem.base == x86_const.X86_REG_RIP and not statement.writes_rip:
                raise AsmError(
                    f"keystone encoded this memory operand RIP-relative ({instruction.text}) although the "
                    f"source does not say rip; {RIP_RELATIVE_ADVICE}",
                    statement.location,
                )
            if high_labels and operand.mem.base != x86_const.X86_REG_RIP and operand.mem.disp < 0:
                _refuse_sign_extension(statement, instruction, high_labels, symbols)
        if high_labels and not instruction.is_branch and any(value < 0 for value in instruction.immediates()):
            _refuse_sign_extension(statement, instruction, high_labels, symbols)


def _refuse_sign_extension(statement: Statement, instruction: disasm.Instruction, high_labels: list[str],
                           symbols: Mapping[str, int]) -> None:
    name = high_labels[0]
    raise AsmError(
        f"label {name} is at {symbols[name]:#x}, at or above 2 GiB, but keystone put it in a sign-extended "
        f"32-bit field ({instruction.text}); {SIGN_EXTENSION_ADVICE}",
        statement.location,
    )

