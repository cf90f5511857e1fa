"""`hhr run`: boot a hypervisor with guests, run to the end, and report each guest (text or JSON)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from emu.vmx_defs import EXIT_REASON_BASIC_MASK, ExitReason
from guests import catalog
from hypervisors import memory_state, layouts
from hypervisors.boot import Booted, boot

DEFAULT_INSTRUCTION_LIMIT = 2_000_000_000
JSON_SCHEMA_VERSION = 1
PARTITION_STATE_NAMES = {layouts.PARTITION_RUNNING: "running", layouts.PARTITION_EXITED: "exited",
                         layouts.PARTITION_STOPPED: "stopped"}


def reason_name(reason: int) -> str:
    if reason == layouts.PARTITION_STOP_ENTRY_FAILED:
        return "VM entry failed"
    if reason == layouts.PARTITION_STOP_POSTCOPY:
        return "post-copy failed"
    try:
        return ExitReason(reason & EXIT_REASON_BASIC_MASK).name
    except ValueError:
        return f"exit reason {reason:#x}"


@dataclass
class RunReport:
    document: dict
    host_seconds: float


def run(hypervisor: str, guest_specs: list[str], *, lps: int = 1, ram_size: int | None = None,
        max_instructions: int = DEFAULT_INSTRUCTION_LIMIT, record_events: bool = False) -> RunReport:
    guests = [catalog.parse(spec) for spec in guest_specs]
    booted = boot(guests, hypervisor=hypervisor, lps=lps, ram_size=ram_size, record_events=record_events)
    started = time.perf_counter()
    result = booted.machine.run(max_instructions=max_instructions)
    return RunReport(document(booted, result, lps), time.perf_counter() - started)


def guest_reports(booted: Booted) -> list[dict]:
    """Each guest as the running hypervisor's partition table says, with its console."""
    console = booted.machine.io.console
    reports = []
    for number, (guest, partition) in enumerate(zip(booted.guests, booted.partitions())):
        state = PARTITION_STATE_NAMES.get(partition["state"], "not started")
        reports.append({
            "name": guest.name, "vps": guest.vp_count, "memory": guest.memory_size,
            "console": console.text(partition["channel"] or number + 1),
            "exit_code": partition["exit_code"] if state == "exited" else None,
            "state": state,
            "stop_reason": reason_name(partition["stop_reason"]) if state == "stopped" else None,
            "mapped_pages": partition["mapped_pages"],
        })
    return reports


def document(booted: Booted, result, lps: int) -> dict:
    """The JSON document of docs/hv1.md (schema 1) for a machine that has stopped."""
    statistics = booted.machine.statistics()
    host_pages = memory_state.read(booted).owned_pages()
    return {
        "schema": JSON_SCHEMA_VERSION,
        "hypervisor": booted.hypervisor, "lps": lps, "ram": booted.machine.ram.size,
        "guests": guest_reports(booted),
        "hypervisor_console": booted.machine.io.console.text(0),
        "machine_stop": {"reason": result.stop.reason, "exit_status": result.stop.exit_status,
                         "report": result.stop.report},
        "instructions": result.instructions, "virtual_time": result.virtual_time,
        "exits_by_reason": {reason_name(reason): count for reason, count in statistics["exits_by_reason"].items()},
        "instructions_by_lp": statistics["instructions_by_lp"],
        "host_pages": dict(sorted(host_pages.items())),
    }


def text(report: RunReport) -> str:
    doc = report.document
    lines = []
    for number, guest in enumerate(doc["guests"], 1):
        lines.append(f"== guest {number}: {guest['name']} ({guest['vps']} VP, {guest['memory'] >> 20} MiB) ==")
        lines.append(guest["console"].rstrip("\n"))
        if guest["state"] == "exited":
            lines.append(f"-- exited with code {guest['exit_code']}")
        elif guest["state"] == "stopped":
            lines.append(f"-- stopped by {doc['hypervisor']}: {guest['stop_reason']}")
        else:
            lines.append(f"-- {guest['state']} when the machine stopped")
    stop = doc["machine_stop"]
    lines.append(f"machine: {stop['reason']} after {doc['instructions']} instructions "
                 f"({doc['virtual_time']} ticks), {report.host_seconds:.2f} s host time, {doc['lps']} LPs")
    if doc["hypervisor_console"]:
        lines.append(f"{doc['hypervisor']} said: {doc['hypervisor_console'].rstrip()}")
    if stop["report"]:
        lines.append(stop["report"])
    exits = ", ".join(f"{name} {count}" for name, count in sorted(doc["exits_by_reason"].items()))
    lines.append(f"VM exits: {exits}")
    pages = ", ".join(f"{owner} {count}" for owner, count in doc["host_pages"].items())
    lines.append(f"host pages (4 KiB) by owner: {pages}")
    return "\n".join(lines)
