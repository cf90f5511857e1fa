"""Assemble preprocessed Intel-syntax x86-64 with keystone into an Image, and check what keystone made of it."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Mapping, Sequence

from keystone import KS_ARCH_X86, KS_ERR_ASM_FIXUP_INVALID, KS_MODE_64, Ks, KsError

from .checks import SIGN_EXTENSION_ADVICE, check_encoding
from .errors import AsmError
from .image import Image, LineEntry
from .preprocess import DIRECTIVE, EMPTY, INSTRUCTION, RESERVED_LABEL_PREFIX, Program, Statement, preprocess
from .syntax import DATA_DIRECTIVES, ORIGIN_DIRECTIVE, first_word

ADDRESS_LIMIT = 1 << 64
QUAD_SIZE = 8
SYMBOLS_PER_QUAD = 16
STATEMENT_MARKER = RESERVED_LABEL_PREFIX + "s{}"
END_MARKER = RESERVED_LABEL_PREFIX + "end"

_KEYSTONE_HINTS = {
    KS_ERR_ASM_FIXUP_INVALID: (
        "a value does not fit the 32-bit field keystone chose (a label at or above 4 GiB? " + SIGN_EXTENSION_ADVICE + ")"
    ),
}


def assemble(
    source: str,
    base: int,
    *,
    constants: Mapping[str, int] | None = None,
    include_dirs: Sequence[Path] = (),
    filename: str = "<source>",
) -> Image:
    """Assemble Intel-syntax x86-64 source for load address `base` (see docs/asm.md)."""
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base < ADDRESS_LIMIT:
        raise AsmError(f"base must be an address in [0, 2**64), got {base!r}")
    program = preprocess(source, filename=filename, constants=constants, include_dirs=include_dirs)
    return _assemble_program(program, base)


def assemble_file(path: str | Path, base: int, **options) -> Image:
    """assemble() the file at path; its directory is searched first for %include files."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AsmError(f"cannot read {path}: {error}") from None
    return assemble(source, base, filename=str(path), **options)


# --- keystone ----------------------------------------------------------------------------------

_engine: Ks | None = None


def _keystone(text: str, address: int) -> bytes:
    # No KS_OPT_SYM_RESOLVER: with a resolver installed keystone 0.9.2 reads decimal literals as hex
    # (`mov rcx, 100` becomes mov rcx, 0x100). Unknown names are caught by the preprocessor instead.
    global _engine
    if _engine is None:
        _engine = Ks(KS_ARCH_X86, KS_MODE_64)
    encoding, _ = _engine.asm(text, address, True)
    return bytes(encoding or b"")


def _fails(text: str, address: int) -> Exception | None:
    try:
        _keystone(text, address)
    except Exception as error:  # KsError, or a failure inside the binding
        return error
    return None


def _keystone_message(error: Exception) -> str:
    message = f"keystone: {error}"
    hint = _KEYSTONE_HINTS.get(getattr(error, "errno", None))
    return f"{message}: {hint}" if hint else message


def _isolated(statement: Statement, references: tuple[str, ...]) -> str:
    """The statement alone, with the labels it names defined right after it (so they still resolve)."""
    undefined = [name for name in dict.fromkeys(references) if name not in statement.labels]
    return "\n".join([statement.text] + [f"{name}:" for name in undefined])


def _located_error(error: KsError, program: Program, emitting: list[int], base: int) -> AsmError:
    """Turn a keystone error into an AsmError on the statement that causes it; `emitting` indexes the
    statements that are not EMPTY."""
    # Most errors belong to one statement: assemble each alone.
    for index in emitting:
        statement = program.statements[index]
        line_error = _fails(_isolated(statement, program.label_references[index]), base)
        if line_error is not None:
            return AsmError(_keystone_message(line_error), statement.location)

    # Errors that depend on the layout (.org going backwards): the shortest failing prefix, with the
    # labels defined further on placed after it.
    def prefix_fails(count: int) -> bool:
        prefix = program.statements[:emitting[count - 1] + 1]
        defined = {label for statement in prefix for label in statement.labels}
        lines = [statement.text for statement in prefix] + [f"{name}:" for name in program.labels if name not in defined]
        return _fails("\n".join(lines), base) is not None

    if not emitting or not prefix_fails(len(emitting)):
        return AsmError(_keystone_message(error) + " (not attributable to one line)")
    low, high = 1, len(emitting)
    while low < high:
        middle = (low + high) // 2
        if prefix_fails(middle):
            high = middle
        else:
            low = middle + 1
    return AsmError(_keystone_message(error) + " (first seen at this line)", program.statements[emitting[low - 1]].location)


def _run_keystone(text: str, base: int, program: Program, emitting: list[int]) -> bytes:
    try:
        return _keystone(text, base)
    except KsError as error:
        located = _located_error(error, program, emitting, base)
    except Exception as error:  # failures inside the binding itself must not leak as tracebacks
        located = AsmError(f"keystone failed: {type(error).__name__}: {error}")
    raise located


# --- the program -------------------------------------------------------------------------------

def _keystone_text(program: Program, table: list[str]) -> str:
    """The program with a marker label before each emitting statement, then a table of `.quad` entries
    giving the address of every marker and label (keystone reports no symbols, so we ask it this way)."""
    lines = []
    for index, statement in enumerate(program.statements):
        if statement.kind != EMPTY:
            lines.append(f"{STATEMENT_MARKER.format(index)}:")
        lines.append(statement.text)
    lines.append(f"{END_MARKER}:")
    for start in range(0, len(table), SYMBOLS_PER_QUAD):
        lines.append(".quad " + ", ".join(table[start:start + SYMBOLS_PER_QUAD]))
    return "\n".join(lines)


def _assemble_program(program: Program, base: int) -> Image:
    emitting = [index for index, statement in enumerate(program.statements) if statement.kind != EMPTY]
    table = [STATEMENT_MARKER.format(index) for index in emitting] + [END_MARKER] + list(program.labels)
    output = _run_keystone(_keystone_text(program, table), base, program, emitting)
    table_size = QUAD_SIZE * len(table)
    code = output[:-table_size]
    values = struct.unpack(f"<{len(table)}Q", output[-table_size:])
    starts, end = values[:len(emitting)], values[len(emitting)]
    if end != base + len(code):
        raise AsmError(f"internal: end marker at {end:#x} but code ends at {base + len(code):#x}")
    if end > ADDRESS_LIMIT:
        raise AsmError(f"image {base:#x}..{end:#x} runs past the end of the address space")
    symbols = dict(zip(program.labels, values[len(emitting) + 1:]))

    lines: list[LineEntry] = []
    data_ranges: list[tuple[int, int]] = []
    for position, index in enumerate(emitting):
        statement = program.statements[index]
        start = starts[position]
        stop = starts[position + 1] if position + 1 < len(starts) else end
        piece = code[start - base:stop - base]
        if statement.kind == INSTRUCTION:
            if not piece:
                raise AsmError("keystone produced no bytes for this instruction (a form it silently drops)",
                               statement.location)
            check_encoding(statement, piece, start, program.label_references[index], symbols)
        if piece:
            lines.append(LineEntry(start, statement.location.file, statement.location.line))
            if statement.kind == DIRECTIVE and _is_data_directive(statement):
                data_ranges.append((start, stop))
    return Image(base, code, symbols, tuple(lines), tuple(data_ranges))


def _is_data_directive(statement: Statement) -> bool:
    directive = first_word(statement.body).lower()
    return directive in DATA_DIRECTIVES or directive == ORIGIN_DIRECTIVE
