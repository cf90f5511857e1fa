"""The DMA audit: attached to a booted machine, it checks that every byte a block device writes into RAM lands inside the RAM of the partition that holds the device at that moment, by the running hypervisor's own tables, and keeps what did not."""
from __future__ import annotations

from dataclasses import asdict, dataclass

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
    reads the device's partition and that partition's RAM from the hypervisor in charge (the `booted`
    view, which a hot restart moves to the new hypervisor) and records every write not inside it."""

    def __init__(self, booted: Booted):
        self.booted = booted
        self.writes = 0                 # DMA writes checked
        self.bytes = 0
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
        self.violations.append(Violation(device, address, length, self.booted.hypervisor, partition, ram))

    def summary(self) -> dict:
        """What the audit saw: writes and bytes checked, and the violations (the first few in full)."""
        return {"writes": self.writes, "bytes": self.bytes, "violations": len(self.violations),
                "first_violations": [asdict(violation) for violation in self.violations[:FIRST_VIOLATIONS_SHOWN]]}
