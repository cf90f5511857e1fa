"""The machine's event stream: every VM transition, VMX instruction, device access and fault, in order."""
from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Callable


class EventKind(str, enum.Enum):
    """Every kind of event the machine publishes, with the data each carries (docs/machine.md 9.1
    describes them; a test keeps that table and this list the same). A kind is its string: code may
    compare an event's kind with either."""

    def __new__(cls, value: str, keys: tuple[str, ...]):
        member = str.__new__(cls, value)
        member._value_ = value
        member.keys = frozenset(keys)
        return member

    VMXON = ("vmxon", ("region", "ok"))
    VMXOFF = ("vmxoff", ())
    VMCLEAR = ("vmclear", ("vmcs",))
    VMPTRLD = ("vmptrld", ("vmcs",))
    VM_ENTRY = ("vm-entry", ("vmcs", "launch", "rip"))
    VM_EXIT = ("vm-exit", ("vmcs", "reason", "qualification", "rip"))
    VM_ENTRY_FAILED = ("vm-entry-failed", ("vmcs", "check", "message"))
    VMFAIL = ("vmfail", ("error",))
    VMCALLR = ("vmcallr", ("vmcs", "call"))
    VMCALLR_RETURN = ("vmcallr-return", ("vmcs", "ok", "result", "exit_reason"))
    INVEPT = ("invept", ("type", "eptp"))
    CR3_WRITE = ("cr3-write", ("old", "new", "rip", "context"))
    EXCEPTION = ("exception", ("vector", "rip", "error_code"))
    INTERRUPT = ("interrupt", ("vector", "rip", "error_code"))
    PAGE_FAULT = ("page-fault", ("rip", "address", "error_code"))
    DELIVERY_FAULT = ("delivery-fault", ("vector", "fault_vector"))
    TRIPLE_FAULT = ("triple-fault", ("rip",))
    MACHINE_CHECK = ("machine-check", ("message",))
    HLT = ("hlt", ("rip",))
    IPI = ("ipi", ("vector", "to"))
    IO_IN = ("io-in", ("port", "size", "value"))
    IO_OUT = ("io-out", ("port", "size", "value"))
    DOORBELL = ("doorbell", ("words",))
    INJECT = ("inject", ("vmcs", "vector", "type"))
    RESTART_PHASE = ("restart-phase", ("phase",))
    DISK = ("disk", ("command", "block", "count", "address", "status", "completion"))
    RESET = ("reset", ("previous_instructions",))
    DMA = ("dma", ("device", "command", "block", "count", "buffer", "status", "completion"))
    IOMMU_FAULT = ("iommu-fault", ("device", "address", "write", "reason"))


EVENT_KINDS = frozenset(kind.value for kind in EventKind)


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


RECENT_EVENTS_KEPT = 32


class EventStream:
    """Publishes events to subscribers; keeps them in a list only while recording is on, and always
    the last few as plain tuples (for failure reports) without building Event objects."""

    def __init__(self, record: bool = False):
        self.recording = record
        self.events: list[Event] = []
        self._subscribers: list[Callable[[Event], None]] = []
        self._kinds: list[frozenset[str] | None] = []        # what each subscriber takes (None: all)
        self._wanted: frozenset[str] | None = frozenset()   # kinds some subscriber takes (None: all)
        self._seq = 0
        self._recent: collections.deque[tuple] = collections.deque(maxlen=RECENT_EVENTS_KEPT)
        # Called before each event is published: a producer that buffers events (the C transition
        # loop) flushes them here, so the stream stays in order.
        self.before_publish: Callable[[], None] | None = None

    def subscribe(self, callback: Callable[[Event], None], kinds: frozenset[str] | None = None) -> None:
        """`callback` gets every event, or only those of `kinds` (no Event is made for the others)."""
        unknown = set(kinds or ()) - EVENT_KINDS
        if unknown:
            raise ValueError(f"no such event kind: {', '.join(sorted(unknown))} (emu/events.py EventKind)")
        self._subscribers.append(callback)
        self._kinds.append(kinds)
        self._update_wanted()

    def unsubscribe(self, callback: Callable[[Event], None]) -> None:
        index = self._subscribers.index(callback)         # ValueError if it is not subscribed
        del self._subscribers[index], self._kinds[index]
        self._update_wanted()

    def _update_wanted(self) -> None:
        self._wanted = None if any(kinds is None for kinds in self._kinds) else frozenset().union(*self._kinds)

    def save_state(self) -> tuple:
        """What a snapshot keeps of the stream: the sequence number, how many events were recorded,
        and the last few (emu/snapshot.py)."""
        return self._seq, len(self.events), list(self._recent)

    def restore_state(self, state: tuple) -> None:
        """Back to a saved state: events recorded since are dropped; subscribers stay."""
        self._seq, recorded, recent = state
        del self.events[recorded:]
        self._recent.clear()
        self._recent.extend(recent)

    def recent(self) -> list[Event]:
        """The last RECENT_EVENTS_KEPT events, oldest first."""
        return [Event(*entry) for entry in self._recent]

    def publish(self, time: int, lp: int, kind: str, **data: Any) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"no such event kind: {kind!r} (emu/events.py EventKind)")
        if self.before_publish is not None:
            self.before_publish()
        seq = self._seq
        self._seq = seq + 1
        self._recent.append((seq, time, lp, kind, data))
        if not self.recording and self._wanted is not None and kind not in self._wanted:
            return
        event = Event(seq, time, lp, kind, data)
        if self.recording:
            self.events.append(event)
        for callback, kinds in zip(self._subscribers, self._kinds):
            if kinds is None or kind in kinds:
                callback(event)
