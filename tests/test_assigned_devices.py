"""Block devices assigned to guests by both hypervisors (docs/guests.md, "An assigned block device"):
a guest streams blocks through its device without an exit, the IOMMU keeps a hostile guest's DMA in
its own RAM, a device's completion interrupt reaches the VP that asked for it as a virtual interrupt
(and wakes it from HLT), the device is taken back when the partition ends, devices cross a hot
restart busy with every DMA write inside the device's partition (tools/dma_audit.py, which catches
one planted outside), and a suspend with a device aborts cleanly."""
from __future__ import annotations

import pytest

from emu.block_devices import DeviceStatus
from emu.block_devices import ROUTE_LP_SHIFT, ROUTE_VECTOR_MASK
from emu.iommu import ADDRESS_MASK, ROOT_ENTRY_BYTES, ROOT_PRESENT
from emu.ports import BLOCK_DEVICE_BASE, BLOCK_DEVICE_STRIDE, DEVICE_CAPACITY, DEVICE_TAIL
from emu.vmx_defs import ExitReason
from guests import catalog
from guests.catalog import GuestSpecError
from hypervisors import boot, build, transfer
from hypervisors.boot import BootError
from tools import faults
from tools import dma_audit
from tools import restart as restart_module
from tools import run as run_module

STREAM_LINE = "blkstream: rounds 48, blocks moved 768, checksum "
ROUNDS = 48                                     # blkstream.inc: a doorbell each
COMPLETION_VECTOR = 0x50                        # blkirq.s: the vector it asks its completions at
TIMER_VECTOR = 0x40                             # timer.s
ROUTE_STEP = 200_000                            # instructions run between two looks at the routes
RESTART_AT = 300_000
HYPERVISOR_ADDRESS = 0x200000                   # dmahostile.s: where it aims a read
HOSTILE_MARK = 0x4B52414D444E4947               # dmahostile.s: what that read brings
IO_QUALIFICATION_PORT_SHIFT = 16                # SDM Table 28-5: the port in bits 31:16


def _guests(document: dict) -> dict[str, dict]:
    return {guest["name"]: guest for guest in document["guests"]}


@pytest.mark.parametrize("hypervisor", sorted(build.HYPERVISORS))
def test_a_guest_streams_through_its_device_and_a_hostile_one_is_kept_in_its_own_ram(hypervisor):
    guests = ["blkstream,device=blk2", "dmahostile,device=blk0", "hello"]
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor=hypervisor, record_events=True)
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    document = run_module.document(booted, result, 1)
    reports = _guests(document)
    assert reports["blkstream"]["exit_code"] == 0 and reports["blkstream"]["console"].startswith(STREAM_LINE)
    assert reports["dmahostile"]["exit_code"] == 0, reports["dmahostile"]["console"]
    assert reports["hello"]["console"] == "hello from VP 0\n"
    events = booted.machine.events.events
    faults = [event.data for event in events if event.kind == "iommu-fault"]
    assert {fault["device"] for fault in faults} == {0} and len(faults) == 2      # the entry and the queue
    dma = [event.data for event in events if event.kind == "dma"]
    assert {entry["device"] for entry in dma} == {0, 2}
    assert sum(entry["count"] for entry in dma if entry["device"] == 2) == 768
    # Its read "into the hypervisor's address" landed in its own RAM at that guest-physical address.
    hostile_ram = booted.partitions()[1]["memory"]
    assert booted.machine.ram.read_u64(hostile_ram + HYPERVISOR_ADDRESS) == HOSTILE_MARK
    assert booted.machine.ram.read_u64(HYPERVISOR_ADDRESS) != HOSTILE_MARK
    # Through the I/O bitmap: a guest's own device costs it no exit; the others' ports exit. Only
    # blkstream's probes of blk0 and blk1 exit (its device is blk2; dmahostile's, blk0, is its first try).
    device_ports = range(BLOCK_DEVICE_BASE, BLOCK_DEVICE_BASE + 4 * BLOCK_DEVICE_STRIDE)
    exits = [event.data["qualification"] >> IO_QUALIFICATION_PORT_SHIFT for event in events
             if event.kind == "vm-exit" and event.data["reason"] == ExitReason.IO_INSTRUCTION
             and event.data["qualification"] >> IO_QUALIFICATION_PORT_SHIFT in device_ports]
    assert exits == [BLOCK_DEVICE_BASE + DEVICE_CAPACITY, BLOCK_DEVICE_BASE + BLOCK_DEVICE_STRIDE + DEVICE_CAPACITY]
    direct = [event for event in events if event.kind in ("io-in", "io-out") and event.data["port"] in device_ports]
    assert len(direct) > 2 * 48                          # every doorbell and poll went straight to the device


def _irq_line(stream_console: str) -> str:
    """blkirq's line: blkstream's (the same checksum), then one interrupt per round."""
    return stream_console.replace("blkstream", "blkirq").rstrip("\n") + f", interrupts {ROUNDS}\n"


def _stream_console() -> str:
    return run_module.run("hv1", ["blkstream,device=blk0"]).document["guests"][0]["console"]


def _run_until_routed(booted, devices: list[int]) -> dict[int, int]:
    """The machine run (paused and resumed, which changes nothing) until each device's completion
    interrupt is routed, as the guest's set-device-interrupt hypercall has the hypervisor do: the routes."""
    block_devices = booted.machine.io.block_devices.devices
    limit = 0
    while not all(block_devices[device].route for device in devices):
        limit += ROUTE_STEP
        assert limit < run_module.DEFAULT_INSTRUCTION_LIMIT, "a device was never routed"
        booted.machine.run(max_instructions=limit)
    return {device: block_devices[device].route for device in devices}


def _doorbells(events, device: int) -> int:
    port = BLOCK_DEVICE_BASE + device * BLOCK_DEVICE_STRIDE + DEVICE_TAIL
    return sum(1 for event in events if event.kind == "io-out" and event.data["port"] == port)


def _injected(events, vmcs: int) -> list[int]:
    """The vectors injected into one VMCS at VM entry, in order."""
    return [event.data["vector"] for event in events if event.kind == "inject" and event.data["vmcs"] == vmcs]


@pytest.mark.parametrize("lps", [1, 2])
@pytest.mark.parametrize("hypervisor", sorted(build.HYPERVISORS))
def test_each_partition_gets_its_own_device_s_completions_as_virtual_interrupts(hypervisor, lps):
    guests = ["blkirq,device=blk0", "blkirq,device=blk3", "timer", "blkstream,device=blk1"]
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor=hypervisor, lps=lps, record_events=True)
    routes = _run_until_routed(booted, [0, 3])
    vps = {record.partition: record.fields for record in booted.vp_records()}
    # Each device's route: a host vector of its own, on the LP of the VP that asked.
    for partition, device in ((0, 0), (1, 3)):
        assert routes[device] >> ROUTE_LP_SHIFT == vps[partition]["lp"]
    assert len({route & ROUTE_VECTOR_MASK for route in routes.values()}) == 2
    assert booted.machine.io.block_devices.devices[1].route == 0          # blkstream polls: never routed
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    reports = run_module.document(booted, result, lps)["guests"]
    expected = _irq_line(_stream_console())
    assert [report["console"] for report in reports[:2]] == [expected, expected]
    assert [report["exit_code"] for report in reports] == [0, 0, 0, 0], [report["console"] for report in reports]
    events = booted.machine.events.events
    # One virtual interrupt per doorbell, into the VMCS of the partition that owns the device only.
    for partition, device in ((0, 0), (1, 3)):
        assert _doorbells(events, device) == ROUNDS
        assert _injected(events, vps[partition]["vmcs"]) == [COMPLETION_VECTOR] * ROUNDS
    assert set(_injected(events, vps[2]["vmcs"])) == {TIMER_VECTOR}        # the timer's ticks, nothing else
    assert _injected(events, vps[3]["vmcs"]) == []
    # The devices are taken back with their routes.
    assert [booted.machine.io.block_devices.devices[device].route for device in (0, 3)] == [0, 0]


# Alone on its LP (idle, the LP sleeps), beside a VP that waits for its ticks (the LP spins), and on LP 1.
@pytest.mark.parametrize("guests, lps", [(["blkirq,device=blk2"], 1), (["timer", "blkirq,device=blk2"], 1),
                                         (["hello", "blkirq,device=blk2"], 2)])
@pytest.mark.parametrize("hypervisor", sorted(build.HYPERVISORS))
def test_a_halted_vp_wakes_at_its_device_s_completion(hypervisor, guests, lps):
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor=hypervisor, lps=lps, record_events=True)
    route = _run_until_routed(booted, [2])[2]
    booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    (vp,) = [record.fields for record in booted.vp_records() if record.partition == len(guests) - 1]
    assert route >> ROUTE_LP_SHIFT == vp["lp"] == lps - 1
    host_vector = route & ROUTE_VECTOR_MASK
    # After each HLT the LP idles (sleeps, or spins for the timer's next tick), the completion's host
    # vector is taken there at once (a root-mode interrupt), and the VP's next entry brings the
    # virtual interrupt.
    hlt_exits = after = 0
    woken = []
    for event in booted.machine.events.events:
        if event.kind == "vm-exit" and event.data["vmcs"] == vp["vmcs"] and event.data["reason"] == ExitReason.HLT:
            hlt_exits += 1
            after = "halted"
        elif after == "halted" and event.kind == "interrupt" and event.lp == vp["lp"] and event.data["vector"] == host_vector:
            after = "host interrupt"
        elif after and event.kind == "inject" and event.data["vmcs"] == vp["vmcs"]:
            woken.append((after, event.data["vector"]))
            after = None
    assert hlt_exits > 0 and woken == [("host interrupt", COMPLETION_VECTOR)] * hlt_exits
    assert booted.partitions()[-1]["exit_code"] == 0


def test_the_checksum_is_the_same_on_every_device_and_without_other_guests():
    lines = set()
    for spec in ("blkstream,device=blk0", "blkstream,device=blk3"):
        document = run_module.run("hv2", [spec]).document
        lines.add(document["guests"][0]["console"])
    assert len(lines) == 1 and next(iter(lines)).startswith(STREAM_LINE)


def test_a_partition_that_ends_gives_its_device_back():
    booted = boot.boot([catalog.parse("blkstream,device=blk1")], hypervisor="hv1")
    booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    device = booted.machine.io.block_devices.devices[1]
    assert device.queue_entries == 0 and device.status(booted.machine.now) == DeviceStatus.IDLE
    iommu = booted.machine.io.iommu
    assert booted.machine.ram.read_u64(iommu.root + 16) == 0          # its root entry cleared
    assert not any(key[0] == 1 for key in iommu.iotlb)                # and its translations dropped


CROSSING_GUESTS = ["blkirq,device=blk0", "blkstream,device=blk3", "storm", "counter"]
# Every hot mode in both directions on 2 LPs, and one direction and mode each on 1 and on 3 LPs.
CROSSING_CASES = [(mode, source, target, 2) for mode in ("precopy", "stop-and-copy", "postcopy")
                  for source, target in (("hv1", "hv2"), ("hv2", "hv1"))] + [
    ("precopy", "hv1", "hv2", 1), ("postcopy", "hv2", "hv1", 3),
    ("stop-and-copy", "hv1", "hv1", 2), ("postcopy", "hv2", "hv2", 1)]      # a version onto itself


def assert_crossing_guests_as_without_restart(document: dict, hypervisor: str, lps: int = 2) -> None:
    """Every guest of CROSSING_GUESTS ends with the exit code and console of a run without a restart."""
    without = {g["name"]: g for g in run_module.run(hypervisor, CROSSING_GUESTS, lps=lps).document["guests"]}
    for guest in document["guests"]:
        assert (guest["exit_code"], guest["console"]) == (without[guest["name"]]["exit_code"],
                                                          without[guest["name"]]["console"]), guest["name"]


@pytest.mark.parametrize("mode, source, target, lps", CROSSING_CASES,
                         ids=[f"{mode}-{source}-{target}-{lps}lp" for mode, source, target, lps in CROSSING_CASES])
def test_assigned_devices_cross_a_hot_restart_busy(mode, source, target, lps):
    """Two devices streaming, one of them interrupting its VP, through a hot restart in every hot mode:
    DEVICE records cross, the new hypervisor points the IOMMU at its own EPT, and the guests compute
    what they compute without a restart, every interrupt counted; no DMA is refused on the way, and
    the DMA audit finds every byte written inside the RAM of the device's partition."""
    booted = boot.boot([catalog.parse(spec) for spec in CROSSING_GUESTS], hypervisor=source, lps=lps)
    audit = dma_audit.DmaAudit(booted)
    faults = []
    booted.machine.events.subscribe(faults.append, frozenset({"iommu-fault"}))
    dma = []
    booted.machine.events.subscribe(dma.append, frozenset({"dma"}))
    booted.machine.run(max_instructions=RESTART_AT)
    recorder = restart_module.request(booted, target, mode=restart_module.MODES[mode])
    assert recorder.committed and booted.hypervisor == target
    assert recorder.digest.records_by_type.get("device", 0) >= 1, "no device crossed"
    during = len(dma)
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    assert_crossing_guests_as_without_restart(run_module.document(booted, result, lps), source, lps)
    assert not faults, faults[:3]
    assert len(dma) > during > 0, "the devices moved blocks before and after the restart"
    root = booted.machine.io.iommu.root
    assert root == booted.read_qword("iommu_root"), "the IOMMU reads the new hypervisor's root table"
    # Each entry's status, each read's data: the two streams' doorbells, 2 entries and 8 blocks each way.
    assert audit.writes >= 2 * len(dma) and not audit.violations, audit.summary()


# blkwindow's device reads into pages of its map window (docs/guests.md); behind two storms its window
# is the post-copy drain's last (tests/test_postcopy.py).
WINDOW_GUESTS = ["storm", "storm", "blkwindow,device=blk1"]
WINDOW_RESTART_AT = 2_000_000


def test_the_dma_audit_follows_a_device_into_its_map_window_through_a_post_copy():
    """blkwindow's reads land in map-window pages, outside its RAM: the audit finds them its
    partition's by the page-ownership database, and, while a post-copy's drain has not yet brought
    their owners, by the partition's window. Nothing is outside."""
    booted = boot.boot([catalog.parse(spec) for spec in WINDOW_GUESTS], hypervisor="hv1", lps=2)
    audit = dma_audit.DmaAudit(booted)
    booted.machine.run(max_instructions=WINDOW_RESTART_AT)
    assert audit.window_writes > 0 and audit.pending_writes == 0
    recorder = restart_module.request(booted, "hv2", mode=restart_module.MODES["postcopy"])
    assert recorder.committed
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    assert [guest["exit_code"] for guest in run_module.document(booted, result, 2)["guests"]] == [0, 0, 0]
    assert not audit.violations, audit.summary()
    assert audit.pending_writes > 0, "no DMA came before the drain gave the window's pages their owner"


def test_the_dma_audit_catches_a_device_pointed_at_another_partition_s_memory():
    """Root points blk0's IOMMU root entry at the other partition's EPT: the device's writes land in
    that partition's RAM, and the audit, which goes by the hypervisor's tables (blk0 is partition 0's),
    records them."""
    booted = boot.boot([catalog.parse(spec) for spec in ("blkstream,device=blk0", "counter")], hypervisor="hv1")
    iommu = booted.machine.io.iommu
    limit = 0
    while not (iommu.root and booted.device_owners() == {0: 0} and booted.partitions()[1]["eptp"]):
        limit += ROUTE_STEP
        assert limit < run_module.DEFAULT_INSTRUCTION_LIMIT, "blk0 was never assigned"
        booted.machine.run(max_instructions=limit)
    victim = booted.partitions()[1]
    booted.machine.ram.write_u64(iommu.root + 0 * ROOT_ENTRY_BYTES, victim["eptp"] & ADDRESS_MASK | ROOT_PRESENT)
    iommu.invalidate(0)
    audit = dma_audit.DmaAudit(booted)
    booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    assert audit.violations, audit.summary()
    own = booted.partitions()[0]
    for violation in audit.violations:
        assert (violation.device, violation.partition, violation.hypervisor) == (0, 0, "hv1")
        assert violation.ram == (own["memory"], own["memory_size"])
        assert victim["memory"] <= violation.address < victim["memory"] + victim["memory_size"]
    assert len(audit.violations) == audit.writes, "every write after the plant goes to the other partition"


@pytest.mark.parametrize("guest", ["blkstream", "blkirq"])
def test_a_suspend_with_a_device_assigned_aborts_and_the_guests_go_on(guest):
    """A suspend resets the machine, and its devices with it: it refuses a partition with one."""
    document = restart_module.restart("hv1", "hv2", [f"{guest},device=blk0", "counter"], request_at=RESTART_AT,
                                      mode="suspend")
    restart = document["restart"]
    assert restart["outcome"] == "aborted" and restart["reason"] == transfer.Status.DEVICE_ASSIGNED.name.lower()
    assert restart["detail"] == 0
    reports = _guests(document)
    expected = STREAM_LINE if guest == "blkstream" else _irq_line(_stream_console())
    assert reports[guest]["console"].startswith(expected) and reports[guest]["exit_code"] == 0
    assert reports["counter"]["exit_code"] == 0


@pytest.mark.parametrize("spec, message", [
    ("blkstream,device=blk4", "block devices blk0 to blk3"), ("blkstream,device=disk", "device=blkN")])
def test_a_bad_device_is_refused_with_a_message(spec, message):
    with pytest.raises((BootError, GuestSpecError), match=message):
        boot.boot([catalog.parse(spec)])


def test_one_device_goes_to_one_guest():
    with pytest.raises(BootError, match="one guest only"):
        boot.boot([catalog.parse("blkstream,device=blk1"), catalog.parse("dmahostile,device=blk1")])


@pytest.mark.parametrize("guest", ["blkstream", "blkirq"])
def test_a_guest_without_a_device_finds_none(guest):
    document = run_module.run("hv1", [guest]).document
    assert document["guests"][0]["exit_code"] == 1
    # blkirq says so only after set-device-interrupt answered ENODEV (else it says that it did not).
    assert document["guests"][0]["console"] == f"{guest}: no block device assigned; round 0\n"


@pytest.mark.parametrize("step", [step for step in faults.ABORT_STEPS if step not in ("request", "boot")])
def test_a_fault_at_each_step_with_devices_busy_aborts_cleanly(step):
    """The protocol's faults (tools/faults.py) while two devices stream: the restart aborts, the devices
    were never stopped, every guest computes what it computes without a restart, and no DMA landed
    outside its device's partition (hhr restart's DMA audit, on with a device assigned)."""
    document = restart_module.restart("hv1", "hv2", CROSSING_GUESTS, lps=2, request_at=RESTART_AT,
                                      inject=f"{step}:crash")
    assert document["restart"]["outcome"] == "aborted" and document["hypervisor"] == "hv1"
    assert_crossing_guests_as_without_restart(document, "hv1")
    audit = document["dma_audit"]
    assert audit["writes"] > 0 and audit["violations"] == 0, audit["first_violations"]

