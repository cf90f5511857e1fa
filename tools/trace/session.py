"""`hhr trace`: boots and hot-restarts as `hhr restart` does, records the window to a trace file in C, and renders it in the chosen format with a summary."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from unicorn import x86_const as x86

from emu.machine import INSTRUCTION_LIMIT
from guests import catalog
from hypervisors import boot, build, transfer
from hypervisors.memory_map import GUEST_LOAD_ADDRESS
from hypervisors.timeline import RestartTimeline, Transition
from tools import restart as restart_module
from tools import run as run_module
from tools.faults import Fault
from tools.trace import annotate, render, tracefile
from tools.trace.contexts import GUEST, NEW, Classifier, HypervisorAt
from tools.trace.filters import Filters
from tools.trace.jsonl import SCHEMA_VERSION
from tools.trace.recorder import Recorder
from tools.trace.registers import REGISTER_NAMES
from tools.trace.summary import Summary
from tools.trace.symbols import Placement
from tools.trace.window import FIRST_NEW_GUEST_INSTRUCTION, Window
from tools.trace_chrome import booted_vmcs_describer

RECORDING_FORMAT = "hhrt"               # the trace file itself, rendered later with --input
FORMATS = render.FORMATS + (RECORDING_FORMAT,)
TRACED_MODES = ("precopy", "stop-and-copy", "postcopy")     # a suspend resets the machine: not one trace
TRACE_STEP = 200_000                    # instructions between the driver's looks at the window
PROGRESS_EVERY = 1_000_000              # instructions recorded between two progress lines
PHASE_INDEX_LIMIT = 255                 # phases a file names; later ones are stamped `phase-other`


@dataclass
class TraceOptions:
    """The arguments of `hhr restart` and the trace's own."""

    from_hypervisor: str = "hv1"
    to_hypervisor: str = "hv2"
    guests: list[str] = field(default_factory=lambda: ["storm,vps=2", "heartbeat", "hashchain", "timer"])
    lps: int = 2
    ram_size: int | None = None
    request_at: list[int] = field(default_factory=lambda: [restart_module.DEFAULT_REQUEST_AT])
    max_instructions: int = run_module.DEFAULT_INSTRUCTION_LIMIT
    inject: str | None = None
    mode: str = "precopy"
    format: str = "text"
    output: str | None = None           # a file (a directory for tenet); None: standard output
    window: Window = field(default_factory=Window)
    filters: Filters = field(default_factory=Filters)
    to_end: bool = False                # after the window, run on to the end as `hhr restart` does
    progress: IO[str] | None = None
    input: str | None = None            # render this trace file instead of running the machine
    record_reads: bool = False          # the file keeps memory reads too (Tenet's mr= entries)
    read_all_registers: bool = False    # read every register after every instruction (a check of the decoder)


@dataclass
class TraceResult:
    summary: Summary
    recorded: int                       # instructions recorded in the window (before filters)
    host_seconds: float                 # recording: from the window's start to its end
    outputs: list[Path]
    document: dict | None = None        # `hhr restart --json`'s document, with to_end
    render_seconds: float = 0.0         # rendering the file in the chosen format
    trace_file_bytes: int = 0


class TraceSession:
    """Follows the machine's events, opens and closes the window, arms the recorder, and adds the
    window's events, the names of its contexts and its phases to the trace file."""

    def __init__(self, booted: boot.Booted, options: TraceOptions, path: str):
        self.booted = booted
        self.machine = booted.machine
        self.options = options
        self.window = options.window
        self.instructions_wanted = not options.filters.events_only and options.format != "chrome"
        # A post-copy's default window goes on past the new guests' first instructions to the end of
        # its drain (the windows fetched after the commit): the driver closes it when the restart settles.
        self.per_lp_end = (not self.window.by_time and self.window.end_event == FIRST_NEW_GUEST_INSTRUCTION
                           and options.mode != "postcopy")
        self.recorder = Recorder(self.machine, path, self._name_vmcs, self._lp_done,
                                 record_reads=options.format == "tenet" or options.record_reads,
                                 read_all_registers=options.read_all_registers)
        self.recorder.per_lp_end = self.per_lp_end
        self.target = options.to_hypervisor
        self.timeline = RestartTimeline(phase=self.machine.io.restart_phase)
        self.timeline.subscribe(self._on_transition)
        self._phase_names: dict[int, str] = {}
        self._phase_indices: dict[int, int] = {}
        self._stamped: tuple[int, ...] = ()  # the phase values the recorder stamps with now
        self._phases_moved = True           # an LP's phase may differ from _stamped
        self.timeline.lps.subscribe(self._on_lp_transition)
        self.classifier: Classifier | None = None
        self.describe_vmcs = booted_vmcs_describer(booted)
        self._identities: dict[int, tuple | None] = {}
        self.header_written = False
        self.armed = False
        self.arm_at: int | None = None      # arm when the machine has retired this many (found by a first pass)
        self._started: float | None = None
        self._ended: float | None = None
        self._progress_mark = 0
        self.headers: list[Placement] = []
        # The default window ends on each LP at its own first guest instruction under the new
        # hypervisor (or its first HLT in the new hypervisor's root once it has resumed, for an LP
        # with no guest to run); the trace ends when every LP is done.
        self.done_lps: set[int] = set()
        self.new_root_lps: set[int] = set()

    # --- arming -----------------------------------------------------------------------------------------
    def arm(self) -> None:
        """Between runs: the recorder's hooks go in (if instructions are wanted), and the C
        transition loop hands back at every VM transition, so that each is published where it
        happens."""
        if self.armed:
            return
        self.armed = True
        if self.classifier is None:
            self._describe()
        self._write_header()
        self._sync_phases()
        self.recorder.install(instructions=self.instructions_wanted)
        if self.window.by_time:
            self.recorder.set_time_window(self.window.start_time, self.window.end_time)
            self.recorder.recording = True

    def disarm(self) -> None:
        """Between runs: hooks out, the machine as it was."""
        if not self.armed:
            return
        self.recorder.remove()
        self.armed = False

    def _describe(self) -> None:
        """The hypervisors where they run now: the running one, and the target in its service region."""
        booted, ram = self.booted, self.machine.ram
        old_name, new_name = booted.hypervisor, self.target
        old = HypervisorAt(old_name, Placement(old_name, build.image(old_name), booted.image_base))
        service_region = old.qword(ram, "service_region")
        new_label = new_name if new_name != old_name else f"{new_name}-new"
        new = HypervisorAt(new_name, Placement(new_label, build.image(new_name), service_region))
        self.classifier = Classifier(ram, old, new)
        if not self.headers:
            self.headers = [old.placement, new.placement]
        self.recorder.data(tracefile.data_payload({
            "type": "placements",
            "hypervisors": [{"hypervisor": at.name, "label": at.placement.label,
                             "load_address": at.placement.load_address,
                             "image_digest": tracefile.image_digest(at.placement.image)} for at in (old, new)],
            "guests": {str(number): guest.name for number, guest in enumerate(booted.guests)},
            "guest_load_address": GUEST_LOAD_ADDRESS}))

    def _write_header(self) -> None:
        if not self.header_written:
            self.header_written = True
            self.recorder.data(tracefile.data_payload({"type": "header", "header": self.header()}))

    # --- the window ------------------------------------------------------------------------------------
    def _open(self) -> None:
        self._started = time.perf_counter()
        if not self.window.by_time:
            self.recorder.recording = True

    def _close(self) -> None:
        """The window is over: nothing more is recorded, and the run pauses at the block's end."""
        self.window.closed = True
        self._ended = time.perf_counter()
        self.recorder.recording = False
        self.machine.request_stop(INSTRUCTION_LIMIT)

    def on_machine_event(self, event) -> None:
        kind = event.kind
        if kind == "doorbell":
            self._describe()
            if not self.window.by_time and self.window.start_event == "doorbell":
                self.arm()
        # The timeline first: the instruction that raised the event (the OUT to the restart-phase
        # port, an LP's VMXOFF or VM entry) is filed under the phase the event begins on its LP.
        self.timeline.on_event(event)
        if self.armed:
            self._sync_phases()
        phase = self._phase(event.lp)
        if self.window.closed:
            return
        if self.window.by_time:
            inside = self.armed and self.window.admits_time(event.time)
            if inside and self._started is None:
                self._open()
        else:
            was_open = self.window.opened
            line = annotate.event(event, phase, self._vmcs_name, self._vmcall_number)
            inside = self.window.on_event(kind, line.data)
            if inside and not was_open:
                self._open()
        if not inside or event.lp in self.done_lps:
            return
        if self.window.by_time:
            line = annotate.event(event, phase, self._vmcs_name, self._vmcall_number)
        self._write_event(line, event)
        if self.window.closed:
            self._close()
        elif self.per_lp_end:
            self._follow_lp_end(event)

    def _write_event(self, line: annotate.TracedEvent, event) -> None:
        """The event as annotate names it; `added`: the names it added to the machine's own data."""
        record = {"type": "event", "seq": line.seq, "time": line.time, "lp": line.lp, "kind": line.kind,
                  "phase": line.phase, "data": line.data,
                  "added": [name for name in line.data if name not in event.data]}
        vmcs = event.data.get("vmcs")
        if vmcs:
            record["identity"] = self._identity(vmcs)
        self.recorder.data(tracefile.data_payload(record), after_instruction=True)

    def _identity(self, vmcs: int) -> tuple | None:
        """Where the Chrome timeline places a VMCS (tools/trace_chrome.py), as it is now."""
        if vmcs not in self._identities:
            identity = self.describe_vmcs(vmcs)
            self._identities[vmcs] = (identity.partition, identity.vp, identity.name, identity.service) \
                if identity is not None else None
        return self._identities[vmcs]

    def _phase(self, lp: int) -> str:
        """What an LP's lines are labelled with and filtered by: the phase that LP is in."""
        value = self.timeline.lp_value(lp)
        name = self._phase_names.get(value)
        if name is None:
            name = self._phase_names[value] = annotate.phase_name(value)
        return name

    def _phase_index(self, value: int) -> int:
        """The number the file stamps instructions of phase `value` with (a `phase` record names it)."""
        index = self._phase_indices.get(value)
        if index is None:
            index = self._phase_indices[value] = min(len(self._phase_indices), PHASE_INDEX_LIMIT)
            if index < PHASE_INDEX_LIMIT:
                self.recorder.data(tracefile.data_payload({"type": "phase", "index": index,
                                                           "name": annotate.phase_name(value)}))
            elif PHASE_INDEX_LIMIT not in self._phase_indices.values():
                self.recorder.data(tracefile.data_payload({"type": "phase", "index": index, "name": "phase-other"}))
        return index

    def _sync_phases(self) -> None:
        """The recorder stamps each LP's instructions with the phase that LP is in now (looked at
        only when the timeline has moved: an announcement, or an LP's own transition)."""
        if not self._phases_moved:
            return
        self._phases_moved = False
        values = tuple(self.timeline.lp_value(lp) for lp in range(len(self.machine.lps)))
        if values != self._stamped:
            self._stamped = values
            for lp, value in enumerate(values):
                self.recorder.set_phase(lp, self._phase_index(value))

    def _on_lp_transition(self, _transition) -> None:
        self._phases_moved = True

    def _on_transition(self, _transition: Transition) -> None:
        self._phases_moved = True
        if self.classifier is not None:
            self.classifier.forget_unknown()
        self.recorder.forget_names()
        self._identities.clear()

    def _follow_lp_end(self, event) -> None:
        kind, lp = event.kind, event.lp
        if kind == "vmxon" and self.timeline.past_commit:
            self.new_root_lps.add(lp)
        elif kind == "hlt" and lp in self.new_root_lps and self.timeline.phase == transfer.Phase.RESUMED:
            self._lp_done(lp)
        elif kind == "vm-entry" and not self.instructions_wanted:
            info = self.classifier.guest(event.data["vmcs"])
            if info.kind == GUEST and info.hypervisor == NEW:
                self._lp_done(lp)   # without instructions, an LP's window ends at the entry that runs its guest

    def _lp_done(self, lp: int) -> None:
        self.done_lps.add(lp)
        if len(self.done_lps) == len(self.machine.lps) and not self.window.closed:
            self._close()

    def _name_vmcs(self, _lp: int, vmcs: int) -> int:
        """The recorder met a guest instruction of `vmcs`: its name goes in the file."""
        if self.classifier is None:
            self._describe()
        info = self.classifier.guest(vmcs)
        self.recorder.data(tracefile.data_payload({
            "type": "name", "vmcs": vmcs, "name": info.name, "kind": info.kind, "hypervisor": info.hypervisor,
            "partition": info.partition, "vp": info.vp}))
        return tracefile.ENDS_WINDOW if self.per_lp_end and info.kind == GUEST and info.hypervisor == NEW else 0

    def _vmcs_name(self, vmcs: int) -> str:
        return self.classifier.guest(vmcs).name if self.classifier is not None else f"vmcs@{vmcs:#x}"

    def _vmcall_number(self, vmcs: int) -> int | None:
        active = self.machine.active_vmcs.get(vmcs)
        if active is None or active.context is None:
            return None
        return active.context.reg(x86.UC_X86_REG_RAX)

    def report_progress(self) -> None:
        """A progress line each PROGRESS_EVERY instructions recorded."""
        progress, recorded = self.options.progress, self.recorder.recorded
        if progress is None or recorded < self._progress_mark + PROGRESS_EVERY or self._started is None:
            return
        self._progress_mark = recorded - recorded % PROGRESS_EVERY
        rate = recorded / max(time.perf_counter() - self._started, 1e-9)
        progress.write(f"hhr trace: {recorded} instructions recorded, {rate:,.0f} instructions/s\n")
        progress.flush()

    # --- output ----------------------------------------------------------------------------------------
    def header(self) -> dict:
        machine, options = self.machine, self.options
        roles = ("old", "new")
        return {
            "version": SCHEMA_VERSION,
            "machine": {"lps": len(machine.lps), "ram": machine.ram.size, "quantum": machine.quantum},
            "restart": {"from": options.from_hypervisor, "to": options.to_hypervisor, "mode": options.mode,
                        "request_at": options.request_at[0], "inject": options.inject},
            "guests": [{"partition": number, "name": guest.name, "vps": guest.vp_count}
                       for number, guest in enumerate(self.booted.guests)],
            "window": self.window.describe(),
            "filters": Filters().describe(),
            "images": [{"role": role, **placement.as_header()} for role, placement in zip(roles, self.headers)],
            "registers": list(REGISTER_NAMES),
        }

    def finish(self) -> None:
        """The file is complete: the header (an empty window still has one), the end record, closed."""
        if self._ended is None:
            self._ended = time.perf_counter()
        if self.classifier is None:
            self._describe()
        self._write_header()
        self.recorder.data(tracefile.data_payload({
            "type": "end", "recorded": self.recorder.recorded, "lost_memory_entries": self.recorder.lost_memory_entries}))
        self.recorder.close()

    @property
    def host_seconds(self) -> float:
        if self._started is None:
            return 0.0
        return (self._ended or time.perf_counter()) - self._started


class _StartFinder:
    """The first, untraced pass: where (in instructions retired, machine-wide) the window begins, so
    that the traced pass can put its hooks in just before, between runs, instead of from the
    doorbell on. An event inside a run is seen with the count of when that run began (the C loop
    runs many), hence the margin."""

    MARGIN = 4 * TRACE_STEP

    def __init__(self, machine, window: Window):
        self.machine = machine
        self.window = Window(**{name: getattr(window, name) for name in
                                ("start_event", "end_event", "start_time", "end_time")})
        self.position: int | None = None
        self.phase = annotate.phase_name(machine.io.restart_phase)
        self.window.closed = False
        self.last_before: int = 0           # a time window: the count before the last step that did not reach it

    def on_machine_event(self, event) -> None:
        if self.position is not None or self.window.by_time:
            return
        line = annotate.event(event, self.phase, lambda vmcs: None, lambda vmcs: None)
        if self.window.on_event(event.kind, line.data):
            self.position = max(self.machine.retired - self.MARGIN, 0)
            self.machine.request_stop(INSTRUCTION_LIMIT)

    def before_step(self) -> None:
        if self.window.by_time and self.position is None:
            if max(lp.now for lp in self.machine.lps) >= self.window.start_time:
                self.position = self.last_before
                self.machine.request_stop(INSTRUCTION_LIMIT)
            else:
                self.last_before = self.machine.retired

    @property
    def found(self) -> bool:
        return self.position is not None


def _advance(machine, limit: int, session: TraceSession | None = None) -> None:
    """Runs the machine to `limit` instructions (or a final stop). The traced pass arms the session
    at its position and disarms it when the window has closed, both between runs."""
    while True:
        if session is not None and session.arm_at is not None and not session.armed and not session.window.closed:
            if machine.retired >= session.arm_at:
                session.arm()
            else:
                machine.run(max_instructions=min(limit, session.arm_at))
                if final_stop(machine) or machine.retired >= limit:
                    return
                continue
        machine.run(max_instructions=limit)
        if session is not None and session.window.closed and session.armed:
            session.disarm()
        stop = machine.stop
        if stop is None or stop.reason != INSTRUCTION_LIMIT or machine.retired >= limit:
            return


def final_stop(machine) -> bool:
    """The machine stopped for good (the guests ended or it failed), not at an instruction limit."""
    return machine.stop is not None and machine.stop.reason != INSTRUCTION_LIMIT


def _drive(options: TraceOptions, session: TraceSession | None, finder: _StartFinder | None,
           booted: boot.Booted) -> list[dict]:
    """Runs the restarts of `options` on `booted`: with the trace (session), or only to find where its
    window begins (finder, which stops the drive there). Returns the restarts' summaries."""
    machine = booted.machine
    window = session.window if session is not None else finder.window
    fault = Fault.parse(options.inject or "none")
    copy_mode = restart_module.MODES[options.mode]

    def done() -> bool:
        if finder is not None:
            return finder.found
        return window.closed and not options.to_end

    def step(limit: int) -> None:
        if finder is not None:
            finder.before_step()
            if finder.found:
                return
        _advance(machine, limit, session)
        if session is not None:
            session.report_progress()

    summaries = []
    for number, point in enumerate(sorted(options.request_at)):
        while machine.retired < point and not final_stop(machine) and not done():
            step(min(point, machine.retired + TRACE_STEP) if window.by_time else point)
        if final_stop(machine):
            raise ValueError(f"the guests ended before instruction {point}: request the restart earlier (--at)")
        if done():
            break
        source = booted.hypervisor
        back = source == options.to_hypervisor and options.to_hypervisor != options.from_hypervisor
        target = options.from_hypervisor if back else options.to_hypervisor
        if session is not None:
            session.target = target
        strike = fault if number == 0 else None
        recorder = restart_module.RestartRecorder(booted, target, strike, check_memory=False, mode=copy_mode)
        recorder.follow(machine.events)
        try:
            restart_module.stage(booted, target, strike, copy_mode)
            limit = machine.retired + restart_module.RESTART_BUDGET
            while not recorder.settled and machine.retired < limit and not final_stop(machine) and not done():
                step(min(limit, machine.retired + TRACE_STEP))
        finally:
            recorder.leave(machine.events)
        if session is not None and not window.by_time and window.opened and not window.closed:
            session._close()            # the restart ended without the window's end: so does the trace
            session.disarm()
        summaries.append(restart_module.summary(booted, recorder, source, strike, copy_mode)
                         | {"request_at": point})
    if window.by_time:
        while not done() and not final_stop(machine) and machine.retired < options.max_instructions:
            if session is not None and min(lp.now for lp in machine.lps) >= window.end_time:
                session._close()
                break
            step(min(options.max_instructions, machine.retired + TRACE_STEP))
    return summaries


def boot_options(options: TraceOptions) -> boot.Booted:
    """The machine of `options` booted, before any restart."""
    guests = [catalog.parse(spec) for spec in options.guests]
    return boot.boot(guests, hypervisor=options.from_hypervisor, lps=options.lps, ram_size=options.ram_size)


def _check(options: TraceOptions) -> None:
    if options.format not in FORMATS:
        raise ValueError(f"bad --format {options.format!r}: one of {', '.join(FORMATS)}")
    if options.format == RECORDING_FORMAT:
        if options.output is None:
            raise ValueError(f"--format {RECORDING_FORMAT} writes a trace file: give it with --output")
        render.check_output("text", options.output)
        if options.filters != Filters():
            raise ValueError(f"--format {RECORDING_FORMAT} records the whole window: give filters when rendering "
                             "it (--input)")
    else:
        render.check_output(options.format, options.output)
    if options.input is not None:
        if not Path(options.input).is_file():
            raise ValueError(f"no trace file {options.input!r}")
        if options.format == RECORDING_FORMAT:
            raise ValueError(f"--input renders a trace file: choose a format other than {RECORDING_FORMAT}")
        return
    if options.mode not in TRACED_MODES:
        raise ValueError(f"bad --mode {options.mode!r}: {', '.join(TRACED_MODES)}")
    build.hypervisor(options.from_hypervisor), build.hypervisor(options.to_hypervisor)
    Fault.parse(options.inject or "none")


def trace(options: TraceOptions) -> TraceResult:
    """Boots, runs to the request, restarts with the recorder on, and renders the file it wrote
    (docs/tracing.md); with `input`, only renders that file. A window that does not begin at the
    doorbell is found first by an untraced pass of the same run (the machine is deterministic), so
    the hooks go in only just before it."""
    _check(options)
    if options.input is not None:
        rendered = render.render(options.input, options.format, options.output, options.filters, options.progress)
        recorded = rendered.recording.get("recorded", rendered.instructions_read)
        return TraceResult(rendered.summary, recorded, 0.0, rendered.outputs, None, rendered.host_seconds,
                           os.path.getsize(options.input))
    keep = options.format == RECORDING_FORMAT
    if keep:
        path = options.output
    else:
        folder = Path(options.output).parent if options.output is not None and options.format != "tenet" else None
        handle, path = tempfile.mkstemp(prefix="hhr-trace-", suffix=".hhrt",
                                        dir=str(folder) if folder is not None and folder.is_dir() else None)
        os.close(handle)
    try:
        result = _record(options, path)
        result.trace_file_bytes = os.path.getsize(path)
        if keep:
            result.outputs = [Path(path)]
            return result
        rendered = render.render(path, options.format, options.output, options.filters, options.progress)
        result.summary, result.outputs, result.render_seconds = rendered.summary, rendered.outputs, rendered.host_seconds
        return result
    finally:
        if not keep and os.path.exists(path):
            os.unlink(path)


def _record(options: TraceOptions, path: str) -> TraceResult:
    window = options.window
    arm_at = None
    if window.by_time or window.start_event != "doorbell":
        booted = boot_options(options)
        finder = _StartFinder(booted.machine, window)
        booted.machine.events.subscribe(finder.on_machine_event)
        _drive(options, None, finder, booted)
        arm_at = finder.position if finder.found else None
    started = time.perf_counter()
    booted = boot_options(options)
    machine = booted.machine
    session = TraceSession(booted, options, path)
    session.arm_at = arm_at
    machine.events.subscribe(session.on_machine_event)
    try:
        summaries = _drive(options, session, None, booted)
        session.disarm()
        session.finish()
        document = None
        if options.to_end:
            result = machine.run(max_instructions=options.max_instructions)
            document = run_module.document(booted, result, options.lps)
            document["restarts"] = summaries
            document["host_seconds"] = time.perf_counter() - started
    finally:
        machine.events.unsubscribe(session.on_machine_event)
        session.disarm()
        session.recorder.close()
    return TraceResult(Summary(), session.recorder.recorded, session.host_seconds, [], document)
