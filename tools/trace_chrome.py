"""Chrome Trace Event JSON of a run for the Perfetto UI: hot-restart phases, LPs, VPs, exits, inverse hypercalls.

Subscribe a `ChromeTraceWriter` to `machine.events` and `close()` it at the end; the file opens in
the Perfetto UI (docs/tracing-perfetto.md says how, offline, and what every track means):

- process `hot restart protocol`: thread `phases` (a `hot restart n` slice with the protocol's
  phases, transfer.Phase, inside it, as hypervisors/timeline.py reads them; RESUMED an instant at its end) and thread `inverse
  hypercalls` (each VMCALLR, from the call to the new hypervisor's VMCALL back);
- process `LP n`: thread `phase` (a slice per phase this LP was in, as the timeline's `LpPhases`
  reads them: the other LPs stay in BLACKOUT while LP 0 commits, then devirtualize and resume on
  their own), thread `root` (the hypervisor in charge: the old one until its VMXOFF in
  DEVIRTUALIZE, then the new one; VMX instructions, MOV to CR3, doorbell, IPIs, faults as
  instants) and thread `guest mode` (each VM entry to its VM exit, named by the VP that ran);
- process `partition n: name`, thread `VP i`: the same runs on the VP's own track, so its blackout
  is the gap; VM exits as instants named by exit reason (qualification in args), injections;
- process `service partition`, thread `service VP`: the new hypervisor booting in its service
  partition and serving each inverse call.

Time: one tick (one retired instruction, docs/machine.md 1.3) is drawn as one nanosecond: `ts` and
`dur` are microseconds written as exact decimals, so every tick keeps its own time stamp and the
machine's order. Each event carries its own LP's clock; LPs' clocks differ by up to a quantum
within a round (docs/machine.md 3.2), so tracks of different LPs can be shifted by that much. Where
one LP waits for another the drawing respects causality: when an LP enters a phase by its own
event (its devirtualization after the commit, its first VM entry under the new hypervisor: the
timeline's `LpPhases`) before, on its clock, the last phase LP 0 announced, that LP's track is
drawn from there on later by the difference (`lp_shifts` in the metadata: LP -> ticks), so no LP's
VMXOFF is drawn before the commit.

Output is deterministic (virtual time only, keys sorted) and streamed: a slice is written when it
ends, and only the slices still open are held in memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

from emu.events import Event
from emu.vmx_defs import ExitReason
from hypervisors import transfer
from hypervisors.timeline import LpTransition, Outcome, RestartTimeline, Transition

if TYPE_CHECKING:
    from hypervisors.boot import Booted

TICKS_PER_MICROSECOND = 1000            # one tick drawn as one nanosecond; Chrome's ts unit is the microsecond
MICROSECOND_FRACTION_DIGITS = 3         # the digits after the point that hold a tick exactly
DISPLAY_TIME_UNIT = "ns"

# Perfetto processes (pid) and their threads. Thread ids are unique across the whole trace
# (pid * TID_STRIDE + track), since viewers differ in whether they scope a tid to its process.
RESTART_PID = 1
LP_PID_BASE = 100                       # LP n is process LP_PID_BASE + n
SERVICE_PID = 900                       # the service partition of the restart in progress
PARTITION_PID_BASE = 1000               # partition n is process PARTITION_PID_BASE + n
UNKNOWN_VMCS_PID = 9000                 # VMCSs the describer could not place: one thread each
TID_STRIDE = 1000
PHASE_TRACK, INVERSE_CALL_TRACK = 0, 1  # threads of the hot restart process
ROOT_TRACK, GUEST_TRACK, LP_PHASE_TRACK = 0, 1, 2     # threads of an LP's process
SERVICE_VP_TRACK = 0

# Arguments that are addresses or bit fields, written in hexadecimal.
HEX_ARGUMENTS = frozenset({"vmcs", "rip", "region", "old", "new", "qualification", "eptp", "address", "error_code"})

# Machine events drawn as instants on their LP's root thread (docs/machine.md 9.1). Not drawn at
# all: io-in and io-out (tens of thousands of guest clock reads and console bytes per run),
# vmptrld and invept (every scheduler pass), which the other trace formats keep.
ROOT_INSTANTS = {
    "vmxon": "VMXON", "vmxoff": "VMXOFF", "vmclear": "VMCLEAR", "cr3-write": "MOV to CR3",
    "doorbell": "doorbell", "ipi": "IPI", "hlt": "HLT", "interrupt": "interrupt", "exception": "exception",
    "page-fault": "page fault", "delivery-fault": "delivery fault", "triple-fault": "triple fault",
    "machine-check": "machine check", "vmfail": "VMfail", "vm-entry-failed": "VM entry failed",
}


@dataclass(frozen=True)
class VmcsIdentity:
    """Whose VMCS: a guest partition's VP, or the service partition's VP (`service`)."""

    partition: int
    vp: int
    name: str                           # the partition's (guest's) name
    service: bool = False


VmcsDescriber = Callable[[int], "VmcsIdentity | None"]


def booted_vmcs_describer(booted: Booted) -> VmcsDescriber:
    """Places a VMCS from the VP table of the hypervisor running now (the booted one, the new one
    once `tools.restart.RestartRecorder` has seen RESUMED) or as the old one's service VP."""
    def describe(vmcs: int) -> VmcsIdentity | None:
        records = booted.records
        ram = booted.machine.ram
        for record in booted.vp_records():
            vp, partition = record.fields, record.partition
            if vp["vmcs"] == vmcs:
                name = booted.guests[partition].name if 0 <= partition < len(booted.guests) else ""
                return VmcsIdentity(partition, vp["index"], name)
        service_vmcs = int.from_bytes(ram.read(booted.service_vp + records.vp.offset("vmcs"), 8), "little")
        if vmcs == service_vmcs:
            return VmcsIdentity(0, 0, "service partition", service=True)
        return None
    return describe


def microseconds(ticks: int) -> str:
    """Ticks as a JSON number of microseconds, exact."""
    whole, fraction = divmod(ticks, TICKS_PER_MICROSECOND)
    return f"{whole}.{fraction:0{MICROSECOND_FRACTION_DIGITS}d}"


def enum_name(enumeration: type, value: int, fallback: str) -> str:
    """A protocol or exit-reason number's name, or `fallback number` for one the enumeration lacks."""
    try:
        return enumeration(value).name
    except ValueError:
        return f"{fallback} {value}"


def exit_name(reason: int) -> str:
    """A VM exit's instant name: the basic exit reason (SDM Vol. 3D Appendix C)."""
    return enum_name(ExitReason, reason & 0xFFFF, "exit")


@dataclass
class _Run:
    """A guest run in progress on an LP: from its VM entry to its VM exit (or VMCALLR return)."""

    vmcs: int
    start: int
    name: str
    thread: tuple[int, int]             # the VP's (pid, tid)
    args: dict[str, Any]


@dataclass
class _Open:
    """A slice in progress whose end is not known yet."""

    name: str
    start: int
    lp: int                             # whose clock its start and end are read on
    args: dict[str, Any]


class ChromeTraceWriter:
    """An event subscriber that writes a Chrome Trace Event JSON file (object form) as events come."""

    def __init__(self, path_or_stream: str | IO[str], *, lps: int, metadata: dict | None = None,
                 hypervisors: Sequence[str] = (), describe_vmcs: VmcsDescriber | None = None):
        """`hypervisors`: the names of the hypervisors in the order they take over (the booted one
        first), for the root slices; `describe_vmcs`: places a VMCS in a partition
        (`booted_vmcs_describer`), else each VMCS gets a thread of its own."""
        if isinstance(path_or_stream, str):
            self._out: IO[str] = open(path_or_stream, "w", encoding="utf-8")
            self._owns_stream = True
        else:
            self._out, self._owns_stream = path_or_stream, False
        self.lps = lps
        self.metadata = {"clock": "virtual: 1 tick = 1 retired instruction, drawn as 1 ns; events on their LP's clock, "
                                  "later by lp_shifts from an LP's causal wait on",
                         "ticks_per_microsecond": TICKS_PER_MICROSECOND, "lps": lps, **(metadata or {})}
        self.hypervisors = tuple(hypervisors)
        self.describe_vmcs = describe_vmcs
        self.closed = False
        self._first_event = True
        self._named_processes: set[int] = set()
        self._named_threads: set[tuple[int, int]] = set()
        self._last_time: dict[int, int] = {}                # LP: the latest time seen on its clock
        self._generation: dict[int, int] = {}               # LP: which hypervisor runs its root (0: the booted one)
        self._root: dict[int, _Open] = {}                   # LP: the hypervisor in charge of its root mode
        self._lp_phase: dict[int, _Open] = {}               # LP: the phase it is in (LpPhases), as a slice
        self._runs: dict[int, _Run] = {}                    # LP: the guest run in progress
        self._identities: dict[int, VmcsIdentity | None] = {}
        self._unknown_vmcs_tracks: dict[int, int] = {}
        self._calls: dict[int, _Open] = {}                  # VMCS: the inverse call in progress
        self._phase_slice: _Open | None = None
        self._restart: _Open | None = None
        self._devirtualized = 0                             # restarts that reached DEVIRTUALIZE
        # The restarts among the events this writer is given (a trace's window may hold only some).
        self.timeline = RestartTimeline()
        self.timeline.subscribe(self._restart_transition)
        self.timeline.lps.subscribe(self._lp_transition)
        self._shift: dict[int, int] = {}                    # LP: ticks its track is drawn later than its clock
        self._announced_at = 0                              # when the last phase was announced, as drawn
        self._out.write('{"traceEvents":[\n')
        self._handlers: dict[str, Callable[[Event], None]] = {
            "vm-entry": self._vm_entry, "vm-exit": self._vm_exit, "vmcallr": self._vmcallr,
            "vmcallr-return": self._vmcallr_return, "inject": self._inject,
        }

    # -- the subscriber ---------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if self.closed:
            return
        self.timeline.on_event(event)                       # may shift this LP's track (`_lp_transition`)
        lp = event.lp
        shift = self._shift.get(lp, 0)
        if shift:
            event = replace(event, time=event.time + shift)
        if lp not in self._root:
            self._open_root(lp, event.time)
        self._follow_lp_phases(event.time)
        if event.time > self._last_time.get(lp, -1):
            self._last_time[lp] = event.time
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)
        elif event.kind in ROOT_INSTANTS:
            self._root_instant(event)

    __call__ = on_event

    def close(self) -> None:
        """Ends what is still open at the last time seen and completes the JSON object."""
        if self.closed:
            return
        for lp in sorted(self._runs):
            run = self._runs.pop(lp)
            self._end_run(lp, run, self._last_time[lp], {"open_at_end": True})
        for vmcs in sorted(self._calls):
            call = self._calls.pop(vmcs)
            self._complete(RESTART_PID, self._tid(RESTART_PID, INVERSE_CALL_TRACK), call.name, "restart",
                           call.start, self._last_time[call.lp], {**call.args, "open_at_end": True})
        self._end_phase(None)
        self._end_restart(None)
        for lp in sorted(self._root):
            self._end_root(lp, self._last_time[lp])
            self._end_lp_phase(lp, self._last_time[lp])
        self._out.write("\n],\n")
        self._out.write(f'"displayTimeUnit":{json.dumps(DISPLAY_TIME_UNIT)},\n')
        self._out.write(f'"metadata":{json.dumps(self.metadata, sort_keys=True, default=str)}\n}}\n')
        self.closed = True
        if self._owns_stream:
            self._out.close()
        else:
            self._out.flush()

    # -- guests -----------------------------------------------------------------------------------

    def _vm_entry(self, event: Event) -> None:
        vmcs, lp = event.data["vmcs"], event.lp
        if lp in self._runs:                                # an entry without an exit seen: end the run here
            self._end_run(lp, self._runs.pop(lp), event.time, {})
        identity = self._identity(vmcs)
        call = self._calls.get(vmcs)
        if call is not None:                                # VMCALLR enters the service VP at its inverse-call entry
            name, entry = f"serving {enum_name(transfer.Call, call.args['call'], 'call')}", "VMCALLR"
        else:
            name, entry = self._vp_label(vmcs, identity), "VMLAUNCH" if event.data.get("launch") else "VMRESUME"
        args = {"entry": entry, **self._args({key: value for key, value in event.data.items() if key != "launch"})}
        self._runs[lp] = _Run(vmcs, event.time, name, self._vp_thread(vmcs, identity), args)

    def _vm_exit(self, event: Event) -> None:
        vmcs, lp = event.data["vmcs"], event.lp
        reason = exit_name(event.data["reason"])
        run = self._runs.get(lp)
        if run is not None and run.vmcs == vmcs:
            self._end_run(lp, self._runs.pop(lp), event.time, {"exit": reason})
        pid, tid = self._vp_thread(vmcs, self._identity(vmcs))
        details = {key: value for key, value in event.data.items() if key not in ("vmcs", "reason")}
        self._instant(pid, tid, reason, "exit", event.time, self._args(details))

    def _vmcallr(self, event: Event) -> None:
        vmcs, call = event.data["vmcs"], event.data["call"]
        name = enum_name(transfer.Call, call, "call")
        self._root_instant(event, f"VMCALLR {name}")
        self._calls[vmcs] = _Open(f"VMCALLR {name}", event.time, event.lp, {"call": call, "vmcs": hex(vmcs)})

    def _vmcallr_return(self, event: Event) -> None:
        """The new hypervisor's VMCALL back (ok), or a VM-exit condition that ended the call."""
        vmcs, lp, data = event.data["vmcs"], event.lp, event.data
        if data["ok"]:
            outcome = f"reply {enum_name(transfer.Reply, data['result'], 'reply')}"
        else:
            outcome = f"ended by {exit_name(data['exit_reason'])}"
        run = self._runs.get(lp)
        if run is not None and run.vmcs == vmcs:
            self._end_run(lp, self._runs.pop(lp), event.time, {"return": outcome})
        pid, tid = self._vp_thread(vmcs, self._identity(vmcs))
        self._instant(pid, tid, f"VMCALL {outcome}" if data["ok"] else f"VMCALLR {outcome}", "vmcallr",
                      event.time, self._args(data))
        call = self._calls.pop(vmcs, None)
        if call is not None:
            self._complete(RESTART_PID, self._tid(RESTART_PID, INVERSE_CALL_TRACK), call.name, "restart",
                           call.start, event.time, {**call.args, "outcome": outcome})

    def _inject(self, event: Event) -> None:
        vmcs = event.data["vmcs"]
        pid, tid = self._vp_thread(vmcs, self._identity(vmcs))
        self._instant(pid, tid, f"inject vector {event.data['vector']}", "inject", event.time, self._args(event.data))

    def _end_run(self, lp: int, run: _Run, end: int, more: dict[str, Any]) -> None:
        """A guest run is drawn twice: on its LP's guest-mode thread (with just the VMCS, to keep
        the file small) and on its VP's thread with the details."""
        pid = self._lp_pid(lp)
        self._complete(pid, self._tid(pid, GUEST_TRACK), run.name, "guest", run.start, end, {"vmcs": run.args["vmcs"]})
        self._complete(*run.thread, run.name, "guest", run.start, end, {**run.args, **more})

    # -- root mode and the restart ----------------------------------------------------------------

    def _root_instant(self, event: Event, name: str | None = None) -> None:
        pid = self._lp_pid(event.lp)
        self._instant(pid, self._tid(pid, ROOT_TRACK), name or ROOT_INSTANTS[event.kind], "root", event.time,
                      self._args(event.data))
        if event.kind == "vmxoff" and self._generation[event.lp] < self._devirtualized:
            # The old hypervisor's last instruction on this LP is the jump to the new one's take-over entry.
            # (Another LP's VMXOFF can come after the new hypervisor wrote RESUMED on LP 0.)
            self._end_root(event.lp, event.time)
            self._generation[event.lp] += 1
            self._begin_root(event.lp, event.time)

    def _open_root(self, lp: int, time: int) -> None:
        pid = self._lp_pid(lp)
        self._name_process(pid, f"LP {lp}")
        self._name_thread(pid, self._tid(pid, ROOT_TRACK), "root")
        self._name_thread(pid, self._tid(pid, GUEST_TRACK), "guest mode")
        self._name_thread(pid, self._tid(pid, LP_PHASE_TRACK), "phase")
        self._generation[lp] = 0
        self._begin_root(lp, time)
        self._begin_lp_phase(lp, time)

    def _begin_root(self, lp: int, time: int) -> None:
        generation = self._generation[lp]
        self._root[lp] = _Open(self._hypervisor_label(generation), time, lp, {"generation": generation})

    def _end_root(self, lp: int, time: int) -> None:
        root = self._root[lp]
        pid = self._lp_pid(lp)
        self._complete(pid, self._tid(pid, ROOT_TRACK), root.name, "root", root.start, time, root.args)

    def _begin_lp_phase(self, lp: int, time: int) -> None:
        value = self.timeline.lp_value(lp)
        self._lp_phase[lp] = _Open(enum_name(transfer.Phase, value, "phase"), time, lp, {"phase": value})

    def _end_lp_phase(self, lp: int, time: int) -> None:
        phase = self._lp_phase[lp]
        pid = self._lp_pid(lp)
        self._complete(pid, self._tid(pid, LP_PHASE_TRACK), phase.name, "lp-phase", phase.start, time, phase.args)

    def _follow_lp_phases(self, time: int) -> None:
        """After an event, every LP whose phase it changed (an announcement moves several, an LP's
        own event only that LP) ends its phase slice and begins the next at the event's time as
        drawn, never before the slice it ends began (LPs' clocks differ within a round)."""
        for lp in sorted(self._lp_phase):
            phase = self._lp_phase[lp]
            if self.timeline.lp_value(lp) != phase.args["phase"]:
                time_here = max(time, phase.start)
                self._end_lp_phase(lp, time_here)
                self._begin_lp_phase(lp, time_here)

    def _hypervisor_label(self, generation: int) -> str:
        name = f" {self.hypervisors[generation]}" if generation < len(self.hypervisors) else ""
        if generation == 0:
            return f"old hypervisor{name}"
        return f"new hypervisor{name}" + (f" (restart {generation})" if generation > 1 else "")

    def _lp_transition(self, transition: LpTransition) -> None:
        """An LP that enters a phase by its own event is drawn no earlier than the announcement it
        follows: its track is shifted from here on."""
        if transition.own:
            drawn = transition.time + self._shift.get(transition.lp, 0)
            if drawn < self._announced_at:
                self._shift[transition.lp] = self._announced_at - transition.time
                self.metadata["lp_shifts"] = {str(lp): shift for lp, shift in sorted(self._shift.items())}

    def _restart_transition(self, transition: Transition) -> None:
        """Each phase is a slice from its transition to the next; the restart's end (its timeline
        says when) closes it, RESUMED (the new hypervisor runs guests) drawn as its last mark."""
        transition = replace(transition, time=transition.time + self._shift.get(transition.lp, 0))
        self._announced_at = max(self._announced_at, transition.time)
        self._name_process(RESTART_PID, "hot restart protocol")
        self._name_thread(RESTART_PID, self._tid(RESTART_PID, PHASE_TRACK), "phases")
        self._name_thread(RESTART_PID, self._tid(RESTART_PID, INVERSE_CALL_TRACK), "inverse hypercalls")
        self._end_phase(transition.time)
        if transition.phase == transfer.Phase.DEVIRTUALIZE:
            self._devirtualized += 1
        tid = self._tid(RESTART_PID, PHASE_TRACK)
        if transition.begins:
            self._restart = _Open(f"hot restart {transition.restart}", transition.time, transition.lp,
                                  {"restart": transition.restart})
        if not transition.ongoing:
            if transition.ending is not None and transition.ending.outcome == Outcome.COMMITTED:
                self._instant(RESTART_PID, tid, transition.name, "phase", transition.time, {"phase": transition.value})
            self._end_restart(transition.time)
            self._identities.clear()                        # the next hypervisor's VMCSs are its own
        else:
            self._phase_slice = _Open(transition.name, transition.time, transition.lp, {"phase": transition.value})

    def _end_restart(self, time: int | None) -> None:
        """The restart's own slice, around its phases (Perfetto nests X slices that start together
        by duration, the longest outside)."""
        if self._restart is not None:
            restart = self._restart
            end = self._last_time[restart.lp] if time is None else time
            self._complete(RESTART_PID, self._tid(RESTART_PID, PHASE_TRACK), restart.name, "restart", restart.start,
                           end, restart.args)
            self._restart = None

    def _end_phase(self, time: int | None) -> None:
        if self._phase_slice is not None:
            phase = self._phase_slice
            end = self._last_time[phase.lp] if time is None else time
            self._complete(RESTART_PID, self._tid(RESTART_PID, PHASE_TRACK), phase.name, "phase", phase.start, end,
                           phase.args)
            self._phase_slice = None

    # -- tracks -----------------------------------------------------------------------------------

    def _identity(self, vmcs: int) -> VmcsIdentity | None:
        if vmcs not in self._identities:
            self._identities[vmcs] = self.describe_vmcs(vmcs) if self.describe_vmcs is not None else None
        return self._identities[vmcs]

    def _vp_label(self, vmcs: int, identity: VmcsIdentity | None) -> str:
        if identity is None:
            return f"VMCS {vmcs:#x}"
        if identity.service:
            generation = self._generation.get(0, 0) + 1
            name = self.hypervisors[generation] if generation < len(self.hypervisors) else "new hypervisor"
            return f"{name} in service partition"
        owner = identity.name or f"partition {identity.partition}"
        return f"{owner} VP {identity.vp}"

    def _vp_thread(self, vmcs: int, identity: VmcsIdentity | None) -> tuple[int, int]:
        if identity is None:
            track = self._unknown_vmcs_tracks.setdefault(vmcs, len(self._unknown_vmcs_tracks))
            pid, tid = UNKNOWN_VMCS_PID, self._tid(UNKNOWN_VMCS_PID, track)
            self._name_process(pid, "VMCS without a known VP")
            self._name_thread(pid, tid, f"VMCS {vmcs:#x}")
        elif identity.service:
            pid, tid = SERVICE_PID, self._tid(SERVICE_PID, SERVICE_VP_TRACK)
            self._name_process(pid, "service partition")
            self._name_thread(pid, tid, "service VP")
        else:
            pid = PARTITION_PID_BASE + identity.partition
            tid = self._tid(pid, identity.vp)
            label = f"partition {identity.partition}" + (f": {identity.name}" if identity.name else "")
            self._name_process(pid, label)
            self._name_thread(pid, tid, f"VP {identity.vp}")
        return pid, tid

    @staticmethod
    def _lp_pid(lp: int) -> int:
        return LP_PID_BASE + lp

    @staticmethod
    def _tid(pid: int, track: int) -> int:
        return pid * TID_STRIDE + track

    # Names come as `M` events the first time a track is used. The sort indexes order the tracks in
    # Chrome's own trace viewer; Perfetto orders tracks itself.
    def _name_process(self, pid: int, name: str) -> None:
        if pid not in self._named_processes:
            self._named_processes.add(pid)
            self._write({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
            self._write({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})

    def _name_thread(self, pid: int, tid: int, name: str) -> None:
        if (pid, tid) not in self._named_threads:
            self._named_threads.add((pid, tid))
            self._write({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            self._write({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})

    # -- output -----------------------------------------------------------------------------------

    @staticmethod
    def _args(data: dict[str, Any]) -> dict[str, Any]:
        return {key: hex(value) if key in HEX_ARGUMENTS and isinstance(value, int) else value
                for key, value in data.items()}

    def _complete(self, pid: int, tid: int, name: str, category: str, start: int, end: int,
                  args: dict[str, Any]) -> None:
        self._write({"ph": "X", "name": name, "cat": category, "pid": pid, "tid": tid, "ts": start,
                     "dur": max(end - start, 0), "args": args})

    def _instant(self, pid: int, tid: int, name: str, category: str, time: int, args: dict[str, Any]) -> None:
        self._write({"ph": "i", "s": "t", "name": name, "cat": category, "pid": pid, "tid": tid, "ts": time,
                     "args": args})

    def _write(self, record: dict[str, Any]) -> None:
        """One trace event on a line of its own; ts and dur (ticks here) become exact microseconds."""
        fields = []
        for key, value in record.items():
            text = microseconds(value) if key in ("ts", "dur") else json.dumps(value, sort_keys=True, default=str)
            fields.append(f'"{key}":{text}')
        self._out.write(("" if self._first_event else ",\n") + "{" + ",".join(fields) + "}")
        self._first_event = False
