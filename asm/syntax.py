"""Lexical rules of the toolkit's Intel-syntax dialect: comments, tokens, labels, names keystone knows."""

from __future__ import annotations

import re
from typing import Callable, Iterator

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const

IDENTIFIER_PATTERN = r"[A-Za-z_.$][\w.$]*"
IDENTIFIER = re.compile(rf"{IDENTIFIER_PATTERN}\Z", re.ASCII)

# One token of a source line. Numbers swallow their suffixes and prefixes (0x1f, 10h, 0b101) so the
# letters inside them are never taken for identifiers.
_TOKEN = re.compile(
    rf"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<number>\d\w*)
    | (?P<ident>{IDENTIFIER_PATTERN})
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.ASCII,
)

COMMENT_CHARACTERS = (";", "#")
_LABEL = re.compile(rf"\s*({IDENTIFIER_PATTERN})\s*:(?![:\[])", re.ASCII)
_ASSIGNMENT = re.compile(rf"{IDENTIFIER_PATTERN}\s*=", re.ASCII)


def _capstone_register_names() -> frozenset[str]:
    disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
    names = set()
    for register_id in range(1, x86_const.X86_REG_ENDING):
        name = disassembler.reg_name(register_id)
        if name:
            names.add(name.split("(")[0])  # "st(0)" is written st(0): the identifier is "st"
    return frozenset(names)


REGISTER_NAMES = _capstone_register_names()
OPERAND_KEYWORDS = frozenset(
    {"byte", "word", "dword", "fword", "qword", "tbyte", "tword", "oword", "xword",
     "xmmword", "ymmword", "zmmword", "ptr"}
)
# keystone picks jump sizes itself and rejects these; named here to give a hint instead.
JUMP_SIZE_KEYWORDS = frozenset({"short", "near", "far"})
CURRENT_ADDRESS = "."  # `jmp .` jumps to itself; keystone silently drops `$`, so `$` is refused
INSTRUCTION_PREFIXES = frozenset(
    {"rep", "repe", "repz", "repne", "repnz", "lock", "data16", "data32", "addr32"}
)

DATA_DIRECTIVES = frozenset(
    {".byte", ".word", ".short", ".value", ".int", ".long", ".quad",
     ".ascii", ".asciz", ".string", ".zero", ".skip", ".space", ".fill"}
)
ALIGNMENT_DIRECTIVES = frozenset({".align", ".balign", ".p2align"})
ORIGIN_DIRECTIVE = ".org"
SUPPORTED_DIRECTIVES = DATA_DIRECTIVES | ALIGNMENT_DIRECTIVES | {ORIGIN_DIRECTIVE}
# Directives people reach for that the toolkit replaces with its own preprocessor.
DIRECTIVE_HINTS = {
    ".equ": "use %define NAME value (or pass constants=)",
    ".set": "use %define NAME value (or pass constants=)",
    ".equiv": "use %define NAME value (or pass constants=)",
    ".macro": "use %macro NAME args ... %endmacro",
    ".include": 'use %include "file"',
}


def tokens(text: str) -> Iterator[tuple[str, str, int, int]]:
    """Yield (kind, text, start, end) for each token; kind is string, number, ident, space or other."""
    for match in _TOKEN.finditer(text):
        yield match.lastgroup, match.group(), match.start(), match.end()


def strip_comment(line: str) -> str:
    """Cut a line at the first ';' or '#' outside a string literal."""
    for kind, text, start, _ in tokens(line):
        if kind == "other" and text in COMMENT_CHARACTERS:
            return line[:start].rstrip()
    return line.rstrip()


def identifiers(text: str) -> Iterator[str]:
    """Every identifier in text, outside string literals and numbers."""
    for kind, token, _, _ in tokens(text):
        if kind == "ident":
            yield token


def replace_identifiers(text: str, replacement: Callable[[str], str | None]) -> str:
    """Replace whole-word identifiers (outside strings) for which replacement() returns text."""
    pieces = []
    for kind, token, _, _ in tokens(text):
        if kind == "ident":
            substitute = replacement(token)
            pieces.append(token if substitute is None else substitute)
        else:
            pieces.append(token)
    return "".join(pieces)


def split_labels(text: str) -> tuple[list[str], str]:
    """Split 'a: b: mov rax, 1' into (['a', 'b'], 'mov rax, 1')."""
    labels = []
    while True:
        match = _LABEL.match(text)
        if match is None:
            return labels, text.strip()
        labels.append(match.group(1))
        text = text[match.end():]


def is_assignment(body: str) -> bool:
    """True for GAS symbol assignments (`NAME = value`), which the toolkit refuses."""
    return _ASSIGNMENT.match(body) is not None


def split_first_word(text: str) -> tuple[str, str]:
    """Split text into its first word and the stripped rest ("" for either when absent)."""
    words = text.split(None, 1)
    return (words[0] if words else ""), (words[1].strip() if len(words) > 1 else "")


def first_word(body: str) -> str:
    return split_first_word(body)[0]


def split_instruction(body: str) -> tuple[str, str]:
    """Split an instruction into (prefixes and mnemonic, operand text)."""
    words = body.split(None, 1)
    head = [words[0]]
    rest = words[1] if len(words) > 1 else ""
    while head[-1].lower() in INSTRUCTION_PREFIXES and rest:
        words = rest.split(None, 1)
        head.append(words[0])
        rest = words[1] if len(words) > 1 else ""
    return " ".join(head), rest.strip()


def is_register_or_keyword(name: str) -> bool:
    lowered = name.lower()
    return lowered in REGISTER_NAMES or lowered in OPERAND_KEYWORDS or name == CURRENT_ADDRESS


def format_number(value: int) -> str:
    """A constant's value as keystone-ready text; negative values are parenthesised."""
    return f"0x{value:x}" if value >= 0 else f"(-0x{-value:x})"
