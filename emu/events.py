"""The machine's event stream: every VM transition, VMX instruction, device access and fault, in order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    """One machine event: its sequence number, the LP's virtual time, the LP, a kind and details."""

    seq: int
    time: int
    lp: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_tuple(self) -> tuple:
        return (self.seq, self.time, self.lp, self.kind, tuple(sorted(self.data.items())))


class EventStream:
    """Publishes events to subscribers; keeps them in a list only while recording is on."""

    def __init__(self, record: bool = False):
        self.recording = record
        self.events: list[Event] = []
        self._subscribers: list[Callable[[Event], None]] = []
        self._seq = 0

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def publish(self, time: int, lp: int, kind: str, **data: Any) -> None:
        if not self.recording and not self._subscribers:
            self._seq += 1
            return
        event = Event(self._seq, time, lp, kind, data)
        self._seq += 1
        if self.recording:
            self.events.append(event)
        for callback in self._subscribers:
            callback(event)
