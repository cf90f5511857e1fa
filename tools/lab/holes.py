"""The lab book's holes: `HOLE n, m` (E#n-m) in a student's assembly, what one does until it is filled, and solutions pasted in."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from unicorn import x86_const as x86

# What an unfilled hole does (the HOLE macro of lab.inc): ECX = its number, then the debug exit
# (docs/machine.md 6.2) with this value, which stops the machine right after the OUT.
HOLE_EXIT_VALUE = 0x7E
HOLE_EXIT_STATUS = (HOLE_EXIT_VALUE << 1) | 1          # the machine's exit status for it
EXERCISE_SHIFT = 8                                     # ECX = exercise << EXERCISE_SHIFT | step
STEP_MASK = (1 << EXERCISE_SHIFT) - 1
MACRO_INCLUDE = "lab.inc"                              # the file a lab source includes for HOLE
NOT_IMPLEMENTED = "not yet implemented"               # what a run says of a hole it reached
MAILBOX_LABEL = "lab_hole_reached"                     # where a hole leaves its number too

# `HOLE n, m` in assembly, `HOLE(n, m)` in Python (the questions of a reading exercise).
HOLE_LINE = re.compile(r"^([ \t]*)HOLE[ \t]*\(?[ \t]*(\d+)[ \t]*,[ \t]*(\d+)[ \t]*\)?[ \t]*(?:[;#].*)?$", re.MULTILINE)
_SOLUTION_HEADER = re.compile(r"^[;#][ \t]*(E#\d+-\d+)\b.*$", re.MULTILINE)
_NAME = re.compile(r"E#(\d+)-(\d+)\Z")


class HoleReached(Exception):
    """Raised by HOLE(n, m) in a Python file of an exercise: that step is not written yet."""

    def __init__(self, name: str):
        super().__init__(f"{NOT_IMPLEMENTED}: {name}")
        self.name = name


def HOLE(exercise: int, step: int) -> None:     # noqa: N802 - spelt as in the assembly exercises
    """A hole in a Python answer: raises HoleReached until the line is replaced."""
    raise HoleReached(hole_name(exercise, step))


def hole_name(exercise: int, step: int) -> str:
    return f"E#{exercise}-{step}"


def parse_name(name: str) -> tuple[int, int]:
    """(exercise, step) of "E#n-m"; ValueError for anything else."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a hole name (E#n-m)")
    return int(match.group(1)), int(match.group(2))


def name_of_number(number: int) -> str:
    """The hole an unfilled HOLE left in ECX."""
    return hole_name(number >> EXERCISE_SHIFT, number & STEP_MASK)


def stopped_at(machine, stop, directory: Path, files: tuple[str, ...], symbolize=None) -> str | None:
    """"not yet implemented: E#n-m at file:line (symbol)" when `stop` is an unfilled hole's, else None.
    The hole's number is in ECX of the context that executed it (root or a service partition)."""
    if stop is None or stop.reason != "debug-exit" or stop.exit_status != HOLE_EXIT_STATUS:
        return None
    context = machine.lps[stop.lp or 0].context
    name = name_of_number(context.reg(x86.UC_X86_REG_RCX))
    # RIP has passed the hole's OUT and may name the label after it: name the OUT's last byte instead.
    symbol = symbolize(context.reg(x86.UC_X86_REG_RIP) - 1) if symbolize is not None else None
    return not_implemented(name, directory, files, symbol or "")


def not_implemented(name: str, directory: Path, files: tuple[str, ...], detail: str = "") -> str:
    """"not yet implemented: E#n-m at file:line (detail)": how a run names the hole it reached."""
    site = sites(directory, files).get(name)
    where = str(site) if site is not None else "a hole no longer in the sources"
    return f"{NOT_IMPLEMENTED}: {name} at {where}" + (f" ({detail})" if detail else "")


def macro_source() -> str:
    """lab.inc: the HOLE macro, with its numbers from this module, and HOLE_MAILBOX."""
    return f"""; lab.inc: what a hole of the lab book does until you fill it (written by `hhr lab start`).
; An unfilled `HOLE n, m` (exercise n, step m: E#n-m) puts its number in ECX and in the mailbox,
; and stops the machine through the debug-exit port (docs/machine.md 6.2) with {HOLE_EXIT_VALUE:#x};
; `hhr lab run` then prints "not yet implemented: E#n-m" and where. Code running in a service
; partition cannot stop the machine (its OUT exits to the old hypervisor, which ends the inverse
; call and aborts the restart): the mailbox tells the grader which hole it was.
; Replace the HOLE line with your code.
%macro HOLE exercise, step
    mov ecx, (%exercise << {EXERCISE_SHIFT}) | %step
    mov [rip + {MAILBOX_LABEL}], ecx
    mov al, {HOLE_EXIT_VALUE:#x}
    out DEBUG_EXIT_PORT, al
%endmacro

; The mailbox: once, after the code (support.inc and the top sources of the hypervisor exercises).
%macro HOLE_MAILBOX
{MAILBOX_LABEL}:
    .long 0
%endmacro
"""


@dataclass(frozen=True)
class HoleSite:
    """Where one HOLE line is: file (relative to the exercise's directory) and line number."""

    name: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def sites(directory: Path, files: tuple[str, ...]) -> dict[str, HoleSite]:
    """The HOLE lines left in `files` of `directory`, by hole name."""
    found = {}
    for relative in files:
        text = (directory / relative).read_text(encoding="utf-8")
        for match in HOLE_LINE.finditer(text):
            name = hole_name(int(match.group(2)), int(match.group(3)))
            found[name] = HoleSite(name, relative, text.count("\n", 0, match.start()) + 1)
    return found


def parse_solution(text: str) -> dict[str, str]:
    """A solution file's blocks by hole name: each block runs from its `; E#n-m` line to the next."""
    headers = list(_SOLUTION_HEADER.finditer(text))
    blocks = {}
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        blocks[header.group(1)] = text[header.end():end].strip("\n") + "\n"
    return blocks


def fill(directory: Path, files: tuple[str, ...], blocks: dict[str, str]) -> list[str]:
    """Replaces the HOLE line of each named block with the block, as a student pastes it; returns
    the names of the holes filled."""
    filled = []
    for relative in files:
        path = directory / relative
        text = path.read_text(encoding="utf-8")

        def replace(match: re.Match) -> str:
            name = hole_name(int(match.group(2)), int(match.group(3)))
            if name not in blocks:
                return match.group(0)
            filled.append(name)
            return blocks[name].rstrip("\n")
        path.write_text(HOLE_LINE.sub(replace, text), encoding="utf-8")
    return filled
