"""The text trace: an annotated objdump, one line per instruction, events as headed lines."""
from __future__ import annotations

from typing import IO

from tools.trace.annotate import TracedEvent, TracedInstruction, TracedLoad, field_text

TIME_WIDTH = 12
CONTEXT_WIDTH = 12
SYMBOL_WIDTH = 40
BYTES_WIDTH = 30                        # 10 bytes at 3 columns each
TEXT_WIDTH = 36
# Event fields printed by name instead of number (the number stays in the JSON Lines trace).
NAMED_FIELDS = {"reason": "reason_name", "call": "call_name", "exit_reason": "exit_reason_name", "phase": "phase_name"}
NAMES = frozenset(NAMED_FIELDS.values())


def static_columns(line: TracedInstruction) -> str:
    """The columns that are the same every time this instruction runs in this context."""
    return static_columns_of(line.context.name, line.address, line.symbol, line.code, line.text)


def static_columns_of(context: str, address: int, symbol: str | None, code: bytes, text: str) -> str:
    return (f"{context:<{CONTEXT_WIDTH}} {symbol or hex(address):<{SYMBOL_WIDTH}} "
            f"{code.hex(' '):<{BYTES_WIDTH}} {text:<{TEXT_WIDTH}}")


def instruction_line(line: TracedInstruction, static: str | None = None) -> str:
    """`    1234567 lp1 hv2@service  hv2:receive_records+0x1c  48 89 c7  mov rdi, rax  rdi=0x... [0x...]<-01 02`"""
    text = f"{line.time:>{TIME_WIDTH}} lp{line.lp} {static or static_columns(line)}"
    if line.changes or line.writes:
        effects = [f"{name}={value:#x}" for name, value in line.changes]
        if line.writes:
            effects += [f"[{address:#x}]<-{data.hex(' ')}" for address, data in line.writes]
        return f"{text} {' '.join(effects)}"
    return text.rstrip()


def event_line(line: TracedEvent) -> str:
    """`=== 1234500 lp1 vm-exit reason=VMCALL qualification=0x0 ... ===`"""
    fields = []
    for name, value in line.data.items():
        if name in NAMES:
            continue
        named = NAMED_FIELDS.get(name)
        if named is not None and named in line.data and line.data[named] is not None:
            fields.append(f"{name}={line.data[named]}" if name != "call" else f"call={value}:{line.data[named]}")
        else:
            fields.append(field_text(name, value))
    return " ".join(["===", str(line.time), f"lp{line.lp}", line.kind, *fields, "==="])


def load_line(line: TracedLoad) -> str:
    """`--- 1234567 lp0 p1.vp0 loaded rax=0x1 rip=0x40102c ---`"""
    changes = " ".join(f"{name}={value:#x}" for name, value in line.changes)
    return f"--- {line.time} lp{line.lp} {line.context.name} loaded {changes} ---"


class TextWriter:
    """Streams the text trace to `out`: a header of `#` lines, the lines, the summary as `#` lines."""

    def __init__(self, out: IO[str], header: dict):
        self.out = out
        self._static: dict[tuple[str, int, bytes], str] = {}   # static_columns by context, address and bytes
        write = out.write
        write(f"# hhr trace, text format {header['version']}\n")
        machine = header["machine"]
        write(f"# machine: {machine['lps']} LPs, {machine['ram']} bytes of RAM, quantum {machine['quantum']}\n")
        restart = header["restart"]
        write(f"# restart: {restart['from']} -> {restart['to']} ({restart['mode']}), requested at instruction "
              f"{restart['request_at']}\n")
        write(f"# window: {header['window']}; filters: {header['filters']}\n")
        for image in header["images"]:
            write(f"# image {image['label']} ({image['role']}): {image['load_address']:#x}..."
                  f"{image['load_address'] + image['size']:#x}, {image['symbols']} symbols\n")
        write("# columns: virtual time, LP, context, symbol, bytes, instruction, registers changed, "
              "[memory written]<-bytes\n")

    def instruction(self, line: TracedInstruction) -> None:
        key = (line.context.name, line.address, line.code)
        static = self._static.get(key)
        if static is None:
            static = self._static[key] = static_columns(line)
        self.out.write(instruction_line(line, static) + "\n")

    def event(self, line: TracedEvent) -> None:
        self.out.write(event_line(line) + "\n")

    def load(self, line: TracedLoad) -> None:
        self.out.write(load_line(line) + "\n")

    def close(self, summary: list[str], _figures: dict) -> None:
        for text in summary:
            self.out.write(f"# {text}\n")
