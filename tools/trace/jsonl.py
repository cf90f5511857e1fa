"""The JSON Lines trace (schema `hhr-trace`, docs/tracing.md): a header record, instruction and event records in order, a summary record."""
from __future__ import annotations

import json
from typing import IO, Any

from tools.trace.annotate import HEX_FIELDS, TracedEvent, TracedInstruction, TracedLoad

SCHEMA = "hhr-trace"
SCHEMA_VERSION = 1


def _dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)


def _value(name: str, value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and name in HEX_FIELDS:
        return f"{value:#x}"
    return value


def event_record(line: TracedEvent) -> dict:
    return {"type": "event", "seq": line.seq, "t": line.time, "lp": line.lp, "kind": line.kind,
            "phase": line.phase, "data": {name: _value(name, value) for name, value in line.data.items()}}


def static_fields(address: int, symbol: str | None, code: bytes, text: str) -> str:
    """An instruction record's fields that are the same every time it runs in a context."""
    return f'"rip":"{address:#x}","sym":{json.dumps(symbol)},"bytes":"{code.hex()}","asm":{json.dumps(text)},'


class JsonLinesWriter:
    """Writes instruction records as json.dumps would, from fragments: what is the same every time
    an instruction runs in a context is encoded once."""

    def __init__(self, out: IO[str], header: dict):
        self.out = out
        self._static: dict[tuple[str, int, bytes], str] = {}
        self._strings: dict[str, str] = {}
        out.write(_dumps({"type": "header", "schema": SCHEMA, **header}) + "\n")

    def _string(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            encoded = self._strings[text] = json.dumps(text)
        return encoded

    def instruction(self, line: TracedInstruction) -> None:
        key = (line.context.name, line.address, line.code)
        static = self._static.get(key)
        if static is None:
            static = self._static[key] = static_fields(line.address, line.symbol, line.code, line.text)
        registers = ",".join(f'"{name}":"{value:#x}"' for name, value in line.changes)
        memory = ",".join(f'["{address:#x}","{data.hex()}"]' for address, data in line.writes)
        self.out.write(f'{{"type":"insn","t":{line.time},"lp":{line.lp},"ctx":{self._string(line.context.name)},'
                       f'"phase":{self._string(line.phase)},{static}"regs":{{{registers}}},"mem":[{memory}]}}\n')

    def event(self, line: TracedEvent) -> None:
        self.out.write(_dumps(event_record(line)) + "\n")

    def load(self, line: TracedLoad) -> None:
        registers = ",".join(f'"{name}":"{value:#x}"' for name, value in line.changes)
        self.out.write(f'{{"type":"load","t":{line.time},"lp":{line.lp},"ctx":{self._string(line.context.name)},'
                       f'"phase":{self._string(line.phase)},"regs":{{{registers}}}}}\n')

    def close(self, _summary: list[str], figures: dict) -> None:
        self.out.write(_dumps({"type": "summary", **figures}) + "\n")
