"""`hhr restart`: run guests under one hypervisor, hot-restart it into another mid-run, and measure what guests saw."""
from __future__ import annotations

import hashlib
import time
from typing import Callable

from emu.disk import Disk
from guests import catalog
from hypervisors import boot, build, transfer
from hypervisors.boot import Booted
from hypervisors.memory_map import HYPERVISOR_BASE
from hypervisors.timeline import RestartTimeline, Transition
from tools import blackout, digest_check, dma_audit, phase_meter, postcopy_meter
from tools import run as run_module
from tools.blackout import VpBlackouts
from tools.digest_check import DigestCheck
from tools.faults import POSTCOPY_STEP, SUSPEND_INJECTIONS, Fault, FaultHook, corrupt_suspend_image
from tools.host_clock import HostClock
from tools.phase_meter import PhaseMark, PhaseMeter
from tools.postcopy_meter import PostcopyMeter

MODES = {"precopy": transfer.Mode.PRECOPY, "stop-and-copy": transfer.Mode.STOP_AND_COPY,
         "suspend": transfer.Mode.SUSPEND, "postcopy": transfer.Mode.POSTCOPY}
DEFAULT_REQUEST_AT = 1_000_000          # instructions (all LPs) before the operator rings the doorbell
RESTART_BUDGET = 400_000_000            # instructions a restart may take before the operator gives up
RUN_STEP = 1_000_000                    # the operator looks at the restart this often


class RestartRecorder:
    """One restart followed through its parts, each usable alone: the timeline (which phase is
    current, when the restart is over), the phase meter, each VP's blackout, the Python-side digest
    check and the fault hook. The recorder subscribes them in the order their readings depend on,
    keeps the `booted` view on the hypervisor in charge, and follows the machine across a resume."""

    def __init__(self, booted: Booted, to_hypervisor: str, fault: Fault | None = None, check_memory: bool = True,
                 mode: transfer.Mode = transfer.Mode.PRECOPY):
        self.booted, self.to_hypervisor, self.mode = booted, to_hypervisor, mode
        self.clock = HostClock()
        self.timeline = RestartTimeline(mode=mode, status=lambda: (booted.restart_status, booted.restart_detail))
        self.meter = PhaseMeter(booted, self.timeline, self.clock)
        self.blackouts = VpBlackouts(booted, self.clock, check_memory,
                                     windows_follow=mode == transfer.Mode.POSTCOPY)
        self.digest = DigestCheck(booted, self.clock)
        self.postcopy = PostcopyMeter(booted, self.clock) if mode == transfer.Mode.POSTCOPY else None
        self.fault_hook = FaultHook(fault, booted, self.timeline, to_hypervisor) if fault is not None else None
        self.service_region = 0             # where the new hypervisor runs once it has taken over
        self.disk_before: dict = {}         # the disk's counters at the request
        self.reset = False                  # the machine was reset to resume from the disk
        # At a transition: the meter marks it first, then the view moves to the new hypervisor (at
        # RESUMED) before the blackout reads the new VPs.
        for listener in (self.meter.on_transition, self._on_transition, self.blackouts.on_transition,
                         self.digest.on_transition):
            self.timeline.subscribe(listener)
        if self.postcopy is not None:
            self.timeline.subscribe(self.postcopy.on_transition)

    def _subscriptions(self) -> list[tuple]:
        """The parts' event subscribers in the order they must see an event (the digest reads a
        message before a fault corrupts it); the timeline comes after them."""
        found = [(self.blackouts.on_event, blackout.EVENT_KINDS), (self.meter.on_event, phase_meter.EVENT_KINDS),
                 (self.digest.on_event, digest_check.EVENT_KINDS)]
        if self.postcopy is not None:
            found.append((self.postcopy.on_event, postcopy_meter.EVENT_KINDS))
        if self.fault_hook is not None:
            found.append((self.fault_hook.on_event, FaultHook.EVENT_KINDS))
        return found

    def follow(self, events) -> None:
        """Subscribe the parts and the timeline to an event stream (emu/events.py)."""
        for callback, kinds in self._subscriptions():
            events.subscribe(callback, kinds)
        self.timeline.follow(events)

    def leave(self, events) -> None:
        for callback, _ in self._subscriptions():
            events.unsubscribe(callback)
        self.timeline.leave(events)

    def _on_transition(self, transition: Transition) -> None:
        if transition.phase == transfer.Phase.BLACKOUT:
            self.service_region = HYPERVISOR_BASE if self.mode == transfer.Mode.SUSPEND \
                else self.booted.service_region
        elif transition.phase == transfer.Phase.RESUMED:
            self.booted.hypervisor, self.booted.image_base = self.to_hypervisor, self.service_region

    def switch_machine(self, booted: Booted) -> None:
        """The operator resumed on a reset machine: follow it from now on."""
        self.meter.machine_reset()
        self.leave(self.booted.machine.events)
        self.booted.machine, self.booted.hypervisor, self.booted.image_base = \
            booted.machine, booted.hypervisor, booted.image_base
        self.follow(self.booted.machine.events)
        self.reset = True

    @property
    def finished(self) -> bool:
        """The restart is done or has been aborted."""
        return self.timeline.over

    @property
    def committed(self) -> bool:
        """The new hypervisor runs the guests (after a suspend: resumed)."""
        return self.timeline.committed

    @property
    def phase(self) -> transfer.Phase | None:
        return self.timeline.phase

    @property
    def settled(self) -> bool:
        """Aborted, or done with every VP that was running entered again under the new hypervisor (and
        a post-copy's old hypervisor drained, or its drain failed)."""
        return (self.finished and self.blackouts.all_back() and not self.timeline.draining
                and not (self.postcopy is not None and self.postcopy.waiting))

    # The readings `summary` and the tests use, from the part that measures each.
    @property
    def marks(self) -> list[PhaseMark]:
        return self.meter.marks

    @property
    def inverse_calls(self) -> int:
        return self.meter.inverse_calls

    @property
    def memory_before(self) -> tuple[str, dict] | None:
        return self.blackouts.memory_before

    @property
    def memory_after(self) -> tuple[str, dict] | None:
        return self.blackouts.memory_after

    def vp_blackouts(self) -> list[dict]:
        return self.blackouts.rows()

    def phases(self) -> list[dict]:
        return self.meter.phases()


def disk_counters(disk) -> dict:
    return {"commands": disk.commands, "bytes_written": disk.bytes_written, "bytes_read": disk.bytes_read,
            "busy_ticks": disk.busy_ticks}


def suspend_request_words() -> list[int]:
    """The doorbell message of a suspend: no image, the next hypervisor is the one booted after it."""
    request = transfer.RESTART_REQUEST.pack(magic=transfer.REQUEST_MAGIC, version=transfer.PROTOCOL_VERSION,
                                            mode=transfer.Mode.SUSPEND)
    return [int.from_bytes(request[offset:offset + 4], "little") for offset in range(0, len(request), 4)]


def heartbeat_gap(document: dict) -> int | None:
    """The largest gap the heartbeat guest saw, from its own output (None without a heartbeat)."""
    for guest in document["guests"]:
        if guest["name"] == "heartbeat" and ":" in guest["console"]:
            return int(guest["console"].rsplit(":", 1)[1])
    return None


def request_words(image_code: bytes, symbols: dict[str, int], base: int, *, address: int = transfer.STAGING_BASE,
                  digest: bytes | None = None, mode: transfer.Mode = transfer.Mode.PRECOPY) -> list[int]:
    """The doorbell message for an image staged at `address` (docs/protocol.md, 1)."""
    request = transfer.RESTART_REQUEST.pack(
        magic=transfer.REQUEST_MAGIC, version=transfer.PROTOCOL_VERSION, image=address, image_size=len(image_code),
        service_entry=symbols["service_entry"] - base, inverse_entry=symbols["inverse_entry"] - base,
        takeover_entry=symbols["takeover_entry"] - base,
        digest=digest if digest is not None else hashlib.sha256(image_code).digest(), mode=mode)
    return [int.from_bytes(request[offset:offset + 4], "little") for offset in range(0, len(request), 4)]


def stage(booted: Booted, to_hypervisor: str, fault: Fault | None = None,
          mode: transfer.Mode = transfer.Mode.PRECOPY) -> None:
    """The operator's part: the new image into the staging area, the request on the doorbell."""
    if mode == transfer.Mode.SUSPEND:
        booted.machine.ring_doorbell(suspend_request_words())
        return
    image = build.image(to_hypervisor)
    code, symbols = bytearray(image.code), dict(image.symbols)
    malformed, digest = fault.stage(code, symbols, image.base) if fault else (False, None)
    booted.machine.load(transfer.STAGING_BASE, bytes(code))
    words = request_words(bytes(code), symbols, image.base, digest=digest, mode=mode)
    booted.machine.ring_doorbell(words[:len(words) // 2] if malformed else words)


def request(booted: Booted, to_hypervisor: str, *, fault: Fault | None = None,
            mode: transfer.Mode = transfer.Mode.PRECOPY, budget: int = RESTART_BUDGET,
            check_memory: bool = True, before_resume: Callable[[Disk], None] | None = None) -> RestartRecorder:
    """The operator requests a restart into `to_hypervisor` and the machine runs until it is done or
    aborted (or `budget` more instructions have run); the recorder has what happened. A suspend's
    machine powers off: the operator then resumes it under `to_hypervisor` (`before_resume` sees the
    disk first: a test can damage it)."""
    build.hypervisor(to_hypervisor)
    recorder = RestartRecorder(booted, to_hypervisor, fault, check_memory, mode)
    recorder.disk_before = disk_counters(booted.machine.io.disk)
    recorder.blackouts.start()
    recorder.follow(booted.machine.events)
    try:
        stage(booted, to_hypervisor, fault, mode)
        left = budget
        while not recorder.settled and left > 0:
            machine = booted.machine
            before = machine.retired
            machine.run(max_instructions=before + min(left, RUN_STEP))
            left -= machine.retired - before
            if machine.stop is not None and machine.stop.reason != "instruction-limit":
                if suspended(booted, recorder):
                    if before_resume is not None:
                        before_resume(machine.io.disk)
                    recorder.switch_machine(boot.resume(booted, to_hypervisor))   # the operator powers on
                    continue
                break                           # the machine stopped for good
    finally:
        recorder.leave(booted.machine.events)
    return recorder


def suspended(booted: Booted, recorder: RestartRecorder) -> bool:
    """The machine powered itself off at the end of a suspend (docs/protocol.md, Suspend and resume)."""
    stop = booted.machine.stop
    return (recorder.phase == transfer.Phase.SUSPENDED and not recorder.reset and stop.reason == "debug-exit"
            and stop.exit_status == (transfer.SUSPEND_EXIT_CODE << 1) | 1)


def summary(booted: Booted, recorder: RestartRecorder, from_hypervisor: str, fault: Fault | None,
            mode: transfer.Mode) -> dict:
    """One restart as `hhr restart --json` reports it (docs/protocol.md, Measurement)."""
    vps = recorder.vp_blackouts()
    blackouts = [vp for vp in vps if vp["blackout_ticks"] is not None]
    before, after = recorder.memory_before, recorder.memory_after
    ending = recorder.timeline.ending if recorder.finished else None
    status = ending.status if ending is not None else None
    return {
        "from": from_hypervisor, "to": recorder.to_hypervisor, "mode": mode.name.lower().replace("_", "-"),
        "inject": f"{fault.step}:{fault.fault}" if fault else None,
        "outcome": ("resumed" if mode == transfer.Mode.SUSPEND else "committed") if status == transfer.Status.DONE
        else "aborted" if status else "unfinished",
        "reason": None if status in (None, transfer.Status.DONE) else status.name.lower(),
        "detail": ending.detail if status not in (None, transfer.Status.DONE) else None,
        "phases": recorder.phases(),
        "blackout": {
            "max_ticks": max((vp["blackout_ticks"] for vp in blackouts), default=None),
            "max_host_ms": max((vp["blackout_host_ms"] for vp in blackouts), default=None),
            "per_vp": vps,
        },
        "guest_memory_unchanged": (before[0] == after[0]) if before and after else None,
        "guest_pages_in_place": (before[1] == after[1]) if before and after else None,
        "digest_agrees_with_python": recorder.digest.agrees,
        "records_sent": dict(sorted(recorder.digest.records_by_type.items())),
        "disk": {name: value - recorder.disk_before.get(name, 0)
                 for name, value in disk_counters(booted.machine.io.disk).items()},
    } | ({"postcopy": recorder.postcopy.report() | {"digest_agrees_with_python": recorder.digest.drain_agrees}}
         if recorder.postcopy is not None else {})


def restart(from_hypervisor: str, to_hypervisor: str, guest_specs: list[str], *, lps: int = 1,
            ram_size: int | None = None, request_at: int | list[int] = DEFAULT_REQUEST_AT,
            max_instructions: int = run_module.DEFAULT_INSTRUCTION_LIMIT, inject: str | None = None,
            mode: str = "precopy") -> dict:
    """Boots `from_hypervisor`, and at each instruction count of `request_at` requests a restart (into
    `to_hypervisor`, then back, alternating); runs to the end and reports (docs/protocol.md)."""
    return restart_keeping_machine(from_hypervisor, to_hypervisor, guest_specs, lps=lps, ram_size=ram_size,
                                   request_at=request_at, max_instructions=max_instructions, inject=inject,
                                   mode=mode)[0]


def restart_keeping_machine(from_hypervisor: str, to_hypervisor: str, guest_specs: list[str], *, lps: int = 1,
                            ram_size: int | None = None, request_at: int | list[int] = DEFAULT_REQUEST_AT,
                            max_instructions: int = run_module.DEFAULT_INSTRUCTION_LIMIT,
                            inject: str | list[str] | None = None, mode: str = "precopy") -> tuple[dict, Booted]:
    """restart(), and the booted machine as it stopped (for a grader that looks at its state). `inject`
    may also be a list of a hot restart's faults: they strike the first restarts in turn."""
    build.hypervisor(from_hypervisor), build.hypervisor(to_hypervisor)
    copy_mode = MODES.get(mode)
    if copy_mode is None:
        raise ValueError(f"bad --mode {mode!r}: {', '.join(MODES)}")
    damage = None
    faults: list[Fault | None] = []
    if copy_mode == transfer.Mode.SUSPEND:
        if inject not in (None, "none", *SUSPEND_INJECTIONS):
            raise ValueError(f"bad --inject {inject!r} for a suspend: {', '.join(SUSPEND_INJECTIONS)} (the other "
                             "faults strike a hot restart's inverse hypercalls, which a suspend has not)")
        damage = corrupt_suspend_image if inject in SUSPEND_INJECTIONS else None
    else:
        faults = [Fault.parse(text or "none") for text in (inject if isinstance(inject, list) else [inject])]
        if copy_mode != transfer.Mode.POSTCOPY and any(fault is not None and fault.step == POSTCOPY_STEP
                                                       for fault in faults):
            raise ValueError(f"bad --inject {inject!r}: the {POSTCOPY_STEP} step is a post-copy's "
                             "(--mode postcopy), after its commit")
    points = sorted([request_at] if isinstance(request_at, int) else request_at)
    guests = [catalog.parse(spec) for spec in guest_specs]
    booted = boot.boot(guests, hypervisor=from_hypervisor, lps=lps, ram_size=ram_size)
    # With a device assigned, every DMA write is checked against its partition's memory throughout.
    audit = dma_audit.DmaAudit(booted) if any(guest.device is not None for guest in guests) else None
    started = time.perf_counter()
    summaries = []
    recorder = None
    for number, point in enumerate(points):
        stopped = booted.machine.stop is not None and booted.machine.stop.reason != "instruction-limit"
        if recorder is not None and not recorder.finished and stopped:
            break                               # the machine stopped during the last restart: no more requests
        booted.machine.run(max_instructions=max(point, booted.machine.retired))
        if booted.machine.stop is not None and booted.machine.stop.reason != "instruction-limit":
            raise ValueError(f"the guests ended before instruction {point}: request the restart earlier (--at)")
        source = booted.hypervisor
        back = source == to_hypervisor and to_hypervisor != from_hypervisor     # alternate: there and back
        target = from_hypervisor if back else to_hypervisor
        fault = faults[number] if number < len(faults) else None
        recorder = request(booted, target, fault=fault, mode=copy_mode,
                           before_resume=damage if number == 0 else None)
        summaries.append(summary(booted, recorder, source, fault, copy_mode)
                         | {"request_at": point} | ({"inject": inject} if damage and number == 0 else {}))
    result = booted.machine.run(max_instructions=max_instructions)
    document = run_module.document(booted, result, lps)
    for entry in summaries:
        entry["heartbeat_gap"] = heartbeat_gap(document)
    document["restarts"] = summaries
    document["restart"] = summaries[0]
    if audit is not None:
        audit.detach()
        document["dma_audit"] = audit.summary()
    document["host_seconds"] = time.perf_counter() - started
    return document, booted


def text(document: dict) -> str:
    lines = [run_module.text(run_module.RunReport(document, document["host_seconds"]))]
    for restart_info in document["restarts"]:
        outcome = restart_info["outcome"]
        if restart_info["reason"]:
            outcome += f": {restart_info['reason']} (detail {restart_info['detail']})"
        kind = "suspend and resume" if restart_info["mode"] == "suspend" else "hot restart"
        lines.append(f"{kind} {restart_info['from']} -> {restart_info['to']} at instruction "
                     f"{restart_info['request_at']} ({restart_info['mode']}): {outcome}")
        if restart_info["phases"]:
            lines.append(f"  {'phase':<12} {'virtual ticks':>14} {'host ms':>9} {'instructions':>13} "
                         f"{'inverse calls':>14} {'bytes sent':>11}")
            for phase in restart_info["phases"]:
                lines.append(f"  {phase['phase']:<12} {phase['virtual_ticks']:>14} {phase['host_ms']:>9.2f} "
                             f"{phase['instructions']:>13} {phase['inverse_calls']:>14} {phase['bytes_sent']:>11}")
        for vp in restart_info["blackout"]["per_vp"]:
            if vp["blackout_ticks"] is not None:
                lines.append(f"  partition {vp['partition']} VP {vp['vp']} (LP {vp['lp']}): blackout "
                             f"{vp['blackout_ticks']} ticks, {vp['blackout_host_ms']:.2f} ms host")
        if restart_info["records_sent"]:
            lines.append("  records sent: " + ", ".join(f"{name} {count}"
                                                       for name, count in restart_info["records_sent"].items()))
        drain = restart_info.get("postcopy")
        if drain is not None:
            latency = drain["demand_latency_ticks"]
            lines.append(f"  post-copy: {drain['outcome']}"
                         + (f" ({drain['reason']}, detail {drain['detail']})" if drain["reason"] else "")
                         + f" {drain['drain_ticks']} ticks after the take-over; {drain['demand_fetches']} "
                         f"demand fetches (the table there after {latency['fetch_mean']} ticks on average, "
                         f"{latency['fetch_max']} at most; the VP in again after {latency['mean']}, "
                         f"{latency['max']} at most); "
                         + "".join(f"partition {window['partition']}'s whole window before it ran (a device's): "
                                   f"{window['tables']} tables, its VP waited {window['ticks']} ticks; "
                                   for window in drain["device_windows"])
                         + f"mappings as held at the blackout: {drain['mappings_as_held']}; "
                         f"digest agrees: {drain['digest_agrees_with_python']}")
        if restart_info["guest_memory_unchanged"] is not None:
            lines.append(f"  guest memory unchanged across the blackout: {restart_info['guest_memory_unchanged']}; "
                         f"every guest page in place: {restart_info['guest_pages_in_place']}")
    if "dma_audit" in document:
        audit = document["dma_audit"]
        lines.append(f"DMA audit: {audit['writes']} device writes ({audit['bytes']} bytes) checked against their "
                     f"device's partition, {audit['window_writes']} of them into map-window pages; "
                     f"{audit['violations']} outside it")
    if document["restarts"] and document["restarts"][0]["heartbeat_gap"] is not None:
        lines.append(f"heartbeat's largest gap, seen from inside: {document['restarts'][0]['heartbeat_gap']} ticks")
    return "\n".join(lines)
