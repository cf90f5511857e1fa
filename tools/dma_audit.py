"""The DMA audit: attached to a booted machine, it checks that every byte a block device writes into RAM lands in memory of the partition that holds the device at that moment (its RAM, or a page of its map window), by the running hypervisor's own tables, and keeps what did not."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from emu.iommu import PAGE_SIZE
from hypervisors import layouts, memory_state
from hypervisors.boot import Booted

FIRST_VIOLATIONS_SHOWN = 5              # in the summary, in full


@dataclass(frozen=True)
class Violation:
    """One DMA write outside its device's partition: where it went, and whose RAM it should have been."""

    device: int
    address: int                        # host-physical
    length: int
    hypervisor: str                     # whose tables were read
    partition: int | None               # the device's partition by those tables; None: nobody holds it
    ram: tuple[int, int] | None         # that partition's RAM: (host base, bytes)


class DmaAudit:
    """Told of each DMA write by the block devices (emu/block_devices.py `observe_dma_writes`), it
    reads the device's partition from the hypervisor in charge (the `booted` view, which a hot
    restart moves to the new hypervisor) and accepts a write inside that partition's RAM (its
    record's base and size) or into pages the page-ownership database gives the partition (its map
    window's); it records every other."""

    def __init__(self, booted: Booted):
        self.booted = booted
        self.writes = 0                 # DMA writes checked
        self.bytes = 0
        self.window_writes = 0          # of them, into map-window pages
        self.pending_writes = 0         # of those, pages a post-copy's drain had not given an owner yet
        self.violations: list[Violation] = []
        self._devices = booted.machine.io.block_devices
        self._devices.observe_dma_writes(self.check)

    def detach(self) -> None:
        self._devices.forget_dma_writes(self.check)

    def check(self, device: int, address: int, length: int) -> None:
        self.writes += 1
        self.bytes += length
        partition = self.booted.device_owners().get(device)
        ram = None
        if partition is not None:
            record = self.booted.partitions()[partition]
            ram = (record["memory"], record["memory_size"])
            if ram[0] <= address and address + length <= ram[0] + ram[1]:
                return
            if self._pages_owned_by(partition, address, length):
                self.window_writes += 1
                return
        self.violations.append(Violation(device, address, length, self.booted.hypervisor, partition, ram))

    def _pages_owned_by(self, partition: int, address: int, length: int) -> bool:
        """Every page the write touches is the partition's by the page-ownership database; or, in a
        post-copy before the drain has brought its owner (OWNER_PENDING), mapped by its map window."""
        owner = layouts.OWNER_PARTITION_BASE + partition
        first, last = address // PAGE_SIZE, (address + length - 1) // PAGE_SIZE
        owners = {page: memory_state.page_owner(self.booted, page)
                  for page in range(first * PAGE_SIZE, (last + 1) * PAGE_SIZE, PAGE_SIZE)}
        pending = {page for page, recorded in owners.items() if recorded == layouts.OWNER_PENDING}
        if any(recorded != owner for page, recorded in owners.items() if page not in pending):
            return False
        if pending and not pending <= memory_state.window_pages(self.booted, partition):
            return False
        self.pending_writes += bool(pending)
        return True

    def summary(self) -> dict:
        """What the audit saw: writes and bytes checked, those into window pages, and the violations
        (the first few in full)."""
        return {"writes": self.writes, "bytes": self.bytes, "window_writes": self.window_writes,
                "pending_writes": self.pending_writes,
                "violations": len(self.violations),
                "first_violations": [asdict(violation) for violation in self.violations[:FIRST_VIOLATIONS_SHOWN]]}
