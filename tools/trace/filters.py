"""What of the window a trace writes: LPs, contexts, a protocol phase, a symbol, a range of virtual time, events only."""
from __future__ import annotations

from dataclasses import dataclass, field

from tools.trace.symbols import matches


@dataclass
class Filters:
    """Each filter that is set must hold. `lps`, `phases` and `time_range` select events too;
    `contexts` and `symbols` select instructions only (events are kept); `events_only` drops every
    instruction line. A context's registers loaded while it did not run go with its instructions
    (the symbol: where it resumes)."""

    lps: frozenset[int] = frozenset()
    contexts: frozenset[str] = frozenset()
    phases: frozenset[str] = frozenset()
    symbols: tuple[str, ...] = ()
    time_range: tuple[int, int] | None = None
    events_only: bool = False
    needs_symbols: bool = field(init=False)

    def __post_init__(self):
        self.needs_symbols = bool(self.symbols)

    def describe(self) -> dict:
        return {"lp": sorted(self.lps), "context": sorted(self.contexts), "phase": sorted(self.phases),
                "symbol": list(self.symbols), "range": list(self.time_range) if self.time_range else None,
                "events_only": self.events_only}

    def instruction(self, lp: int, context: str, phase: str, time: int, symbol: str | None) -> bool:
        """What `event` asks of an event, and the context and symbol filters."""
        if self.events_only or not self.event(lp, phase, time):
            return False
        if self.contexts and context not in self.contexts:
            return False
        if self.symbols and not any(matches(symbol, wanted) for wanted in self.symbols):
            return False
        return True

    def instruction_site(self, context: str, symbol: str | None) -> bool:
        """The context and symbol filters alone (what is the same every time an instruction runs)."""
        if self.contexts and context not in self.contexts:
            return False
        return not self.symbols or any(matches(symbol, wanted) for wanted in self.symbols)

    def event(self, lp: int, phase: str, time: int) -> bool:
        if self.lps and lp not in self.lps:
            return False
        if self.phases and phase not in self.phases:
            return False
        if self.time_range is not None and not self.time_range[0] <= time < self.time_range[1]:
            return False
        return True
