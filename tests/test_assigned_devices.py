"""Block devices assigned to guests by both hypervisors (docs/guests.md, "An assigned block device"):
a guest streams blocks through its device without an exit, the IOMMU keeps a hostile guest's DMA in
its own RAM, the device is taken back when the partition ends, and a restart with a device aborts
cleanly for now."""
from __future__ import annotations

import pytest

from emu.block_devices import DeviceStatus
from emu.ports import BLOCK_DEVICE_BASE, BLOCK_DEVICE_STRIDE, DEVICE_CAPACITY
from emu.vmx_defs import ExitReason
from guests import catalog
from guests.catalog import GuestSpecError
from hypervisors import boot, build, transfer
from hypervisors.boot import BootError
from tools import restart as restart_module
from tools import run as run_module

STREAM_LINE = "blkstream: rounds 48, blocks moved 768, checksum "
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


def test_a_restart_with_a_device_assigned_aborts_and_the_guests_go_on():
    document = restart_module.restart("hv1", "hv2", ["blkstream,device=blk0", "counter"], request_at=RESTART_AT)
    restart = document["restart"]
    assert restart["outcome"] == "aborted" and restart["reason"] == transfer.Status.DEVICE_ASSIGNED.name.lower()
    assert restart["detail"] == 0
    reports = _guests(document)
    assert reports["blkstream"]["console"].startswith(STREAM_LINE) and reports["counter"]["exit_code"] == 0


@pytest.mark.parametrize("spec, message", [
    ("blkstream,device=blk4", "block devices blk0 to blk3"), ("blkstream,device=disk", "device=blkN")])
def test_a_bad_device_is_refused_with_a_message(spec, message):
    with pytest.raises((BootError, GuestSpecError), match=message):
        boot.boot([catalog.parse(spec)])


def test_one_device_goes_to_one_guest():
    with pytest.raises(BootError, match="one guest only"):
        boot.boot([catalog.parse("blkstream,device=blk1"), catalog.parse("dmahostile,device=blk1")])


def test_a_guest_without_a_device_finds_none():
    document = run_module.run("hv1", ["blkstream"]).document
    assert document["guests"][0]["exit_code"] == 1
    assert "no block device assigned" in document["guests"][0]["console"]
