"""A typed view of a running hypervisor's globals: the one place Python names the labels of hypervisors/common/."""
from __future__ import annotations

from dataclasses import dataclass

from hypervisors import build, layouts

PARTITION_DEVICE_BYTES = 4              # devices.inc partition_devices: a dword per partition, device + 1 (0: none)


@dataclass(frozen=True)
class VpRecord:
    """One VP record of the running hypervisor, as its own layout reads it."""

    number: int                         # its place in the hypervisor's VP array
    address: int
    partition: int                      # the number of its partition (boot order)
    fields: dict                        # the record's fields by name


class _Global:
    """A global of the hypervisor named by `label` (or the attribute's name), read where its image
    is by the view's method `reader` names."""

    reader = ""

    def __init__(self, doc: str, label: str | None = None):
        self.__doc__ = doc
        self.label = label

    def __set_name__(self, owner, name: str) -> None:
        self.label = self.label or name

    def __get__(self, view, owner=None):
        if view is None:
            return self
        return getattr(view, self.reader)(self.label)


class Qword(_Global):
    """A qword variable's value."""

    reader = "read_qword"


class Address(_Global):
    """Where a variable or table is."""

    reader = "symbol"


class HypervisorGlobals:
    """The globals Python reads from a running hypervisor. A class using it provides `machine`,
    `hypervisor` (its name) and `image_base` (where its image is); tests/test_hv_contract.py checks
    that every label named here is defined by every hypervisor."""

    machine: object
    hypervisor: str
    image_base: int

    # data.inc: shared by several includes.
    hv_cr3 = Qword("The hypervisor's own PML4.")
    vp_base = Qword("The address of the first VP record (they follow each other).", label="vps")
    vp_total = Qword("How many VPs the hypervisor runs.")
    frame_table = Qword("The page-ownership database: FRAME records.")
    frame_count = Qword("How many FRAME records frame_table holds.")
    transfer_area = Qword("The transfer messages' area in the service region.")
    restart_status = Qword("The last restart's transfer.Status.")
    restart_detail = Qword("What the last restart's status names (for a refusal: which check).")
    partition_base = Address("The partition records (one per guest, in boot order).", label="partitions")
    partition_devices = Address("devices.inc: each partition's block device + 1, 0 for none.")
    # Variables of one include (its NAME_variables macro).
    memory_lock = Qword("memory.inc: bit 0 set while an LP holds the memory lock.")
    free_next = Qword("partitions.inc: the next free byte partitions take their memory from.")
    msr_bitmap = Qword("vp_state.inc: the MSR bitmap every VP's VMCS names.")
    service_region = Qword("restart.inc: where the next hypervisor's image goes (its service partition's memory).")
    service_vp = Address("restart.inc: the service partition's VP record.")

    def symbol(self, name: str) -> int:
        """The address of a label of the running hypervisor's image, where that image is."""
        image = build.image(self.hypervisor)
        return image.symbol(name) - image.base + self.image_base

    def read_qword(self, name: str) -> int:
        return int.from_bytes(self.machine.ram.read(self.symbol(name), 8), "little")

    @classmethod
    def labels(cls) -> dict[str, str]:
        """Every label this view reads, by the attribute that reads it."""
        members = {name: member for klass in reversed(cls.__mro__) for name, member in vars(klass).items()}
        return {name: member.label for name, member in members.items() if isinstance(member, (Qword, Address))}

    @property
    def records(self) -> layouts.Records:
        """The running hypervisor's own record layouts."""
        return build.hypervisor(self.hypervisor).records

    def vp_records(self) -> list[VpRecord]:
        """Every VP record of the running hypervisor, with the number of its partition."""
        layout, partition_size = self.records.vp, self.records.partition.size
        base, partitions = self.vp_base, self.partition_base
        found = []
        for number in range(self.vp_total):
            address = base + number * layout.size
            fields = layout.unpack(self.machine.ram.read(address, layout.size))
            found.append(VpRecord(number, address, (fields["partition"] - partitions) // partition_size, fields))
        return found

    def partition_records(self, count: int) -> list[dict]:
        """The first `count` partition records, in boot order."""
        layout = self.records.partition
        base, size = self.partition_base, layout.size
        return [layout.unpack(self.machine.ram.read(base + i * size, size)) for i in range(count)]

    def device_owner_table(self, count: int) -> dict[int, int]:
        """Which of the first `count` partitions holds each assigned block device: device to partition number."""
        table = self.machine.ram.read(self.partition_devices, count * PARTITION_DEVICE_BYTES)
        entries = [int.from_bytes(table[i:i + PARTITION_DEVICE_BYTES], "little")
                   for i in range(0, len(table), PARTITION_DEVICE_BYTES)]
        return {entry - 1: partition for partition, entry in enumerate(entries) if entry}
