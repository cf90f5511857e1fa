"""Tenet traces (github.com/gaasedelen/tenet, tracers/README.md): one file per context and LP, each line the register delta since the line before, RIP last, then the memory the previous instruction wrote."""
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
    Events have no place in the format and are not written (the other formats have them)."""

    def __init__(self, directory: str | Path, header: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[tuple[str, int], IO[str]] = {}
        self._state: dict[tuple[str, int], tuple[int, ...]] = {}
        self._writes: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
        self.paths: list[Path] = []

    def instruction(self, line: TracedInstruction) -> None:
        key = (line.context.name, line.lp)
        out = self._files.get(key)
        state = tuple(line.before[index] for index in _INDICES)
        if out is None:
            path = self.directory / file_name(*key)
            out = self._files[key] = open(path, "w", encoding="ascii", newline="\n")
            self.paths.append(path)
            entries = [f"{name}={value:#x}" for name, value in zip(TENET_REGISTERS, state)]
        else:
            last = self._state[key]
            entries = [f"{name}={value:#x}" for name, value, old in zip(TENET_REGISTERS, state, last) if value != old]
        entries.append(f"rip={line.before[_RIP]:#x}")
        entries += [f"mw={address:#x}:{data.hex()}" for address, data in self._writes.get(key, ()) if data]
        out.write(",".join(entries) + "\n")
        self._state[key] = state
        self._writes[key] = line.writes

    def event(self, _line: TracedEvent) -> None:
        pass

    def close(self, _summary: list[str], _figures: dict) -> None:
        for out in self._files.values():
            out.close()
