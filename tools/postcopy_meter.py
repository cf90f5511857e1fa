"""A post-copy's cost after its commit: each demand fetch (the VP that waited, and for how long), the windows fetched whole before a partition with a device ran, the background drain until the old hypervisor is drained and freed, and whether every mapping the old hypervisor sent afterwards is the one it held at the blackout."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.events import Event, EventKind
from emu.vmx_defs import ExitReason
from hypervisors import memory_state, transfer
from hypervisors.boot import Booted
from hypervisors.timeline import Transition
from tools.digest_check import message_in_area, records_of
from tools.host_clock import HostClock

EVENT_KINDS = frozenset({EventKind.VM_EXIT.value, EventKind.VM_ENTRY.value, EventKind.VMCALLR.value,
                         EventKind.VMCALLR_RETURN.value})
FETCH_CALLS = (transfer.Call.FETCH_NEXT, transfer.Call.FETCH_TABLE)
DRAIN_ENDS = {transfer.Phase.DRAINED: "drained", transfer.Phase.DRAIN_FAILED: "failed"}
# A partition with an assigned device gets its whole window before a VP of it runs (postcopy.inc,
# postcopy_device_window): tables fetched between some VP's exit and another VP's entry.
DEVICE_WINDOW = "device-window"
DEVICE_WINDOW_FLAG = "device_window_fetching"          # the hypervisor's variable: 1 while it fetches those


@dataclass
class DemandFetch:
    """One page table of a window fetched because a VP needed it: from the VP's VM exit (an EPT
    violation, or a map or unmap hypercall) to the fetch's return (the table is there), and to the
    VP's next VM entry (a fetch longer than a quantum ends the VP's slice: the LP's other VPs run
    first), on its LP's clock."""

    partition: int
    vp: int
    lp: int
    cause: str                          # "ept-violation", "hypercall", or DEVICE_WINDOW
    exit_time: int
    fetched_time: int | None = None
    entry_time: int | None = None
    tables: int = 1                     # tables fetched before the VP entered (several for DEVICE_WINDOW)

    @property
    def latency(self) -> int | None:
        return None if self.entry_time is None else self.entry_time - self.exit_time

    @property
    def fetch_ticks(self) -> int | None:
        return None if self.fetched_time is None else self.fetched_time - self.exit_time


@dataclass
class PostcopyMeter:
    """Subscribe `on_event` to the machine's events (EVENT_KINDS) and `on_transition` to the restart
    timeline; the `booted` view must be on the new hypervisor from RESUMED on (RestartRecorder moves it).
    What it reads for itself (the windows at the blackout, each fetched message) is out of `clock`'s time."""

    booted: Booted
    clock: HostClock = field(default_factory=HostClock)
    held: dict[int, dict[int, int]] | None = None          # the old windows at the blackout: partition: {gpa: hpa}
    resumed_at: int | None = None
    ended_at: int | None = None
    outcome: str | None = None                             # "drained" or "failed" once over
    status: int | None = None
    detail: int | None = None
    fetches: list[DemandFetch] = field(default_factory=list)
    sent: dict[tuple[int, int], int] = field(default_factory=dict)    # (partition, gpa): hpa, from FETCH_NEXT
    mismatches: list[tuple[int, int, int]] = field(default_factory=list)   # (partition, gpa, hpa) not as held
    records_fetched: dict[str, int] = field(default_factory=dict)
    _last_exit: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # LP: (vmcs, reason, time)
    _calls: dict[int, int] = field(default_factory=dict)                     # LP: the call under way
    _waiting: dict[int, tuple[int, DemandFetch]] = field(default_factory=dict)  # LP: (vmcs, its fetch)
    _device_windows: dict[int, DemandFetch] = field(default_factory=dict)     # LP: a window under way
    _vps: dict[int, tuple[int, int]] = field(default_factory=dict)            # VMCS: (partition, VP)

    def on_transition(self, transition: Transition) -> None:
        phase = transition.phase
        if phase == transfer.Phase.BLACKOUT:
            with self.clock.excluded():
                self.held = {number: dict(window)
                             for number, window in memory_state.read(self.booted).windows.items()}
        elif phase == transfer.Phase.RESUMED:
            self.resumed_at = transition.time
            self._vps = {record.fields["vmcs"]: (record.partition, record.fields["index"])
                         for record in self.booted.vp_records()}
        elif phase in DRAIN_ENDS:
            self.ended_at, self.outcome = transition.time, DRAIN_ENDS[phase]
            if phase == transfer.Phase.DRAIN_FAILED:
                self.status, self.detail = self.booted.restart_status, self.booted.restart_detail

    @property
    def waiting(self) -> bool:
        """A VP that waited for a fetch has not entered again yet."""
        return bool(self._waiting)

    def on_event(self, event: Event) -> None:
        kind, lp = event.kind, event.lp
        if self.resumed_at is None or (self.outcome is not None and kind != EventKind.VM_ENTRY):
            return
        if kind == EventKind.VM_EXIT:
            if event.data["vmcs"] in self._vps:      # a guest's VP (not a drain VP's launch)
                self._last_exit[lp] = (event.data["vmcs"], event.data["reason"], event.time)
        elif kind == EventKind.VMCALLR:
            self._calls[lp] = event.data["call"]
            if event.data["call"] != transfer.Call.FETCH_TABLE:
                pass
            elif self.booted.read_qword(DEVICE_WINDOW_FLAG):     # (drain_lock held: it is this LP's)
                if lp in self._device_windows:
                    self._device_windows[lp].tables += 1
                else:
                    self._device_windows[lp] = DemandFetch(-1, -1, lp, DEVICE_WINDOW, event.time)
                    self.fetches.append(self._device_windows[lp])
            elif lp in self._last_exit:
                vmcs, reason, time = self._last_exit.pop(lp)
                partition, vp = self._vps.get(vmcs, (-1, -1))
                cause = "ept-violation" if reason == ExitReason.EPT_VIOLATION else "hypercall"
                fetch = DemandFetch(partition, vp, lp, cause, time)
                self.fetches.append(fetch)
                self._waiting[lp] = (vmcs, fetch)
        elif kind == EventKind.VMCALLR_RETURN:
            call = self._calls.pop(lp, None)
            if call == transfer.Call.FETCH_TABLE and lp in self._waiting:
                self._waiting[lp][1].fetched_time = event.time
            if call in FETCH_CALLS and event.data["ok"] and event.data["result"] == transfer.Reply.ACCEPT:
                with self.clock.excluded():
                    self._read_fetch(call)
        elif kind == EventKind.VM_ENTRY and event.data["vmcs"] in self._vps:
            if lp in self._device_windows:           # the VP whose partition's window came whole first
                fetch = self._device_windows.pop(lp)
                fetch.partition, fetch.vp = self._vps[event.data["vmcs"]]
                fetch.entry_time = event.time
            if lp in self._waiting and event.data["vmcs"] == self._waiting[lp][0]:
                self._waiting.pop(lp)[1].entry_time = event.time

    def _read_fetch(self, call: int) -> None:
        """The message a fetch left in the transfer area: its MAP records against the old windows."""
        for name, fields in records_of(message_in_area(self.booted)):
            self.records_fetched[name] = self.records_fetched.get(name, 0) + 1
            if name != "map":
                continue
            partition, gpa, hpa = fields["partition"], fields["gpa"], fields["hpa"]
            if self.held is not None and self.held.get(partition, {}).get(gpa) != hpa:
                self.mismatches.append((partition, gpa, hpa))
            if call == transfer.Call.FETCH_NEXT:
                self.sent[(partition, gpa)] = hpa

    def mappings_as_held(self) -> bool | None:
        """Every mapping sent after the commit is the one held at the blackout, and the background sent
        every one of them (None until the drain is over)."""
        if self.outcome != "drained" or self.held is None:
            return None
        held = {(partition, gpa): hpa for partition, window in self.held.items() for gpa, hpa in window.items()}
        return not self.mismatches and self.sent == held

    def report(self) -> dict:
        demand = [fetch for fetch in self.fetches if fetch.cause != DEVICE_WINDOW]
        latencies = [fetch.latency for fetch in demand if fetch.latency is not None]
        fetch_ticks = [fetch.fetch_ticks for fetch in demand if fetch.fetch_ticks is not None]
        per_partition: dict[int, int] = {}
        for fetch in demand:
            per_partition[fetch.partition] = per_partition.get(fetch.partition, 0) + 1
        return {
            "outcome": self.outcome or "unfinished",
            "reason": None if self.status is None else transfer.Status(self.status).name.lower(),
            "detail": self.detail,
            "drain_ticks": None if self.ended_at is None or self.resumed_at is None
            else self.ended_at - self.resumed_at,
            "demand_fetches": len(demand),
            "demand_fetches_per_partition": dict(sorted(per_partition.items())),
            "demand_latency_ticks": {"max": max(latencies, default=None),
                                     "mean": sum(latencies) // len(latencies) if latencies else None,
                                     "fetch_max": max(fetch_ticks, default=None),
                                     "fetch_mean": sum(fetch_ticks) // len(fetch_ticks) if fetch_ticks else None,
                                     "per_fetch": [{"partition": fetch.partition, "vp": fetch.vp, "lp": fetch.lp,
                                                    "cause": fetch.cause, "ticks": fetch.latency,
                                                    "fetch_ticks": fetch.fetch_ticks}
                                                   for fetch in demand]},
            "device_windows": [{"partition": fetch.partition, "vp": fetch.vp, "lp": fetch.lp, "tables": fetch.tables,
                                "ticks": fetch.latency} for fetch in self.fetches if fetch.cause == DEVICE_WINDOW],
            "records_fetched": dict(sorted(self.records_fetched.items())),
            "mappings_as_held": self.mappings_as_held(),
        }
