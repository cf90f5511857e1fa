"""What one run of an exercise gave the grader: console, machine stop and events, final state, and the hole it stopped at."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emu.machine import Machine, MachineStop


@dataclass
class LabRun:
    """One run of a student's exercise on the seed `seed`. `values` holds what the grader chose from
    the seed (addresses, challenges) for tests to compare with; `machine` is the machine as it
    stopped (None when the sources did not build)."""

    seed: int
    values: dict[str, int] = field(default_factory=dict)
    console: str = ""
    stop: MachineStop | None = None
    events: list = field(default_factory=list)
    machine: Machine | None = None
    build_error: str | None = None     # the assembler's message when the sources do not build
    hole: str | None = None            # "not yet implemented: E#n-m at file:line (symbol)"
    extra: dict[str, Any] = field(default_factory=dict)   # what an exercise's own run adds
    ending: str = ""                   # how a run without a machine stop ended (a reading exercise)
    notes: list[str] = field(default_factory=list)       # lines `hhr lab run` prints after the console

    def events_of(self, kind: str) -> list:
        return [event for event in self.events if event.kind == kind]

    def entry_failure(self) -> str | None:
        """The machine's explanation of the latest failed VM entry (the check and why), if any
        (docs/machine.md 7.7.1)."""
        failed = self.events_of("vm-entry-failed")
        return failed[-1].data["message"] if failed else None

    def ended_abnormally(self) -> bool:
        """Not built, stopped at a hole, or stopped otherwise than by the program's own debug exit."""
        if self.build_error is not None or self.hole is not None:
            return True
        return not self.ending if self.stop is None else self.stop.reason != "debug-exit"

    def summary(self) -> str:
        """One line: how the run ended."""
        if self.build_error is not None:
            return f"the sources do not build: {self.build_error}"
        if self.hole is not None:
            return self.hole
        if self.stop is None:
            return self.ending or "the run did not start"
        line = f"machine stop: {self.stop.reason}"
        if self.stop.exit_status is not None:
            line += f", exit status {self.stop.exit_status}"
        if self.stop.report:
            line += f"\n{self.stop.report}"
        if self.entry_failure() is not None:
            line += f"\na VM entry failed: {self.entry_failure()}"
        return line
