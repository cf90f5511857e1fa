"""`hhr restart`: run guests under one hypervisor, hot-restart it into another mid-run, and measure what guests saw."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

from emu.events import Event
from guests import catalog
from hypervisors import boot, build, layouts, memory_state, transfer
from hypervisors.boot import Booted
from emu.disk import DISK_BLOCK_SIZE, Disk, DiskCommand
from hypervisors.memory_map import HYPERVISOR_BASE, PAGE_SIZE
from tools import run as run_module
from tools.faults import SUSPEND_INJECTIONS, Fault, corrupt_suspend_image

MODES = {"precopy": transfer.Mode.PRECOPY, "stop-and-copy": transfer.Mode.STOP_AND_COPY,
         "suspend": transfer.Mode.SUSPEND}
DEFAULT_REQUEST_AT = 1_000_000          # instructions (all LPs) before the operator rings the doorbell
RESTART_BUDGET = 400_000_000            # instructions a restart may take before the operator gives up
RUN_STEP = 1_000_000                    # the operator looks at the restart this often


@dataclass
class PhaseMark:
    phase: transfer.Phase
    virtual_time: int
    host_time: float
    instructions: int
    inverse_calls: int
    bytes_sent: int


@dataclass
class RestartRecorder:
    """Follows the machine's events through a restart: phases, inverse calls, each VP's last exit
    under the old hypervisor and first entry under the new, and guest memory at both ends."""

    booted: Booted
    to_hypervisor: str
    fault: Fault | None = None
    check_memory: bool = True           # hash guest memory at both ends of the blackout
    mode: transfer.Mode = transfer.Mode.PRECOPY
    marks: list[PhaseMark] = field(default_factory=list)
    inverse_calls: int = 0
    bytes_sent: int = 0
    last_exit: dict[int, tuple[int, float]] = field(default_factory=dict)     # VMCS: (time, host time)
    first_entry: dict[int, tuple[int, float]] = field(default_factory=dict)
    old_vps: dict[int, tuple[int, int, int]] = field(default_factory=dict)   # VMCS: (partition, index, LP)
    new_vps: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    memory_before: tuple[str, dict] | None = None
    memory_after: tuple[str, dict] | None = None
    service_region: int = 0
    phase: transfer.Phase = transfer.Phase.IDLE
    vp_states: dict[tuple[int, int], str] = field(default_factory=dict)     # (partition, VP): at the blackout
    finished: bool = False              # the restart is done or has been aborted
    python_digest: bytes = transfer.STATE_DIGEST_START    # the digest chain, computed here
    digest_agrees: bool | None = None   # the old hypervisor's chain equals this one at VERIFY
    records_by_type: dict[str, int] = field(default_factory=dict)
    own_seconds: float = 0.0            # host time the recorder itself spent (digests): not the machine's
    disk_before: dict = field(default_factory=dict)   # the disk's counters at the request
    instruction_base: int = 0           # instructions of the machines before a reset (suspend and resume)
    reset: bool = False                 # the machine was reset to resume from the disk

    def clock(self) -> float:
        """Host time of the machine alone: the recorder's own work taken out."""
        return time.perf_counter() - self.own_seconds

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind == "vm-exit":
            if not self.new_vps:
                self.last_exit[event.data["vmcs"]] = (event.time, self.clock())
        elif kind == "vm-entry":
            vmcs = event.data["vmcs"]
            if self.new_vps and vmcs in self.new_vps and vmcs not in self.first_entry:
                self.first_entry[vmcs] = (event.time, self.clock())
        elif kind == "vmcallr":
            self.inverse_calls += 1
            area = self.booted.transfer_area
            header = transfer.TRANSFER_HEADER.unpack(self.booted.machine.ram.read(area, transfer.TRANSFER_HEADER.size))
            self.bytes_sent += header["bytes"]
            message = self.booted.machine.ram.read(area, min(header["bytes"], transfer.TRANSFER_AREA_SIZE))
            if event.data["call"] in (transfer.Call.INVARIANTS, transfer.Call.STATE):   # the chained messages
                self.python_digest = transfer.chain_digest(self.python_digest, message)
                for record_type in record_types(message):
                    self.records_by_type[record_type] = self.records_by_type.get(record_type, 0) + 1
            elif event.data["call"] == transfer.Call.VERIFY:
                sent = message[transfer.TRANSFER_HEADER.size:transfer.TRANSFER_HEADER.size + transfer.STATE_DIGEST_BYTES]
                self.digest_agrees = sent == self.python_digest
            if self.fault is not None:
                self.fault.on_event(event, self.booted.machine, self.phase, area,
                                    self.booted.service_region, self.to_hypervisor)
        elif kind == "restart-phase":
            self._phase(transfer.Phase(event.data["phase"]), event.time)
        elif kind == "disk" and event.data["command"] == DiskCommand.WRITE and event.data["status"] == 0 \
                and self.phase in (transfer.Phase.INVARIANTS, transfer.Phase.BLACKOUT):
            self.bytes_sent += event.data["count"] * DISK_BLOCK_SIZE    # a suspend's messages, in whole blocks

    def _phase(self, phase: transfer.Phase, virtual_time: int) -> None:
        self.phase = phase
        machine = self.booted.machine
        self.marks.append(PhaseMark(phase, virtual_time, self.clock(),
                                    self.instruction_base + sum(lp.instructions for lp in machine.lps),
                                    self.inverse_calls, self.bytes_sent))
        started = time.perf_counter()
        if phase == transfer.Phase.BLACKOUT:
            self.old_vps = self._vp_table()
            self.memory_before = guest_memory(self.booted) if self.check_memory else None
            self.service_region = HYPERVISOR_BASE if self.mode == transfer.Mode.SUSPEND \
                else self.booted.service_region
        elif phase == transfer.Phase.SUSPENDED:
            self._read_suspend_image()
        elif phase == transfer.Phase.ABORTED and self.reset:
            self.finished = True                # a resume that refused the image: the machine stops
        elif phase == transfer.Phase.RESUMED:
            self.booted.hypervisor, self.booted.image_base = self.to_hypervisor, self.service_region
            self.memory_after = guest_memory(self.booted) if self.check_memory else None
            self.new_vps = self._vp_table()
            self.finished = True
        elif phase == transfer.Phase.IDLE and any(mark.phase == transfer.Phase.ABORTED for mark in self.marks):
            self.finished = True
        self.own_seconds += time.perf_counter() - started

    def _read_suspend_image(self) -> None:
        """The messages the old hypervisor wrote to the disk: counted, typed and chained in Python as
        the inverse hypercalls' messages are, and the chain compared with the digest written last."""
        for message in suspend_messages(self.booted.machine.io.disk)[:-1]:
            self.python_digest = transfer.chain_digest(self.python_digest, message)
            for record_type in record_types(message):
                self.records_by_type[record_type] = self.records_by_type.get(record_type, 0) + 1
        digest = suspend_messages(self.booted.machine.io.disk)[-1]
        written = digest[transfer.TRANSFER_HEADER.size:transfer.TRANSFER_HEADER.size + transfer.STATE_DIGEST_BYTES]
        self.digest_agrees = written == self.python_digest

    def switch_machine(self, booted: Booted) -> None:
        """The operator resumed on a reset machine: follow it from now on."""
        self.instruction_base += sum(lp.instructions for lp in self.booted.machine.lps)
        self.booted.machine.events.unsubscribe(self)
        self.booted.machine, self.booted.hypervisor, self.booted.image_base = \
            booted.machine, booted.hypervisor, booted.image_base
        self.booted.machine.events.subscribe(self)
        self.reset = True

    def _vp_table(self) -> dict[int, tuple[int, int, int]]:
        table = {}
        states = self.booted.partitions()
        for record in self.booted.vp_records():
            vp, partition = record.fields, record.partition
            table[vp["vmcs"]] = (partition, vp["index"], vp["lp"])
            if not self.new_vps and not self.vp_states.get((partition, vp["index"])):
                self.vp_states[(partition, vp["index"])] = vp_state(vp, states[partition])
        return table

    @property
    def settled(self) -> bool:
        """Aborted, or done with every VP that was running entered again under the new hypervisor."""
        if not self.finished:
            return False
        if not self.new_vps:
            return True
        entered = {identity[:2] for vmcs, identity in self.new_vps.items() if vmcs in self.first_entry}
        return all(identity[:2] in entered for identity in self.old_vps.values()
                   if self.vp_states.get(identity[:2]) == "running")

    def vp_blackouts(self) -> list[dict]:
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

    def phases(self) -> list[dict]:
        rows = []
        for mark, following in zip(self.marks, self.marks[1:]):
            rows.append({"phase": mark.phase.name.lower(), "virtual_start": mark.virtual_time,
                         "virtual_ticks": following.virtual_time - mark.virtual_time,
                         "host_ms": (following.host_time - mark.host_time) * 1e3,
                         "instructions": following.instructions - mark.instructions,
                         "inverse_calls": following.inverse_calls - mark.inverse_calls,
                         "bytes_sent": following.bytes_sent - mark.bytes_sent})
        return rows


def record_types(message: bytes) -> list[str]:
    """The type names of a message's records, in order (as far as the message holds together)."""
    header = transfer.TRANSFER_HEADER.unpack(message[:transfer.TRANSFER_HEADER.size])
    names, cursor = [], transfer.TRANSFER_HEADER.size
    for _ in range(header["record_count"]):
        if cursor + transfer.RECORD_HEADER.size > len(message):
            break
        record = transfer.RECORD_HEADER.unpack(message[cursor:cursor + transfer.RECORD_HEADER.size])
        try:
            names.append(transfer.RecordType(record["type"]).name.lower())
        except ValueError:
            names.append(f"type {record['type']}")
        cursor += transfer.RECORD_HEADER.size + record["length"]
    return names


def suspend_messages(disk) -> list[bytes]:
    """The messages of the suspend image on `disk`, in order, the digest message last (empty without
    an image)."""
    header = transfer.SUSPEND_HEADER.unpack(
        disk.read(transfer.SUSPEND_HEADER_BLOCK * DISK_BLOCK_SIZE, transfer.SUSPEND_HEADER.size))
    if header["magic"] != transfer.SUSPEND_MAGIC:
        return []
    messages, block = [], header["state_block"]
    for _ in range(header["messages"]):
        header_bytes = disk.read(block * DISK_BLOCK_SIZE, transfer.TRANSFER_HEADER.size)
        size = min(transfer.TRANSFER_HEADER.unpack(header_bytes)["bytes"], transfer.TRANSFER_AREA_SIZE)
        messages.append(disk.read(block * DISK_BLOCK_SIZE, size))
        block += max(1, -(-size // DISK_BLOCK_SIZE))
    return messages


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


def vp_state(vp: dict, partition: dict) -> str:
    """`running`, `waiting` (halted for its timer), `sleeping` (halted for good), `ended`: a VP's
    blackout is measured only if it was running."""
    if partition["state"] != layouts.PARTITION_RUNNING or vp["state"] != layouts.VP_RUNNABLE:
        return "ended"
    if vp["halted"]:
        return "waiting" if vp["timer_period"] else "sleeping"
    return "running"


def guest_memory(booted: Booted) -> tuple[str, dict]:
    """A SHA-256 of every partition's RAM and mapped pages, and every map window (gpa to host page)."""
    digest = hashlib.sha256()
    windows = memory_state.read(booted).windows
    for number, partition in enumerate(booted.partitions()):
        digest.update(booted.machine.ram.read(partition["memory"], partition["memory_size"]))
        for gpa in sorted(windows[number]):
            digest.update(booted.machine.ram.read(windows[number][gpa], PAGE_SIZE))
    return digest.hexdigest(), {number: dict(window) for number, window in windows.items()}


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
    now = recorder.clock()     # exits before the request: their virtual time is known, their host time is taken as now
    recorder.last_exit = {vmcs: (time, now) for vmcs, time in booted.machine.last_exits.items()}
    booted.machine.events.subscribe(recorder)
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
        booted.machine.events.unsubscribe(recorder)
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
    status = transfer.Status(booted.restart_status) if recorder.finished else None
    return {
        "from": from_hypervisor, "to": recorder.to_hypervisor, "mode": mode.name.lower().replace("_", "-"),
        "inject": f"{fault.step}:{fault.fault}" if fault else None,
        "outcome": ("resumed" if mode == transfer.Mode.SUSPEND else "committed") if status == transfer.Status.DONE
        else "aborted" if status else "unfinished",
        "reason": None if status in (None, transfer.Status.DONE) else status.name.lower(),
        "detail": booted.restart_detail if status not in (None, transfer.Status.DONE) else None,
        "phases": recorder.phases(),
        "blackout": {
            "max_ticks": max((vp["blackout_ticks"] for vp in blackouts), default=None),
            "max_host_ms": max((vp["blackout_host_ms"] for vp in blackouts), default=None),
            "per_vp": vps,
        },
        "guest_memory_unchanged": (before[0] == after[0]) if before and after else None,
        "guest_pages_in_place": (before[1] == after[1]) if before and after else None,
        "digest_agrees_with_python": recorder.digest_agrees,
        "records_sent": dict(sorted(recorder.records_by_type.items())),
        "disk": {name: value - recorder.disk_before.get(name, 0)
                 for name, value in disk_counters(booted.machine.io.disk).items()},
    }


def restart(from_hypervisor: str, to_hypervisor: str, guest_specs: list[str], *, lps: int = 1,
            ram_size: int | None = None, request_at: int | list[int] = DEFAULT_REQUEST_AT,
            max_instructions: int = run_module.DEFAULT_INSTRUCTION_LIMIT, inject: str | None = None,
            mode: str = "precopy") -> dict:
    """Boots `from_hypervisor`, and at each instruction count of `request_at` requests a restart (into
    `to_hypervisor`, then back, alternating); runs to the end and reports (docs/protocol.md)."""
    build.hypervisor(from_hypervisor), build.hypervisor(to_hypervisor)
    copy_mode = MODES.get(mode)
    if copy_mode is None:
        raise ValueError(f"bad --mode {mode!r}: {', '.join(MODES)}")
    damage = None
    if copy_mode == transfer.Mode.SUSPEND:
        if inject not in (None, "none", *SUSPEND_INJECTIONS):
            raise ValueError(f"bad --inject {inject!r} for a suspend: {', '.join(SUSPEND_INJECTIONS)} (the other "
                             "faults strike a hot restart's inverse hypercalls, which a suspend has not)")
        damage = corrupt_suspend_image if inject in SUSPEND_INJECTIONS else None
        fault = None
    else:
        fault = Fault.parse(inject or "none")
    points = sorted([request_at] if isinstance(request_at, int) else request_at)
    guests = [catalog.parse(spec) for spec in guest_specs]
    booted = boot.boot(guests, hypervisor=from_hypervisor, lps=lps, ram_size=ram_size)
    started = time.perf_counter()
    summaries = []
    for number, point in enumerate(points):
        booted.machine.run(max_instructions=max(point, booted.machine.retired))
        if booted.machine.stop is not None and booted.machine.stop.reason != "instruction-limit":
            raise ValueError(f"the guests ended before instruction {point}: request the restart earlier (--at)")
        source = booted.hypervisor
        back = source == to_hypervisor and to_hypervisor != from_hypervisor     # alternate: there and back
        target = from_hypervisor if back else to_hypervisor
        recorder = request(booted, target, fault=fault if number == 0 else None, mode=copy_mode,
                           before_resume=damage if number == 0 else None)
        summaries.append(summary(booted, recorder, source, fault if number == 0 else None, copy_mode)
                         | {"request_at": point} | ({"inject": inject} if damage and number == 0 else {}))
    result = booted.machine.run(max_instructions=max_instructions)
    document = run_module.document(booted, result, lps)
    for entry in summaries:
        entry["heartbeat_gap"] = heartbeat_gap(document)
    document["restarts"] = summaries
    document["restart"] = summaries[0]
    document["host_seconds"] = time.perf_counter() - started
    return document


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
        if restart_info["guest_memory_unchanged"] is not None:
            lines.append(f"  guest memory unchanged across the blackout: {restart_info['guest_memory_unchanged']}; "
                         f"every guest page in place: {restart_info['guest_pages_in_place']}")
    if document["restarts"] and document["restarts"][0]["heartbeat_gap"] is not None:
        lines.append(f"heartbeat's largest gap, seen from inside: {document['restarts'][0]['heartbeat_gap']} ticks")
    return "\n".join(lines)
