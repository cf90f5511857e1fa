"""What each restart phase cost: virtual and host time, instructions, inverse hypercalls and bytes sent, marked at every phase transition."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.disk import DISK_BLOCK_SIZE, DiskCommand
from emu.events import Event, EventKind
from hypervisors import transfer
from hypervisors.boot import Booted
from hypervisors.timeline import RestartTimeline, Transition
from tools.host_clock import HostClock

EVENT_KINDS = frozenset({EventKind.VMCALLR.value, EventKind.DISK.value})
SUSPEND_SENDING_PHASES = (transfer.Phase.INVARIANTS, transfer.Phase.BLACKOUT)   # a suspend writes its messages then


@dataclass
class PhaseMark:
    phase: transfer.Phase | None
    name: str
    virtual_time: int
    host_time: float
    instructions: int
    inverse_calls: int
    bytes_sent: int


@dataclass
class PhaseMeter:
    """Counts inverse hypercalls and the bytes their messages (or a suspend's disk writes) carry,
    and marks the counters at each of the timeline's transitions; `phases()` is one row a phase.
    Subscribe `on_event` to the machine's events (EVENT_KINDS) and `on_transition` to the timeline."""

    booted: Booted
    timeline: RestartTimeline
    clock: HostClock = field(default_factory=HostClock)
    marks: list[PhaseMark] = field(default_factory=list)
    inverse_calls: int = 0
    bytes_sent: int = 0
    instruction_base: int = 0           # instructions of the machines before a reset (suspend and resume)

    def on_event(self, event: Event) -> None:
        if event.kind == EventKind.VMCALLR:
            self.inverse_calls += 1
            ram = self.booted.machine.ram
            header = transfer.TRANSFER_HEADER.unpack(ram.read(self.booted.transfer_area, transfer.TRANSFER_HEADER.size))
            self.bytes_sent += header["bytes"]
        elif event.kind == EventKind.DISK and event.data["command"] == DiskCommand.WRITE and event.data["status"] == 0 \
                and self.timeline.phase in SUSPEND_SENDING_PHASES:
            self.bytes_sent += event.data["count"] * DISK_BLOCK_SIZE    # a suspend's messages, in whole blocks

    def on_transition(self, transition: Transition) -> None:
        self.marks.append(PhaseMark(transition.phase, transition.name, transition.time, self.clock.now(),
                                    self.instructions(), self.inverse_calls, self.bytes_sent))

    def instructions(self) -> int:
        return self.instruction_base + sum(lp.instructions for lp in self.booted.machine.lps)

    def machine_reset(self) -> None:
        """The machine is about to be replaced by a reset one: its instructions so far are kept."""
        self.instruction_base = self.instructions()

    def phases(self) -> list[dict]:
        rows = []
        for mark, following in zip(self.marks, self.marks[1:]):
            rows.append({"phase": mark.name.lower(), "virtual_start": mark.virtual_time,
                         "virtual_ticks": following.virtual_time - mark.virtual_time,
                         "host_ms": (following.host_time - mark.host_time) * 1e3,
                         "instructions": following.instructions - mark.instructions,
                         "inverse_calls": following.inverse_calls - mark.inverse_calls,
                         "bytes_sent": following.bytes_sent - mark.bytes_sent})
        return rows
