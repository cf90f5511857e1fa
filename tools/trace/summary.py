"""The figures at the end of a trace: instructions per context, phase and routine, VM exits by reason, inverse hypercalls by call number."""
from __future__ import annotations

import collections

from tools.trace.annotate import TracedEvent, TracedInstruction


ROUTINES_PRINTED = 15                  # the text summary lists this many routines, the busiest first
NO_SYMBOL = "(no symbol)"


def routine(symbol: str | None) -> str:
    """`hv2:receive_records.loop+0x1c` -> `hv2:receive_records`: local labels count as their routine."""
    if symbol is None:
        return NO_SYMBOL
    return symbol.split("+")[0].split(".")[0]


class Summary:
    """Counts what the trace wrote (after filters)."""

    def __init__(self):
        self.instructions = 0
        self.events = 0
        self.by_context: collections.Counter[str] = collections.Counter()
        self.by_phase: collections.Counter[str] = collections.Counter()
        self.by_lp: collections.Counter[int] = collections.Counter()
        self.exits_by_reason: collections.Counter[str] = collections.Counter()
        self.inverse_calls: collections.Counter[str] = collections.Counter()
        self.first_time: int | None = None
        self.last_time: int | None = None
        self._counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._by_symbol: collections.Counter[str | None] = collections.Counter()

    def _time(self, time: int) -> None:
        self.first_time = time if self.first_time is None else min(self.first_time, time)
        self.last_time = time if self.last_time is None else max(self.last_time, time)

    def instruction(self, line: TracedInstruction) -> None:
        self._counts[(line.context.name, line.phase, line.lp)] += 1
        self._by_symbol[line.symbol] += 1
        time = line.time
        if self.last_time is None or time > self.last_time:
            self.last_time = time
        if self.first_time is None or time < self.first_time:
            self.first_time = time

    def add_instructions(self, context: str, phase: str, lp: int, symbol: str | None, count: int) -> None:
        """`count` instructions at once (tools/trace/lines.py counts its own)."""
        self._counts[(context, phase, lp)] += count
        self._by_symbol[symbol] += count

    def add_times(self, first: int | None, last: int | None) -> None:
        if first is not None:
            self._time(first)
        if last is not None:
            self._time(last)

    def _tally(self) -> None:
        """Instructions by context, phase and LP, from the counts by all three at once."""
        self.by_context.clear(), self.by_phase.clear(), self.by_lp.clear()
        for (context, phase, lp), count in self._counts.items():
            self.by_context[context] += count
            self.by_phase[phase] += count
            self.by_lp[lp] += count
        self.instructions = sum(self._counts.values())

    def event(self, line: TracedEvent) -> None:
        self.events += 1
        self._time(line.time)
        if line.kind == "vm-exit":
            self.exits_by_reason[line.data["reason_name"]] += 1
        elif line.kind == "vmcallr":
            self.inverse_calls[f"{line.data['call']} {line.data['call_name']}"] += 1

    def as_dict(self) -> dict:
        self._tally()
        return {
            "instructions": self.instructions, "events": self.events,
            "first_time": self.first_time, "last_time": self.last_time,
            "instructions_by_lp": {str(lp): count for lp, count in sorted(self.by_lp.items())},
            "instructions_by_context": dict(sorted(self.by_context.items())),
            "instructions_by_phase": dict(sorted(self.by_phase.items())),
            "exits_by_reason": dict(sorted(self.exits_by_reason.items())),
            "inverse_calls_by_number": dict(sorted(self.inverse_calls.items())),
            "instructions_by_routine": self.by_routine(),
        }

    def by_routine(self) -> dict[str, int]:
        """Instructions per routine (symbol without its local label and offset), the busiest first."""
        counts: collections.Counter[str] = collections.Counter()
        for symbol, count in self._by_symbol.items():
            counts[routine(symbol)] += count
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def lines(self) -> list[str]:
        """The summary as text, one figure per line."""
        figures = self.as_dict()
        out = [f"instructions traced: {self.instructions}, events: {self.events}, virtual time "
               f"{self.first_time} to {self.last_time}"]
        for title, key in (("instructions by context", "instructions_by_context"),
                           ("instructions by phase", "instructions_by_phase"),
                           ("VM exits by reason", "exits_by_reason"),
                           ("inverse hypercalls by call number", "inverse_calls_by_number")):
            table = figures[key]
            out.append(f"{title}:" + ("" if table else " none"))
            width = max((len(name) for name in table), default=0)
            out += [f"  {name:<{width}}  {count:>12}" for name, count in table.items()]
        busiest = list(figures["instructions_by_routine"].items())[:ROUTINES_PRINTED]
        out.append(f"busiest routines (of {len(figures['instructions_by_routine'])}):" + ("" if busiest else " none"))
        width = max((len(name) for name, _ in busiest), default=0)
        out += [f"  {name:<{width}}  {count:>12}" for name, count in busiest]
        return out
