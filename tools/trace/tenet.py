"""Tenet traces (github.com/gaasedelen/tenet, tracers/README.md): one file per context and LP, each line the register delta since the line before, RIP last, then the memory the previous instruction read and wrote; a last line for the last instruction's effects."""
from __future__ import annotations

import re
from pathlib import Path
from typing import IO

from tools.trace.annotate import TracedEvent, TracedInstruction
from tools.trace.registers import REGISTER_NAMES

# Tenet's AMD64 architecture: the sixteen general registers and RIP (tenet/trace/arch/amd64.py).
TENET_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rbp", "rsp", "rsi", "rdi",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_INDICES = tuple(REGISTER_NAMES.index(name) for name in TENET_REGISTERS)
_RIP = REGISTER_NAMES.index("rip")
FILE_SUFFIX = ".log"
# A line: register entries, `rip=` last among them, then memory entries (the README's rules).
LINE_PATTERN = re.compile(r"^(?:(?:r[a-z0-9]{1,2})=0x[0-9a-f]+,)*rip=0x[0-9a-f]+"
                          r"(?:,(?:mr|mw|mrw)=0x[0-9a-f]+:(?:[0-9a-f]{2})+)*$")


def file_name(context: str, lp: int) -> str:
    """`hv1-root.lp0.log`, `hv2-service.lp0.log`, `p1.vp0.lp1.log`."""
    return f"{context.replace('@', '-')}.lp{lp}{FILE_SUFFIX}"


class TenetWriter:
    """Writes into the directory `directory`, a file per (context, LP) opened at its first line.
    The README's reference pattern: at each instruction, the registers changed and the memory
    touched since the file's instruction before. When the window closes, each file gets one more
    line: the registers after its last instruction (with the RIP it goes on to) and that
    instruction's memory. Reads are `mr=`, writes `mw=` (reads first); `mrw=` is not used, as the
    README allows, since one entry cannot hold both the bytes read and the bytes written.
    Events have no place in the format and are not written (the other formats have them)."""

    def __init__(self, directory: str | Path, header: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[tuple[str, int], IO[str]] = {}
        self._state: dict[tuple[str, int], tuple[int, ...]] = {}
        self._last: dict[tuple[str, int], TracedInstruction] = {}
        self.paths: list[Path] = []

    def instruction(self, line: TracedInstruction) -> None:
        key = (line.context.name, line.lp)
        out = self._files.get(key)
        if out is None:
            path = self.directory / file_name(*key)
            out = self._files[key] = open(path, "w", encoding="ascii", newline="\n")
            self.paths.append(path)
        self._write_line(key, line.before, self._last.get(key))
        self._last[key] = line

    def _write_line(self, key: tuple[str, int], registers: tuple[int, ...],
                    previous: TracedInstruction | None) -> None:
        """One line: the registers `registers` (all of them on a file's first line, else those that
        changed), RIP last, then the memory the file's previous instruction read and wrote."""
        state = tuple(registers[index] for index in _INDICES)
        last = self._state.get(key)
        if last is None:
            entries = [f"{name}={value:#x}" for name, value in zip(TENET_REGISTERS, state)]
        else:
            entries = [f"{name}={value:#x}" for name, value, old in zip(TENET_REGISTERS, state, last) if value != old]
        entries.append(f"rip={registers[_RIP]:#x}")
        if previous is not None:
            entries += [f"mr={address:#x}:{data.hex()}" for address, data in previous.reads if data]
            entries += [f"mw={address:#x}:{data.hex()}" for address, data in previous.writes if data]
        self._files[key].write(",".join(entries) + "\n")
        self._state[key] = state

    def event(self, _line: TracedEvent) -> None:
        pass

    def load(self, _line) -> None:
        """Registers loaded while the context did not run are in its next line's registers."""

    def close(self, _summary: list[str], _figures: dict) -> None:
        for key, out in self._files.items():
            last = self._last[key]
            self._write_line(key, last.after, last)
            out.close()
