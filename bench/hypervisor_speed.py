"""A hypervisor's own figures in one run: boot to the first guest instruction, a mixed workload, the map storm, host memory per GiB of guest."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from emu.vmx_defs import ExitReason
from guests import catalog
from hypervisors import boot

MIXED_WORKLOAD = ("sieve", "hashchain", "heartbeat", "pingpong,vps=2", "timer", "storm,vps=2", "hello,vps=3")
MIXED_LPS = 2
INSTRUCTION_LIMIT = 2_000_000_000
MEMORY_PROBE_GUESTS = {"64 MiB guest": "sieve", "1 GiB guest": "sieve,mem=1G"}
KIB = 1024


def _guest_instructions(machine) -> int:
    """Instructions retired in guest contexts (every context but the LPs' root ones)."""
    roots = {lp.root.name for lp in machine.lps}
    by_context = machine.statistics()["instructions_by_context"]
    return sum(count for name, count in by_context.items() if name not in roots)


def boot_to_first_guest(hypervisor: str) -> dict:
    """Virtual time of the first VM entry (from the event stream), and the host time to reach it."""
    booted = boot.boot([catalog.parse("hello")], hypervisor=hypervisor, record_events=True)
    booted.machine.run(max_instructions=INSTRUCTION_LIMIT)
    first_entry = next(event for event in booted.machine.events.events if event.kind == "vm-entry")
    started = time.perf_counter()
    fresh = boot.boot([catalog.parse("hello")], hypervisor=hypervisor)
    fresh.machine.run(max_instructions=first_entry.time)
    return {"boot_virtual_time": first_entry.time, "boot_host_ms": (time.perf_counter() - started) * 1e3}


def mixed_workload(hypervisor: str) -> dict:
    booted = boot.boot([catalog.parse(spec) for spec in MIXED_WORKLOAD], hypervisor=hypervisor, lps=MIXED_LPS)
    started = time.perf_counter()
    result = booted.machine.run(max_instructions=INSTRUCTION_LIMIT)
    seconds = time.perf_counter() - started
    exits = sum(booted.machine.statistics()["exits_by_reason"].values())
    guest_instructions = _guest_instructions(booted.machine)
    ended = sum(1 for partition in booted.partitions() if partition["exit_code"] == 0)
    return {"mixed_guests": len(MIXED_WORKLOAD), "mixed_guests_ok": ended, "mixed_host_s": seconds,
            "mixed_exits": exits, "mixed_exits_per_s": exits / seconds,
            "mixed_instructions": result.instructions, "mixed_guest_instructions": guest_instructions,
            "mixed_guest_ips": guest_instructions / seconds, "mixed_instructions_per_s": result.instructions / seconds}


def map_storm(hypervisor: str) -> dict:
    """Map and unmap hypercalls per host second (the storm guest alone: ~18,000 of them)."""
    booted = boot.boot([catalog.parse("storm")], hypervisor=hypervisor)
    started = time.perf_counter()
    booted.machine.run(max_instructions=INSTRUCTION_LIMIT)
    seconds = time.perf_counter() - started
    calls = booted.machine.statistics()["exits_by_reason"].get(ExitReason.VMCALL, 0)
    return {"storm_hypercalls": calls, "storm_hypercalls_per_s": calls / seconds,
            "storm_instructions_per_hypercall": booted.machine.statistics()["instructions_by_lp"][0] / calls}


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child
# started from this (larger) process would report this process's peak.
_RSS_PROBE = """
import sys
from guests import catalog
from hypervisors import boot
booted = boot.boot([catalog.parse(sys.argv[1])], hypervisor=sys.argv[2])
booted.machine.run(max_instructions={limit})
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def host_memory(hypervisor: str) -> dict:
    """Peak resident memory of a whole `hhr run` process, per guest size (a fresh process each)."""
    figures = {}
    for label, spec in MEMORY_PROBE_GUESTS.items():
        output = subprocess.run([sys.executable, "-c", _RSS_PROBE.format(limit=INSTRUCTION_LIMIT), spec, hypervisor],
                                capture_output=True, text=True, check=True).stdout
        figures[f"peak_rss_mib[{label}]"] = int(output.split()[-1]) * KIB / (1 << 20)
    return figures


def measure(hypervisor: str = "hv1") -> dict:
    figures = {"hypervisor": hypervisor}
    figures.update(boot_to_first_guest(hypervisor))
    figures.update(mixed_workload(hypervisor))
    figures.update(map_storm(hypervisor))
    figures.update(host_memory(hypervisor))
    return figures


def report(figures: dict) -> str:
    rows = [
        ("boot to the first guest instruction", f"{figures['boot_virtual_time']:>10} ticks, "
                                                f"{figures['boot_host_ms']:.1f} ms host"),
        (f"mixed workload ({figures['mixed_guests']} guests, {MIXED_LPS} LPs)",
         f"{figures['mixed_guests_ok']}/{figures['mixed_guests']} exited 0 in {figures['mixed_host_s']:.2f} s"),
        ("  VM exits per second", f"{figures['mixed_exits_per_s']:>10.0f}  ({figures['mixed_exits']} exits)"),
        ("  guest instructions per second", f"{figures['mixed_guest_ips'] / 1e6:>10.1f} M"),
        ("  all instructions per second (guest and hypervisor)", f"{figures['mixed_instructions_per_s'] / 1e6:>10.1f} M"),
        ("map/unmap hypercalls per second (storm)", f"{figures['storm_hypercalls_per_s']:>10.0f}  "
                                                    f"({figures['storm_instructions_per_hypercall']:.0f} instructions each)"),
    ]
    rows += [(f"peak host memory, {key[len('peak_rss_mib['):-1]}", f"{value:>10.0f} MiB")
             for key, value in figures.items() if key.startswith("peak_rss_mib[")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(json_path: str | None = None, hypervisor: str = "hv1") -> int:
    figures = measure(hypervisor)
    print(report(figures))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(figures, out, indent=2)
    return 0
