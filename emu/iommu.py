"""The IOMMU: DMA remapping for the assignable block devices, with second-level tables in RAM in the EPT format, an IOTLB, a fault log and an invalidation command (docs/machine.md 6.12)."""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu.vmx_defs import U32_MASK as WORD_MASK

if TYPE_CHECKING:
    from emu.memory import HostMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
# The root table: one entry per device (VT-d's context entry, reduced to what a device needs):
# qword 0 bit 0 present, bits 51:12 the second-level PML4; qword 1 bits 15:0 the domain.
ROOT_ENTRY_BYTES = 16
ROOT_PRESENT = 1
DOMAIN_MASK = 0xFFFF
ADDRESS_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)       # bits 51:12 of an entry
# Second-level entries are EPT entries (SDM 29.3.2): bit 0 read, bit 1 write, bit 7 a large page
# in a PDPT (1 GiB) or page directory (2 MiB), so a partition's EPT can serve its device as it is.
ENTRY_READ = 1 << 0
ENTRY_WRITE = 1 << 1
ENTRY_LARGE_PAGE = 1 << 7
LEVELS = 4                                              # PML4, PDPT, page directory, page table
INDEX_BITS = 9
ENTRY_BYTES = 8
INPUT_ADDRESS_BITS = 48                                 # a DMA address above is a fault
CONTROL_TRANSLATE = 1 << 0                              # IOMMU_CONTROL_PORT: translation on
INVALIDATE_ALL = WORD_MASK                              # IOMMU_INVALIDATE_PORT: every device's IOTLB entries
FAULT_LOG_ENTRIES = 64                                  # faults kept; later ones are counted as lost
FAULT_WRITE_SHIFT = 8                                   # IOMMU_FAULT_REASON_PORT: the reason | write << 8


class FaultReason(enum.IntEnum):
    ROOT_NOT_PRESENT = 1           # the device's root entry is not present
    NOT_MAPPED = 2                 # a second-level entry is not present (bits 2:0 clear, or no read)
    WRITE_DENIED = 3               # a write to a page mapped without write permission
    ADDRESS_TOO_HIGH = 4           # the DMA address needs more than 48 bits
    OUTSIDE_RAM = 5                # a table or the page lies outside RAM (or translation is off and the address is)


@dataclass(frozen=True)
class Fault:
    device: int
    address: int                   # the device's DMA address
    write: bool
    reason: FaultReason


class Iommu:
    """Translates a device's DMA addresses to host-physical ones. Translation off: DMA addresses are
    host-physical (inside RAM). On: the device's root entry gives a 4-level second-level table;
    translations are cached per device and page (the IOTLB) until invalidated."""

    def __init__(self, ram: "HostMemory", device_count: int):
        self.ram = ram
        self.device_count = device_count
        self.root = 0
        self.control = 0
        self.fault_vector = 0
        self.iotlb: dict[tuple[int, int], tuple[int, bool]] = {}   # (device, DMA page) -> (host page, writable)
        self.faults: deque[Fault] = deque()
        self.faults_lost = 0
        self.faults_recorded = 0
        self.translations = 0                                       # walks done (IOTLB misses)

    # --- what the device side asks -------------------------------------------------------------------
    def translate(self, device: int, address: int, write: bool) -> int | Fault:
        """The host-physical address of one byte of DMA, or the Fault (recorded in the log)."""
        if not self.control & CONTROL_TRANSLATE:
            return address if self.ram.holds(address) else self._fault(device, address, write, FaultReason.OUTSIDE_RAM)
        if address >> INPUT_ADDRESS_BITS:
            return self._fault(device, address, write, FaultReason.ADDRESS_TOO_HIGH)
        page = address >> PAGE_SHIFT
        cached = self.iotlb.get((device, page))
        if cached is None:
            walked = self._walk(device, address)
            if isinstance(walked, FaultReason):
                return self._fault(device, address, write, walked)
            cached = self.iotlb[(device, page)] = walked
        host_page, writable = cached
        if write and not writable:
            return self._fault(device, address, write, FaultReason.WRITE_DENIED)
        return host_page | (address & (PAGE_SIZE - 1))

    def _walk(self, device: int, address: int) -> tuple[int, bool] | FaultReason:
        """The root entry, then the second-level tables (SDM 29.3.2's walk, EPT entries)."""
        self.translations += 1
        entry_address = self.root + device * ROOT_ENTRY_BYTES
        if not self.ram.holds(entry_address, ROOT_ENTRY_BYTES):
            return FaultReason.OUTSIDE_RAM
        root_entry = self.ram.read_u64(entry_address)
        if not root_entry & ROOT_PRESENT:
            return FaultReason.ROOT_NOT_PRESENT
        table = root_entry & ADDRESS_MASK
        writable = True
        for level in range(LEVELS, 0, -1):
            shift = PAGE_SHIFT + INDEX_BITS * (level - 1)
            slot = table + ((address >> shift) & ((1 << INDEX_BITS) - 1)) * ENTRY_BYTES
            if not self.ram.holds(slot, ENTRY_BYTES):
                return FaultReason.OUTSIDE_RAM
            entry = self.ram.read_u64(slot)
            if not entry & ENTRY_READ:
                return FaultReason.NOT_MAPPED
            writable = writable and bool(entry & ENTRY_WRITE)
            if level == 1 or (level in (2, 3) and entry & ENTRY_LARGE_PAGE):
                size_mask = (1 << shift) - 1
                host = (entry & ADDRESS_MASK & ~size_mask) | (address & size_mask & ~(PAGE_SIZE - 1))
                if not self.ram.holds(host, PAGE_SIZE):
                    return FaultReason.OUTSIDE_RAM
                return host, writable
            table = entry & ADDRESS_MASK
        raise AssertionError("the walk ends at level 1")

    def _fault(self, device: int, address: int, write: bool, reason: FaultReason) -> Fault:
        fault = Fault(device, address, write, reason)
        self.faults_recorded += 1
        if len(self.faults) < FAULT_LOG_ENTRIES:
            self.faults.append(fault)
        else:
            self.faults_lost += 1
        return fault

    # --- what root code programs (docs/machine.md 6.12) ----------------------------------------------------
    def invalidate(self, device: int) -> None:
        """Drops the IOTLB entries of `device`, or of every device for INVALIDATE_ALL."""
        if device == INVALIDATE_ALL:
            self.iotlb.clear()
        else:
            self.iotlb = {key: value for key, value in self.iotlb.items() if key[0] != device}

    def oldest_fault(self) -> Fault | None:
        return self.faults[0] if self.faults else None

    def drop_oldest_fault(self) -> None:
        if self.faults:
            self.faults.popleft()

    def reset(self) -> None:
        self.root = self.control = self.fault_vector = 0
        self.iotlb.clear()
        self.faults.clear()

    def save_state(self) -> dict:
        return {"root": self.root, "control": self.control, "fault_vector": self.fault_vector,
                "iotlb": dict(self.iotlb), "faults": list(self.faults), "faults_lost": self.faults_lost,
                "faults_recorded": self.faults_recorded, "translations": self.translations}

    def restore_state(self, state: dict) -> None:
        self.root, self.control, self.fault_vector = state["root"], state["control"], state["fault_vector"]
        self.iotlb = dict(state["iotlb"])
        self.faults = deque(state["faults"])
        self.faults_lost, self.faults_recorded = state["faults_lost"], state["faults_recorded"]
        self.translations = state["translations"]
