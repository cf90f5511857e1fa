"""Each VP's blackout across a restart: its last VM exit under the old hypervisor, its first VM entry under the new one, and guest memory at both ends."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from emu.events import Event, EventKind
from hypervisors import layouts, memory_state, transfer
from hypervisors.boot import Booted
from hypervisors.memory_map import PAGE_SIZE
from hypervisors.timeline import Transition
from tools.host_clock import HostClock

EVENT_KINDS = frozenset({EventKind.VM_EXIT.value, EventKind.VM_ENTRY.value})


@dataclass
class VpBlackouts:
    """Subscribe `on_event` to the machine's events (EVENT_KINDS) and `on_transition` to the restart
    timeline: the old hypervisor's VPs are read at BLACKOUT, the new one's at RESUMED (the `booted`
    view must then be on the new hypervisor), and `rows()` pairs them by partition and VP."""

    booted: Booted
    clock: HostClock = field(default_factory=HostClock)
    check_memory: bool = True           # hash guest memory at both ends of the blackout
    windows_follow: bool = False        # a post-copy: at RESUMED the windows have not come; their pages
                                        # are hashed where the old hypervisor mapped them
    last_exit: dict[int, tuple[int, float]] = field(default_factory=dict)     # VMCS: (time, host time)
    first_entry: dict[int, tuple[int, float]] = field(default_factory=dict)
    old_vps: dict[int, tuple[int, int, int]] = field(default_factory=dict)   # VMCS: (partition, index, LP)
    new_vps: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    vp_states: dict[tuple[int, int], str] = field(default_factory=dict)     # (partition, VP): at the blackout
    memory_before: tuple[str, dict] | None = None
    memory_after: tuple[str, dict] | None = None

    def start(self) -> None:
        """At the request: the exits before it have a known virtual time; their host time is taken as now."""
        now = self.clock.now()
        self.last_exit = {vmcs: (time, now) for vmcs, time in self.booted.machine.last_exits.items()}

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == EventKind.VM_EXIT:
            if not self.new_vps:
                self.last_exit[event.data["vmcs"]] = (event.time, self.clock.now())
        elif kind == EventKind.VM_ENTRY:
            vmcs = event.data["vmcs"]
            if self.new_vps and vmcs in self.new_vps and vmcs not in self.first_entry:
                self.first_entry[vmcs] = (event.time, self.clock.now())

    def on_transition(self, transition: Transition) -> None:
        if transition.phase == transfer.Phase.BLACKOUT:
            with self.clock.excluded():
                self.old_vps = self._vp_table()
                self.memory_before = guest_memory(self.booted) if self.check_memory else None
        elif transition.phase == transfer.Phase.RESUMED:
            with self.clock.excluded():
                held = self.memory_before[1] if self.windows_follow and self.memory_before else None
                self.memory_after = guest_memory(self.booted, held) if self.check_memory else None
                self.new_vps = self._vp_table()

    def _vp_table(self) -> dict[int, tuple[int, int, int]]:
        table = {}
        states = self.booted.partitions()
        for record in self.booted.vp_records():
            vp, partition = record.fields, record.partition
            table[vp["vmcs"]] = (partition, vp["index"], vp["lp"])
            if not self.new_vps and not self.vp_states.get((partition, vp["index"])):
                self.vp_states[(partition, vp["index"])] = vp_state(vp, states[partition])
        return table

    def all_back(self) -> bool:
        """Every VP that was running at the blackout has entered again under the new hypervisor (true
        when no new hypervisor has taken over)."""
        if not self.new_vps:
            return True
        entered = {identity[:2] for vmcs, identity in self.new_vps.items() if vmcs in self.first_entry}
        return all(identity[:2] in entered for identity in self.old_vps.values()
                   if self.vp_states.get(identity[:2]) == "running")

    def rows(self) -> list[dict]:
        by_identity = {identity[:2]: vmcs for vmcs, identity in self.new_vps.items()}
        rows = []
        for old_vmcs, (partition, index, lp) in sorted(self.old_vps.items(), key=lambda item: item[1]):
            new_vmcs = by_identity.get((partition, index))
            exit_mark, entry_mark = self.last_exit.get(old_vmcs), self.first_entry.get(new_vmcs)
            state = self.vp_states.get((partition, index), "running")
            row = {"partition": partition, "vp": index, "lp": lp, "state": state, "last_exit": None,
                   "first_entry": None, "blackout_ticks": None, "blackout_host_ms": None}
            if exit_mark and entry_mark and state == "running":
                row.update(last_exit=exit_mark[0], first_entry=entry_mark[0],
                           blackout_ticks=entry_mark[0] - exit_mark[0],
                           blackout_host_ms=(entry_mark[1] - exit_mark[1]) * 1e3)
            rows.append(row)
        return rows


def vp_state(vp: dict, partition: dict) -> str:
    """`running`, `waiting` (halted for its timer), `sleeping` (halted for good), `ended`: a VP's
    blackout is measured only if it was running."""
    if partition["state"] != layouts.PARTITION_RUNNING or vp["state"] != layouts.VP_RUNNABLE:
        return "ended"
    if vp["halted"]:
        return "waiting" if vp["timer_period"] else "sleeping"
    return "running"


def guest_memory(booted: Booted, windows: dict | None = None) -> tuple[str, dict]:
    """A SHA-256 of every partition's RAM and mapped pages, and every map window (gpa to host page):
    the hypervisor's own, or `windows` given."""
    digest = hashlib.sha256()
    windows = memory_state.read(booted).windows if windows is None else windows
    for number, partition in enumerate(booted.partitions()):
        digest.update(booted.machine.ram.read(partition["memory"], partition["memory_size"]))
        for gpa in sorted(windows[number]):
            digest.update(booted.machine.ram.read(windows[number][gpa], PAGE_SIZE))
    return digest.hexdigest(), {number: dict(window) for number, window in windows.items()}
