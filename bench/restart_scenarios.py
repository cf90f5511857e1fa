"""Blackout against the alternatives: hot restart (pre-copy, post-copy, stop-and-copy), suspend and resume,
and cold restart, swept over guest RAM, partitions, VPs, map-window mappings (hypervisor state), LPs and
assigned block devices busy at the request (bench/README.md).

Every point boots the same guests on the same machine (same LPs, RAM, and the machine's fixed seed:
boot.boot always builds it with seed 0, and the machine is deterministic) and stops them at the same
request point; only the scenario differs. The hot scenarios go through `tools.restart` (`request` and
`summary`, the pieces `tools.restart.restart` is made of: the bench needs the recorder itself to read
the map windows at the blackout, and need not run every guest to its end). Suspend and resume goes
through the same pieces with the mode `suspend`: hv1 writes the state and guest RAM to the machine's
disk and powers off, the machine is reset, and hv2 boots from the firmware and reads them back. A
post-copy is followed after its commit until the old hypervisor is drained: what it moved out of the
blackout (demand fetches, their latency, the drain) is reported beside its blackout."""
from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from asm import assemble
from bench import device_load
from emu.events import Event
from guests import catalog
from hypervisors import boot, guest_abi, layouts, timeline, transfer
from hypervisors.boot import Booted, GuestImage
from hypervisors.memory_map import GUEST_LOAD_ADDRESS, MIB
from tools import blackout
from tools import restart as restart_module

FROM_HYPERVISOR, TO_HYPERVISOR = "hv1", "hv2"
SCHEMA_VERSION = 1
# A run writes here, in the current directory, unless told where: the reference results committed in
# bench/results are replaced only by `hhr bench --output bench/results` (REFERENCE_OUTPUT).
DEFAULT_OUTPUT = Path("hhr-bench-results")
REFERENCE_OUTPUT = Path(__file__).resolve().parent / "results"
JSON_NAME, MARKDOWN_NAME = "restart_scenarios.json", "restart_scenarios.md"

PRECOPY, POSTCOPY, STOP_AND_COPY, COLD, SUSPEND = "precopy", "postcopy", "stop-and-copy", "cold", "suspend-resume"
SCENARIOS = (PRECOPY, POSTCOPY, STOP_AND_COPY, COLD, SUSPEND)
HOT_MODES = {PRECOPY: transfer.Mode.PRECOPY, POSTCOPY: transfer.Mode.POSTCOPY,
             STOP_AND_COPY: transfer.Mode.STOP_AND_COPY}
PROTOCOL_MODES = HOT_MODES | {SUSPEND: transfer.Mode.SUSPEND}     # the scenarios tools.restart carries out
MODE_NAMES = {PRECOPY: "pre-copy", POSTCOPY: "post-copy", STOP_AND_COPY: "stop-and-copy"}
SCENARIO_TITLES = {PRECOPY: "hot restart, pre-copy", POSTCOPY: "hot restart, post-copy",
                   STOP_AND_COPY: "hot restart, stop-and-copy",
                   COLD: "cold restart (reboot under hv2, redo the work)",
                   SUSPEND: "suspend and resume to disk"}
SUSPEND_FACTOR = 100              # hot restart's blackout at least this many times lower at the largest RAM
FLAT_LIMIT = 1.2                  # a blackout is flat over a sweep if its largest over its smallest is at most this
FASTER_FACTOR = 3                 # one mode "at least this many times lower" than another at a point
REPORTED = "reported"             # the verdict of a comparison the issues give no target for
# A post-copy's phases after its take-over (the drain): reported apart, not part of the restart's ticks.
AFTER_TAKEOVER = frozenset(phase.name.lower() for phase in (transfer.Phase.RESUMED, *timeline.DRAIN_PHASES))

AFTER_RESTART = 1_000_000         # instructions run after a hot restart: the guests go on, none is stopped
COLD_BUDGET_FACTOR = 4            # a cold run gives up after this many times the request point ...
COLD_BUDGET_EXTRA = 50_000_000    # ... plus this many instructions
COLD_STEP = 1_000_000             # the cold run looks whether every VP is back this often

COUNTER_POINT = 4_000_000         # LP time at the request for the counter sweeps (counter lives ~180M)
# Hypervisor state: the holder guest (below) maps this many scattered map-window pages, then computes
# without a VM exit, so the same mappings exist at the request and at the blackout, in every scenario.
HELD_PAGES = (1_000, 2_000, 4_000, 8_000, 10_000, 16_000)
MANY_MAPPINGS = 10_000            # the point the pre-copy target speaks of
TICKS_PER_MAP = 800               # LP time the holder needs per page (about 795, measured) ...
HOLDER_START = 1_000_000          # ... after this much: its request comes once every page is mapped
# The storm guest maps while the restart runs (its quota fill, ~1,260 pages per million ticks, alone
# on LP 1 beside a counter on LP 0) and ends, freeing its pages, at about LP time 14.4M. Request
# points (LP time) found by experiment: about 2,000, 4,600 and 10,000 of its pages mapped.
STORM_GUESTS = ("counter,mem=16M", "storm,mem=16M")
STORM_POINTS = {3_000_000: "~2,000", 5_000_000: "~4,600", 9_500_000: "~10,000"}
STORM_MANY_POINT = 9_500_000

# Assigned block devices (docs/guests.md, "An assigned block device"): each device streams for its own
# guest, polling and interrupt-driven in turn (polling first, so every point with a device has a
# device guest running at the blackout: a VP halted for its completion is not measured), beside the
# same two counters on the same LPs at every point. The device guests stream for about 7 million
# ticks of LP time, and a hot restart's blackout comes about 3.6 million after its request.
DEVICE_GUEST_KINDS = ("blkstream", "blkirq")
DEVICE_BESIDE = ("counter,mem=16M", "counter,mem=16M")
DEVICE_LPS = 2
DEVICE_POINT = 1_000_000          # LP time at the request (then on until every device is busy)
DEVICE_BUSY_STEP = 2_000          # instructions between two looks for every device busy ...
DEVICE_BUSY_LIMIT = 2_000_000     # ... for at most this many
# Suspend refuses a partition with a device (status DEVICE_ASSIGNED: the reset would lose the device's
# state); a cold restart's blackout counts guest instructions again, which a guest polling its device
# retires as many as it waits: neither is measured with devices.
DEVICE_SCENARIOS = tuple(HOT_MODES)
# Each device comes with a partition of its own, and a partition costs the blackout by itself (the
# partitions sweep): the same points with a counter in each device guest's place tell them apart.
DEVICES, NO_DEVICES = "devices", "no-devices"
DEVICES_LEFT_OUT = {SUSPEND: "a suspend refuses a partition with a device assigned (DEVICE_ASSIGNED)",
                    COLD: "a cold restart's progress is counted in guest instructions, and a guest polling its "
                          "device retires them while it waits"}

HOLDER_SOURCE = """
; holder (bench/restart_scenarios.py): VP 0 maps PAGES pages of the map window, STRIDE pages apart
; around it (so they are scattered over the window's EPT page tables), tags each, then computes
; without a VM exit for ITERATIONS rounds, checks every tag and ends with exit code 0 (1: a map
; failed, 2: a tag changed). Other VPs halt.
%define STRIDE 4099
%define WINDOW_PAGE_MASK (MAP_WINDOW_SIZE / 4096 - 1)
start:
    test rdi, rdi
    jnz halt
    xor r12d, r12d
map_page:
    call page_of
    mov eax, HC_MAP_PAGE
    vmcall
    test rax, rax
    jnz map_failed
    mov [rdi], r12
    inc r12
    cmp r12, PAGES
    jb map_page
    xor ecx, ecx
    mov rdx, ITERATIONS
work:
    mov rax, rcx
    imul rax, rcx
    add rbx, rax
    inc rcx
    cmp rcx, rdx
    jb work
    xor r12d, r12d
check_page:
    call page_of
    cmp [rdi], r12
    jne tag_changed
    inc r12
    cmp r12, PAGES
    jb check_page
    xor eax, eax
    out EXIT_PORT, al
halt:
    hlt
    jmp halt
map_failed:
    mov al, 1
    out EXIT_PORT, al
    jmp halt
tag_changed:
    mov al, 2
    out EXIT_PORT, al
    jmp halt
; r12 = page number: rdi = its guest-physical address. Clobbers rax.
page_of:
    imul rdi, r12, STRIDE
    and rdi, WINDOW_PAGE_MASK
    shl rdi, 12
    mov rax, MAP_WINDOW_BASE
    add rdi, rax
    ret
"""
HOLDER_ITERATIONS = 50_000_000    # about 300 million instructions of work after the maps


@lru_cache(maxsize=None)
def holder_image(pages: int) -> bytes:
    constants = guest_abi.constants() | {"PAGES": pages, "ITERATIONS": HOLDER_ITERATIONS}
    return assemble(HOLDER_SOURCE, GUEST_LOAD_ADDRESS, constants=constants, filename="holder").code


def guest(spec: str) -> GuestImage:
    """A guest of the catalog (`NAME,vps=N,mem=SIZE`), or `holder,pages=N[,mem=SIZE]`."""
    name, *options = spec.split(",")
    if name != "holder":
        return catalog.parse(spec)
    values = dict(option.split("=", 1) for option in options)
    return GuestImage("holder", holder_image(int(values["pages"])),
                      catalog.parse_size(values.get("mem", "16M")), 1)


@dataclass(frozen=True)
class Point:
    """One configuration: the same for every scenario."""

    sweep: str                    # ram, partitions, vps, mappings, storm, lps
    label: str                    # the sweep's value as the table shows it
    x: int                        # the sweep's value as a number (for plots)
    guests: tuple[str, ...]
    lps: int
    request_per_lp: int           # LP time at the request
    scenarios: tuple[str, ...] = SCENARIOS
    devices: int | None = None    # the devices sweep: block devices assigned, each busy at the request

    @property
    def busy_lps(self) -> int:
        """LPs with a VP: an LP without one retires nothing, so it does not count toward the request."""
        vps = sum(guest(spec).vp_count for spec in self.guests)
        return min(self.lps, vps)

    @property
    def request_at(self) -> int:
        """The request, in instructions of the whole machine (what `machine.run` counts)."""
        return self.request_per_lp * self.busy_lps


def device_guests(count: int) -> tuple[str, ...]:
    """`count` streaming guests, each with a block device of its own."""
    return tuple(f"{DEVICE_GUEST_KINDS[number % len(DEVICE_GUEST_KINDS)]},mem=16M,device=blk{number}"
                 for number in range(count))


def _size_label(size: int) -> str:
    return f"{size >> 30}G" if size >= 1 << 30 else f"{size >> 20}M"


def points(quick: bool = False) -> list[Point]:
    """The sweeps (bench/README.md). Quick: every sweep and scenario, small sizes."""
    ram_sizes = (16 * MIB, 256 * MIB) if quick else tuple(16 * MIB << shift for shift in range(7))   # to 1 GiB
    partitions = (1, 4) if quick else (1, 2, 4, 8, 16)
    vps = (1, 8) if quick else (1, 2, 4, 8, 16, 32)
    held = (HELD_PAGES[0], MANY_MAPPINGS) if quick else HELD_PAGES      # two: flatness is judged
    storm = (STORM_MANY_POINT,) if quick else tuple(STORM_POINTS)
    lp_counts = (1, 2) if quick else (1, 2, 3, 4)
    device_counts = (0, 2) if quick else (0, 1, 2, 4)
    result = [Point("ram", _size_label(size), size, (f"counter,mem={_size_label(size)}",), 1, COUNTER_POINT)
              for size in ram_sizes]
    result += [Point("partitions", str(count), count, ("counter,mem=16M",) * count, 2, COUNTER_POINT)
               for count in partitions]
    result += [Point("vps", str(count), count, (f"counter,mem=16M,vps={count}",), 4, COUNTER_POINT)
               for count in vps]
    result += [Point("mappings", f"{pages:,}", pages, (f"holder,pages={pages}",), 1,
                     HOLDER_START + pages * TICKS_PER_MAP) for pages in held]
    result += [Point("storm", STORM_POINTS[at], at, STORM_GUESTS, 2, at) for at in storm]
    result += [Point("lps", str(count), count, ("counter,mem=16M",) * 4, count, COUNTER_POINT)
               for count in lp_counts]
    result += [Point(DEVICES, str(count), count, DEVICE_BESIDE + device_guests(count), DEVICE_LPS, DEVICE_POINT,
                     DEVICE_SCENARIOS, devices=count) for count in device_counts]
    result += [Point(NO_DEVICES, str(count), count, DEVICE_BESIDE + ("counter,mem=16M",) * count, DEVICE_LPS,
                     DEVICE_POINT, DEVICE_SCENARIOS) for count in device_counts if count]
    return result


# --- reading the machine -------------------------------------------------------------------------------
def vp_table(booted: Booted) -> dict[int, dict]:
    """The running hypervisor's VPs by VMCS address: partition, index, LP, and its state
    (running, waiting, sleeping, ended: `tools.blackout.vp_state`)."""
    partitions = booted.partitions()
    table = {}
    for record in booted.vp_records():
        vp, partition = record.fields, record.partition
        table[vp["vmcs"]] = {"partition": partition, "vp": vp["index"], "lp": vp["lp"],
                             "state": blackout.vp_state(vp, partitions[partition])}
    return table


def mapped_pages(booted: Booted) -> int:
    return sum(partition["mapped_pages"] for partition in booted.partitions())


@dataclass
class GuestProgress:
    """Guest instructions of every VMCS, from the event stream: the LP time between a VM entry and the
    next VM exit is the guest's own (one tick per instruction retired on the LP). Each stretch is kept
    with the host time at both ends, so the moment a VP reaches a given count can be found afterwards."""

    started: float = field(default_factory=time.perf_counter)
    entered: dict[int, tuple[int, float]] = field(default_factory=dict)
    stretches: dict[int, list[tuple[int, int, float, float]]] = field(default_factory=dict)
    first_entry: tuple[int, float] | None = None

    def __call__(self, event: Event) -> None:
        if event.kind == "vm-entry":
            now = time.perf_counter()
            self.entered[event.data["vmcs"]] = (event.time, now)
            if self.first_entry is None:
                self.first_entry = (event.time, now)
        elif event.kind == "vm-exit":
            entry = self.entered.pop(event.data["vmcs"], None)
            if entry is not None:
                self.stretches.setdefault(event.data["vmcs"], []).append(
                    (entry[0], event.time, entry[1], time.perf_counter()))

    def checkpoint(self, lp_times: dict[int, int]) -> None:
        """Counts each VMCS's stretch under way up to its LP's time now (`lp_times`: VMCS to that
        time), as if it had exited there: a VP running alone on its LP may not exit for a long time."""
        now = time.perf_counter()
        for vmcs, (entered_at, host_entered) in list(self.entered.items()):
            if vmcs in lp_times and lp_times[vmcs] > entered_at:
                self.stretches.setdefault(vmcs, []).append((entered_at, lp_times[vmcs], host_entered, now))
                self.entered[vmcs] = (lp_times[vmcs], now)

    def retired(self, vmcs: int) -> int:
        return sum(end - start for start, end, _, _ in self.stretches.get(vmcs, ()))

    def reached(self, vmcs: int, count: int) -> tuple[int, float] | None:
        """LP time and host seconds (from `started`) at which the VMCS's guest had retired `count`."""
        done = 0
        for start, end, host_start, host_end in self.stretches.get(vmcs, ()):
            if done + end - start >= count:
                part = (count - done) / (end - start) if end > start else 1.0
                return start + count - done, host_start + part * (host_end - host_start) - self.started
            done += end - start
        return None


# --- the scenarios ---------------------------------------------------------------------------------------
def _boot(point: Point, hypervisor: str) -> Booted:
    return boot.boot([guest(spec) for spec in point.guests], hypervisor=hypervisor, lps=point.lps)


def _run_to_request(booted: Booted, point: Point) -> None:
    booted.machine.run(max_instructions=point.request_at)
    if booted.machine.stop is not None and booted.machine.stop.reason != "instruction-limit":
        raise RuntimeError(f"{point.sweep} {point.label}: the guests ended before instruction {point.request_at}")


def hot(point: Point, scenario: str) -> dict:
    """Boot hv1, run to the request point, hot-restart into hv2 (`tools.restart`), run a little on.
    Suspend and resume the same way: the recorder follows the machine across its reset."""
    started = time.perf_counter()
    booted = _boot(point, FROM_HYPERVISOR)
    _run_to_request(booted, point)
    devices = device_load.assigned([guest(spec) for spec in point.guests])
    waited = device_load.run_until_busy(booted, devices, DEVICE_BUSY_STEP, DEVICE_BUSY_LIMIT) if devices else 0
    busy_at_request = device_load.busy(booted, devices)
    requested_at = booted.machine.retired
    mappings_at_request = mapped_pages(booted)
    mode = PROTOCOL_MODES[scenario]
    dma, events = device_load.DmaLog(), booted.machine.events     # (a suspend replaces the machine)
    if devices:
        events.subscribe(dma, device_load.EVENT_KINDS)
    recorder = restart_module.request(booted, TO_HYPERVISOR, mode=mode)
    info = restart_module.summary(booted, recorder, FROM_HYPERVISOR, None, mode)
    if recorder.committed:
        booted.machine.run(max_instructions=booted.machine.retired + AFTER_RESTART)
    if devices:
        events.unsubscribe(dma)
    phases = {phase["phase"]: phase for phase in info["phases"]}
    windows = recorder.memory_before[1] if recorder.memory_before else None
    restart_phases = [phase for phase in info["phases"] if phase["phase"] not in AFTER_TAKEOVER]
    return {
        "outcome": info["outcome"], "reason": info["reason"],
        "blackout_ticks": info["blackout"]["max_ticks"], "blackout_host_ms": info["blackout"]["max_host_ms"],
        "per_vp": [{key: vp[key] for key in ("partition", "vp", "lp", "state", "blackout_ticks", "blackout_host_ms")}
                   for vp in info["blackout"]["per_vp"]],
        "blackout_phase_ticks": phases["blackout"]["virtual_ticks"] if "blackout" in phases else None,
        "blackout_phase_bytes": phases["blackout"]["bytes_sent"] if "blackout" in phases else None,
        "restart_ticks": sum(phase["virtual_ticks"] for phase in restart_phases),
        "restart_host_s": sum(phase["host_ms"] for phase in restart_phases) / 1e3,
        "phases": {name: {"virtual_ticks": phase["virtual_ticks"], "host_ms": phase["host_ms"],
                          "bytes_sent": phase["bytes_sent"]} for name, phase in phases.items()},
        "mappings_at_request": mappings_at_request,
        "mappings_at_blackout": sum(len(window) for window in windows.values()) if windows is not None else None,
        "partitions_ended_by_blackout": _ended_by_blackout(info["blackout"]["per_vp"]),
        "records_sent": info["records_sent"],   # by type: window_reset says a change log overflowed
        "disk": info["disk"],                   # commands, bytes written and read, busy ticks (suspend)
        "guest_memory_unchanged": info["guest_memory_unchanged"],
        "guests_stopped_after": sum(1 for partition in booted.partitions()
                                    if partition["state"] == layouts.PARTITION_STOPPED),
        "bench_host_s": time.perf_counter() - started,
    } | ({"postcopy": _drain(info["postcopy"], len(point.guests))} if "postcopy" in info else {}) \
      | ({"devices": _devices(devices, busy_at_request, waited, requested_at, info, dma)}
         if point.devices is not None else {})


def _devices(devices: dict[int, int], busy_at_request: list[int], waited: int, requested_at: int, info: dict,
             dma: device_load.DmaLog) -> dict:
    """The devices at a restart: how many were busy when it was requested, the DEVICE records that
    crossed, each device's DMA on both sides of the blackout, and the largest blackout of the device
    guests' VPs that were running (a VP halted for its completion has none: `tools.blackout`)."""
    phases = {phase["phase"]: phase for phase in info["phases"]}
    per_device = []
    if "blackout" in phases and "devirtualize" in phases:
        takeover = phases["devirtualize"]
        per_device = dma.across(sorted(devices.values()), phases["blackout"]["virtual_start"],
                                takeover["virtual_start"] + takeover["virtual_ticks"])
    guest_vps = [vp for vp in info["blackout"]["per_vp"] if vp["partition"] in devices]
    measured = [vp["blackout_ticks"] for vp in guest_vps if vp["blackout_ticks"] is not None]
    return {
        "assigned": len(devices),
        "busy_at_request": len(busy_at_request),
        "requested_at": requested_at,             # instructions: the point's request, and then `waited`
        "waited_for_busy": waited,
        "device_records_sent": info["records_sent"].get("device", 0),
        "dma_both_sides": sum(1 for row in per_device if row["entries_before"] and row["entries_after"]),
        "in_flight_at_blackout": sum(1 for row in per_device if row["in_flight_at_blackout"]),
        "per_device": per_device,
        "guest_vp_states": [vp["state"] for vp in guest_vps],
        "guest_vp_blackout_ticks": max(measured, default=None),
    }


def _drain(report: dict, guests: int) -> dict:
    """A post-copy's cost after its commit (tools/postcopy_meter.py), with the demand fetches of every
    guest (partition) counted, none included."""
    per_partition = report["demand_fetches_per_partition"]
    return report | {"demand_fetches_per_guest": [per_partition.get(number, 0) for number in range(guests)]}


def _ended_by_blackout(per_vp: list[dict]) -> int:
    """Partitions that had ended when the blackout began (a storm that finished during pre-copy)."""
    states: dict[int, set[str]] = {}
    for vp in per_vp:
        states.setdefault(vp["partition"], set()).add(vp["state"])
    return sum(1 for partition_states in states.values() if partition_states == {"ended"})


def _lp_times(booted: Booted) -> dict[int, int]:
    """Each VMCS's LP's virtual time now."""
    return {vmcs: booted.machine.lps[vp["lp"]].now for vmcs, vp in vp_table(booted).items()}


def cold(point: Point) -> dict:
    """Boot hv1 and run to the request point; note each VP's guest instructions; discard the machine;
    boot hv2 from scratch with the same guests and run until every VP has retired as many guest
    instructions again. A VP's blackout is the virtual time (its LP's clock, from the cold boot) and
    the host time that takes: the whole reboot, and the work redone."""
    started = time.perf_counter()
    booted = _boot(point, FROM_HYPERVISOR)
    before = GuestProgress()
    booted.machine.events.subscribe(before)
    _run_to_request(booted, point)
    before.checkpoint(_lp_times(booted))
    booted.machine.events.unsubscribe(before)
    mappings_at_request = mapped_pages(booted)
    targets = {(vp["partition"], vp["vp"]): (before.retired(vmcs), vp)
               for vmcs, vp in vp_table(booted).items() if before.retired(vmcs)}   # VPs that ran
    del booted                                  # the machine is discarded: a cold restart keeps nothing

    after = GuestProgress()
    fresh = _boot(point, TO_HYPERVISOR)
    fresh.machine.events.subscribe(after)
    budget = point.request_at * COLD_BUDGET_FACTOR + COLD_BUDGET_EXTRA
    reached: dict[tuple[int, int], tuple[int, float] | None] = {}
    while fresh.machine.retired < budget:
        fresh.machine.run(max_instructions=min(budget, fresh.machine.retired + COLD_STEP))
        after.checkpoint(_lp_times(fresh))
        by_identity = {(vp["partition"], vp["vp"]): vmcs for vmcs, vp in vp_table(fresh).items()}
        reached = {identity: after.reached(by_identity[identity], count) if identity in by_identity else None
                   for identity, (count, _) in targets.items()}
        if all(mark is not None for mark in reached.values()):
            break
        if fresh.machine.stop is not None and fresh.machine.stop.reason != "instruction-limit":
            break
    fresh.machine.events.unsubscribe(after)
    per_vp = []
    for identity, (count, vp) in sorted(targets.items()):
        mark = reached.get(identity)
        per_vp.append({"partition": vp["partition"], "vp": vp["vp"], "lp": vp["lp"], "state": vp["state"],
                       "guest_instructions": count,
                       "blackout_ticks": mark[0] if mark else None,
                       "blackout_host_ms": mark[1] * 1e3 if mark else None})
    running = [vp for vp in per_vp if vp["state"] == "running"]
    complete = bool(running) and all(vp["blackout_ticks"] is not None for vp in running)
    return {
        "outcome": "back" if complete else "not back",
        "blackout_ticks": max(vp["blackout_ticks"] for vp in running) if complete else None,
        "blackout_host_ms": max(vp["blackout_host_ms"] for vp in running) if complete else None,
        "per_vp": per_vp,
        "blackout_phase_ticks": None,           # a cold restart has no such phase: all of it is blackout
        "restart_ticks": max(vp["blackout_ticks"] for vp in running) if complete else None,
        "restart_host_s": max(vp["blackout_host_ms"] for vp in running) / 1e3 if complete else None,
        "boot_ticks": after.first_entry[0] if after.first_entry else None,
        "boot_host_ms": (after.first_entry[1] - after.started) * 1e3 if after.first_entry else None,
        "mappings_at_request": mappings_at_request,
        "bench_host_s": time.perf_counter() - started,
    }


def measure_point(point: Point, scenario: str) -> dict:
    return hot(point, scenario) if scenario in PROTOCOL_MODES else cold(point)


# --- the whole bench -------------------------------------------------------------------------------------
def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _verdict(met: bool | None, comparable: bool = True) -> str:
    if not comparable:
        return "not comparable"
    return "not comparable" if met is None else "met" if met else "missed"


def _compare_modes(results: list[dict], sweep: str, x: int, what: str, faster: str, slower: str) -> dict | None:
    """Two hot modes at one point: the ratio of their largest VP blackouts, `slower`'s over `faster`'s,
    against FASTER_FACTOR."""
    rows = {row["scenario"]: row for row in results if row["sweep"] == sweep and row["x"] == x}
    fast, slow = rows.get(faster), rows.get(slower)
    if not (fast and slow and fast["blackout_ticks"] and slow["blackout_ticks"]):
        return None
    ratio = slow["blackout_ticks"] / fast["blackout_ticks"]
    # Comparable only if the same state had to cross: no guest ended before either blackout.
    comparable = not fast["partitions_ended_by_blackout"] and not slow["partitions_ended_by_blackout"]
    by = (f"{ratio:.1f} against {FASTER_FACTOR} ({fast['blackout_ticks']:,} against {slow['blackout_ticks']:,} "
          "ticks)")
    if not comparable:
        by += (f"; not comparable: guests ended before the blackout ({MODE_NAMES[faster]} "
               f"{fast['partitions_ended_by_blackout']}, {MODE_NAMES[slower]} {slow['partitions_ended_by_blackout']}), "
               f"mappings at the blackout {fast['mappings_at_blackout']:,} against {slow['mappings_at_blackout']:,}")
    met = ratio >= FASTER_FACTOR
    return {"target": f"{MODE_NAMES[faster]}'s largest VP blackout at least {FASTER_FACTOR} times lower than "
                      f"{MODE_NAMES[slower]}'s with {what}",
            "ratio": ratio, "host_ms_ratio": slow["blackout_host_ms"] / fast["blackout_host_ms"],
            "limit": float(FASTER_FACTOR), "met": met if comparable else None, "verdict": _verdict(met, comparable),
            "by": by, "mappings_at_request": fast["mappings_at_request"],
            "mappings_at_blackout": {faster: fast["mappings_at_blackout"], slower: slow["mappings_at_blackout"]}}


def _flat(results: list[dict], sweep: str, scenario: str, what: str) -> dict | None:
    """A scenario's largest VP blackout over a sweep: its largest over its smallest, against FLAT_LIMIT
    (None with fewer than two points)."""
    rows = [row for row in results if row["sweep"] == sweep and row["scenario"] == scenario
            and row["blackout_ticks"] is not None]
    if len(rows) < 2:
        return None
    smallest, largest = min(rows, key=lambda row: row["x"]), max(rows, key=lambda row: row["x"])
    low = min(rows, key=lambda row: (row["blackout_ticks"], row["x"]))      # (ties: the smallest point,
    high = max(rows, key=lambda row: (row["blackout_ticks"], row["x"]))     # and the largest)
    ratio = high["blackout_ticks"] / low["blackout_ticks"]
    host = [row["blackout_host_ms"] for row in rows]
    return {"target": f"{SCENARIO_TITLES[scenario]}: largest VP blackout flat in {what} from "
                      f"{smallest['label']} to {largest['label']} (largest over smallest at most {FLAT_LIMIT})",
            "ratio": ratio, "host_ms_ratio": max(host) / min(host), "limit": FLAT_LIMIT,
            "met": ratio <= FLAT_LIMIT, "verdict": _verdict(ratio <= FLAT_LIMIT),
            "by": f"{ratio:.3f} against {FLAT_LIMIT} ({low['blackout_ticks']:,} ticks at {low['label']}, "
                  f"{high['blackout_ticks']:,} at {high['label']})"}


def targets(results: list[dict]) -> dict:
    """The issues' targets: each met, missed or not comparable, with the figures behind it."""
    candidates = {f"flat_in_guest_ram[{scenario}]": _flat(results, "ram", scenario, "guest RAM")
                  for scenario in HOT_MODES}
    candidates[f"flat_in_mappings[{POSTCOPY}]"] = _flat(results, "mappings", POSTCOPY, "mappings held")
    candidates["precopy_vs_stop_and_copy[held]"] = _compare_modes(
        results, "mappings", MANY_MAPPINGS, f"{MANY_MAPPINGS:,} scattered mappings held (holder guest)",
        PRECOPY, STOP_AND_COPY)
    most_held = max((row["x"] for row in results if row["sweep"] == "mappings"), default=None)
    if most_held is not None:
        candidates["postcopy_vs_precopy[held]"] = _compare_modes(
            results, "mappings", most_held, f"{most_held:,} scattered mappings held (holder guest)",
            POSTCOPY, PRECOPY)
    candidates["precopy_vs_stop_and_copy[storm]"] = _compare_modes(
        results, "storm", STORM_MANY_POINT, f"{STORM_POINTS[STORM_MANY_POINT]} mappings of a running storm at "
        "the request", PRECOPY, STOP_AND_COPY)
    candidates["suspend_resume_comparison"] = _suspend_target(results)
    for scenario in DEVICE_SCENARIOS:
        candidates[f"devices_busy_against_none[{scenario}]"] = _devices_against_none(results, scenario)
    return {name: target for name, target in candidates.items() if target is not None}


def _by_count(results: list[dict], sweep: str, scenario: str) -> dict[int, dict]:
    return {row["x"]: row for row in results if row["sweep"] == sweep and row["scenario"] == scenario
            and row["blackout_ticks"] is not None}


def _ratios(rows: dict[int, dict], against, key: str) -> dict[int, float]:
    """Each row's `key` over the row `against(x)` gives (left out where it gives none)."""
    return {x: row[key] / against(x)[key] for x, row in sorted(rows.items()) if x and against(x)}


def _devices_against_none(results: list[dict], scenario: str) -> dict | None:
    """A hot mode's largest VP blackout, and its blackout phase, with N devices busy against the same
    point without a device (the devices sweep's 0), and against a counter in each device guest's place
    (NO_DEVICES): ratios at every N, no target."""
    rows, counters = _by_count(results, DEVICES, scenario), _by_count(results, NO_DEVICES, scenario)
    none = rows.get(0)
    if none is None or len(rows) < 2:
        return None
    ratios = _ratios(rows, lambda x: none, "blackout_ticks")
    phase_ratios = _ratios(rows, lambda x: none, "blackout_phase_ticks")
    in_place = _ratios(rows, counters.get, "blackout_ticks")
    most = max(ratios)

    def listed(figures: dict[int, float]) -> str:
        return ", ".join(f"{x} busy {ratio:.3f}" for x, ratio in figures.items())

    by = (f"{listed(ratios)} ({rows[most]['blackout_ticks']:,} ticks with {most} against {none['blackout_ticks']:,} "
          f"without); blackout phase {listed(phase_ratios)} ({rows[most]['blackout_phase_ticks']:,} against "
          f"{none['blackout_phase_ticks']:,} ticks, {rows[most]['blackout_phase_bytes']:,} against "
          f"{none['blackout_phase_bytes']:,} bytes)")
    if in_place:
        by += f"; against a counter in each device guest's place {listed(in_place)}"
    return {"target": f"{SCENARIO_TITLES[scenario]}: largest VP blackout with block devices busy against "
                      "without (no target: the ratio)",
            "ratio": ratios[most], "ratios": ratios, "blackout_phase_ratios": phase_ratios,
            "against_counters_in_place": in_place,
            "host_ms_ratio": rows[most]["blackout_host_ms"] / none["blackout_host_ms"], "limit": None,
            "met": None, "verdict": REPORTED, "by": by}


def _suspend_target(results: list[dict]) -> dict | None:
    """Every hot restart's largest VP blackout against suspend and resume's, at the largest guest RAM
    of the ram sweep (1 GiB in the full set)."""
    rows = [row for row in results if row["sweep"] == "ram"]
    if not rows:
        return None
    largest = max(row["x"] for row in rows)
    at = {row["scenario"]: row for row in rows if row["x"] == largest}
    suspend = at.get(SUSPEND)
    hot_rows = [at.get(scenario) for scenario in HOT_MODES]
    if not suspend or not suspend["blackout_ticks"] or not all(row and row["blackout_ticks"] for row in hot_rows):
        return None
    ratios = {row["scenario"]: suspend["blackout_ticks"] / row["blackout_ticks"] for row in hot_rows}
    host = {row["scenario"]: suspend["blackout_host_ms"] / row["blackout_host_ms"] for row in hot_rows}
    met = min(ratios.values()) >= SUSPEND_FACTOR
    label = next(row["label"] for row in rows if row["x"] == largest)
    by = "; ".join(f"{SCENARIO_TITLES[name]} {ratios[name]:,.0f} times ({at[name]['blackout_ticks']:,} against "
                   f"{suspend['blackout_ticks']:,} ticks; host {host[name]:,.0f} times)" for name in ratios)
    return {"target": f"hot restart's largest VP blackout at least {SUSPEND_FACTOR} times lower than suspend "
                      f"and resume's, at {label} of guest RAM",
            "ratio": min(ratios.values()), "ratios": ratios, "host_ms_ratios": host, "limit": SUSPEND_FACTOR,
            "ram": label, "met": met, "verdict": _verdict(met), "by": by}


def run(quick: bool = False, progress=None, selected: list[Point] | None = None) -> dict:
    """Measures every point in every scenario; the document `report` writes out."""
    started = time.perf_counter()
    results = []
    for point in selected if selected is not None else points(quick):
        for scenario in point.scenarios:
            figures = measure_point(point, scenario)
            row = {"sweep": point.sweep, "label": point.label, "x": point.x, "scenario": scenario,
                   "guests": list(point.guests), "lps": point.lps, "request_at": point.request_at,
                   "request_per_lp": point.request_per_lp,
                   "blackout_ticks": None, "blackout_host_ms": None, "blackout_phase_ticks": None,
                   "restart_ticks": None, "restart_host_s": None} | figures
            results.append(row)
            if progress is not None:
                progress(row)
    document = {"schema": SCHEMA_VERSION, "bench": "restart_scenarios", "quick": quick,
                "machine": machine_info(), "machine_seed": 0,
                "from": FROM_HYPERVISOR, "to": TO_HYPERVISOR,
                "scenarios": {name: SCENARIO_TITLES[name] for name in SCENARIOS},
                "points": [asdict(point) | {"request_at": point.request_at}
                           for point in (selected if selected is not None else points(quick))],
                "results": results}
    document["targets"] = targets(results)
    document["host_seconds"] = time.perf_counter() - started
    return document


def main(quick: bool = False, json_path: str | None = None, output: str | None = None) -> int:
    from bench import report

    directory = Path(output) if output else DEFAULT_OUTPUT

    def progress(row: dict) -> None:
        print(report.progress_line(row), flush=True)

    document = run(quick, progress)
    written = report.write(document, directory, json_path)
    print()
    print(report.table(document))
    print()
    print(report.targets_text(document))
    print(f"\n{len(document['results'])} results in {document['host_seconds']:.1f} s; written: "
          + ", ".join(str(path) for path in written))
    return 0
