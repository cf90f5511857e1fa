"""What the assigned block devices were doing around a restart: busy at the request, and their DMA on both sides of the blackout."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.events import Event, EventKind
from hypervisors.boot import Booted, GuestImage

EVENT_KINDS = frozenset({EventKind.DMA.value})


def assigned(guests: list[GuestImage]) -> dict[int, int]:
    """Partition (the guest's place in the boot order) to the block device assigned to it."""
    return {partition: image.device for partition, image in enumerate(guests) if image.device is not None}


def busy(booted: Booted, devices: dict[int, int]) -> list[int]:
    """The devices (of `devices`, partition to device) busy now: an entry under way (its completion tick
    still ahead on the clock of the LP its guest rings the doorbell from: the completions are on that
    clock, docs/machine.md 6.11) or a completion interrupt not yet raised. Reads only: the device's
    HEAD moves when its guest or an interrupt looks, not when the bench does."""
    lps = {record.partition: record.fields["lp"] for record in booted.vp_records() if record.fields["index"] == 0}
    block_devices = booted.machine.io.block_devices.devices
    found = []
    for partition, number in sorted(devices.items()):
        device, now = block_devices[number], booted.machine.lps[lps[partition]].now
        if any(tick > now for tick in device.completions) or device.interrupt_due is not None:
            found.append(number)
    return found


def run_until_busy(booted: Booted, devices: dict[int, int], step: int, limit: int) -> int:
    """Runs the machine on, `step` instructions at a time, until every device is busy; the instructions
    that took (0: busy already). Raises RuntimeError if `limit` more instructions do not get there."""
    started = booted.machine.retired
    while len(busy(booted, devices)) < len(devices):
        if booted.machine.retired - started >= limit:
            raise RuntimeError(f"the devices {sorted(devices.values())} were never all busy at once in "
                               f"{limit:,} instructions")
        booted.machine.run(max_instructions=booted.machine.retired + step)
        if booted.machine.stop is not None and booted.machine.stop.reason != "instruction-limit":
            raise RuntimeError("the machine stopped before every device was busy")
    return booted.machine.retired - started


@dataclass
class DmaLog:
    """Every queue entry a device carried out while subscribed (EVENT_KINDS): when its doorbell rang
    (the ringing LP's clock) and when it completes."""

    entries: list[tuple[int, int, int]] = field(default_factory=list)     # (device, doorbell, completion)

    def __call__(self, event: Event) -> None:
        self.entries.append((event.data["device"], event.time, event.data["completion"]))

    def across(self, devices: list[int], blackout_start: int, resumed_at: int) -> list[dict]:
        """Per device: entries rung before the blackout began, those of them still under way when it
        began, and entries rung after the new hypervisor resumed the guests (LP 0 announces both
        moments on its clock; a doorbell's time is on its own LP's)."""
        rows = []
        for number in devices:
            own = [(rung, done) for device, rung, done in self.entries if device == number]
            before = [done for rung, done in own if rung < blackout_start]
            rows.append({"device": number, "entries_before": len(before),
                         "in_flight_at_blackout": sum(1 for done in before if done > blackout_start),
                         "entries_after": sum(1 for rung, _ in own if rung > resumed_at)})
        return rows
