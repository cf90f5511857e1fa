"""The stretch of a run a trace covers: from an event to an event (by default the doorbell to the first guest instruction under the new hypervisor), or a range of virtual time."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_START_EVENT = "doorbell"
FIRST_NEW_GUEST_INSTRUCTION = "first-guest-instruction"   # the default end: not an event kind


class WindowError(ValueError):
    """A window argument that does not parse; the message says what is expected."""


def parse_ticks_range(text: str, option: str) -> tuple[int, int]:
    """`START:END` in ticks (END excluded) to a pair; WindowError if it is not one."""
    start, colon, end = text.partition(":")
    try:
        begin, finish = int(start.replace("_", "")), int(end.replace("_", ""))
    except ValueError:
        raise WindowError(f"{option} {text!r}: expected START:END in ticks, e.g. 5000000:5100000") from None
    if not colon or not 0 <= begin < finish:
        raise WindowError(f"{option} {text!r}: expected START:END with 0 <= START < END")
    return begin, finish


@dataclass
class Window:
    """Either events (`start_event` .. `end_event`, both included; the end defaults to the first
    guest instruction under the new hypervisor) or virtual time [start_time, end_time)."""

    start_event: str | None = DEFAULT_START_EVENT
    end_event: str = FIRST_NEW_GUEST_INSTRUCTION
    start_time: int | None = None
    end_time: int | None = None
    opened: bool = False
    closed: bool = False
    doorbell_rung: bool = False         # an event window begins at the doorbell at the earliest

    @classmethod
    def of_time(cls, start: int, end: int) -> "Window":
        return cls(start_event=None, end_event="", start_time=start, end_time=end)

    @property
    def by_time(self) -> bool:
        return self.start_time is not None

    def describe(self) -> dict:
        if self.by_time:
            return {"from_time": self.start_time, "to_time": self.end_time}
        return {"from_event": self.start_event, "to": self.end_event}

    def admits_time(self, time: int) -> bool:
        return self.start_time <= time < self.end_time

    def on_event(self, kind: str, data: dict) -> bool:
        """Follows an event window; True if the event belongs to the trace."""
        if self.by_time or self.closed:
            return False
        if kind == DEFAULT_START_EVENT:
            self.doorbell_rung = True
        if not self.opened:
            if not self.doorbell_rung or not event_matches(self.start_event, kind, data):
                return False
            self.opened = True
            return True
        if event_matches(self.end_event, kind, data):
            self.closed = True
        return True


# Event fields a `KIND:VALUE` window bound compares VALUE with (names as traces print them).
VALUE_FIELDS = ("phase_name", "reason_name", "call_name", "phase", "reason", "call")


def event_matches(bound: str, kind: str, data: dict) -> bool:
    """`KIND` matches every event of that kind; `KIND:VALUE` only those whose phase, exit reason
    or call (by name or number) is VALUE: `restart-phase:commit`, `vm-exit:VMCALL`, `vmcallr:state`."""
    wanted_kind, colon, value = bound.partition(":")
    if kind != wanted_kind:
        return False
    if not colon:
        return True
    return any(str(data[name]).lower() == value.lower() for name in VALUE_FIELDS if name in data)
