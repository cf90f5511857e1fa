"""The assignable block devices: a command queue in memory a guest programs directly, DMA through the IOMMU, completions in virtual ticks and an interrupt routed by root (docs/machine.md 6.11)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable

from asm.layout import Struct
from emu.disk import DISK_BLOCK_SIZE, Disk, DiskCommand, transfer_ticks
from emu.iommu import PAGE_SIZE, Fault, Iommu
from emu.vmx_defs import U32_MASK as WORD_MASK

if TYPE_CHECKING:
    from emu.devices import BusHost
    from emu.events import EventStream
    from emu.lp import LogicalProcessor
    from emu.memory import HostMemory

DEVICE_COUNT = 4                       # blk0 to blk3
DEVICE_BLOCKS = 1 << 16                # 256 MiB each, stored sparsely
MAX_QUEUE_ENTRIES = 256
# One queue entry, in the device's address space (docs/machine.md 6.11). `status` is written back
# by the device; the entry is done once HEAD has passed it.
QUEUE_ENTRY = Struct("dma_entry", [
    ("command", 4),                    # DiskCommand: 1 read (device to memory), 2 write (memory to device)
    ("status", 4),                     # EntryStatus, written by the device
    ("block", 8),                      # the first block
    ("buffer", 8),                     # DMA address of the buffer, page-aligned
    ("count", 4),                      # blocks
    ("_pad", 4),
])
ROUTE_VECTOR_MASK = 0xFF               # DEVICE_ROUTE: bits 7:0 the vector, bits 15:8 the LP
ROUTE_LP_SHIFT = 8
ROUTE_LP_MASK = 0xFF
STATUS_BYTES = QUEUE_ENTRY.field_size("status")
# Told of every DMA write into RAM (a read's data, an entry's status), after it lands: the device,
# the host-physical address, the bytes written. What a checker of where DMA lands listens to
# (tools/dma_audit.py); the `dma` event says what an entry asked, not where its bytes went.
DmaWriteObserver = Callable[[int, int, int], None]


class EntryStatus(enum.IntEnum):
    DONE = 1
    BAD_RANGE = 2                      # blocks outside the device, a count of 0, or a buffer not page-aligned
    FAULT = 3                          # the IOMMU refused an address of the buffer (nothing moved)
    BAD_COMMAND = 4


class DeviceStatus(enum.IntEnum):
    IDLE = 0                           # every entry given is done
    BUSY = 1                           # entries are under way
    QUEUE_FAULT = 2                    # the IOMMU refused the queue itself: the device stopped (reset it)
    DOORBELL_FAULT = 3                 # a TAIL more than the queue's size past HEAD: none taken, the device
                                       # stopped (reset it), as NVMe's invalid doorbell write


class BlockDevice:
    """One device: its registers, the entries under way with their completion ticks, its contents.
    A doorbell (a TAIL write) carries out every entry from the old tail to the new one at once, in
    order; each completes `transfer_ticks` after the one before (or after the doorbell)."""

    def __init__(self, number: int, blocks: int = DEVICE_BLOCKS):
        self.number = number
        self.contents = Disk(blocks)   # only the disk's sparse contents are used: its registers are the disk's
        self.blocks = blocks
        self.queue = 0
        self.queue_entries = 0
        self.head = 0                  # entries completed, a free-running 32-bit index
        self.tail = 0                  # entries given
        self.route = 0
        self.queue_fault = False
        self.doorbell_fault = False
        self.completions: list[int] = []   # ticks of the entries under way, in order
        self.interrupt_due: int | None = None
        self.entries_done = 0
        self.bytes_moved = 0

    def advance(self, now: int) -> None:
        """HEAD moves past the entries whose completion tick has come."""
        while self.completions and self.completions[0] <= now:
            self.completions.pop(0)
            self.head = (self.head + 1) & WORD_MASK

    def status(self, now: int) -> DeviceStatus:
        self.advance(now)
        if self.queue_fault:
            return DeviceStatus.QUEUE_FAULT
        if self.doorbell_fault:
            return DeviceStatus.DOORBELL_FAULT
        return DeviceStatus.BUSY if self.completions else DeviceStatus.IDLE

    def route_lp(self) -> int:
        return (self.route >> ROUTE_LP_SHIFT) & ROUTE_LP_MASK

    def vector(self) -> int:
        return self.route & ROUTE_VECTOR_MASK

    def set_queue_size(self, entries: int) -> None:
        """Writing QUEUE_SIZE resets the queue: HEAD and TAIL to 0, nothing under way."""
        self.queue_entries = min(entries, MAX_QUEUE_ENTRIES)
        self.head = self.tail = 0
        self.completions.clear()
        self.interrupt_due = None
        self.queue_fault = self.doorbell_fault = False

    def save_state(self) -> dict:
        fields = {name: getattr(self, name) for name in (
            "queue", "queue_entries", "head", "tail", "route", "queue_fault", "doorbell_fault", "interrupt_due",
            "entries_done",
            "bytes_moved")}
        return {"fields": fields, "completions": list(self.completions), "contents": self.contents.save_state()}

    def restore_state(self, state: dict) -> None:
        for name, value in state["fields"].items():
            setattr(self, name, value)
        self.completions = list(state["completions"])
        self.contents.restore_state(state["contents"])

    def reset(self) -> None:
        """A machine reset: the registers clear; the contents stay."""
        self.queue = self.queue_entries = self.head = self.tail = self.route = 0
        self.queue_fault = self.doorbell_fault = False
        self.completions.clear()
        self.interrupt_due = None


class BlockDevices:
    """The devices and the IOMMU their DMA goes through; what the I/O bus calls on a doorbell, and
    what each LP asks for its deadlines and completions."""

    def __init__(self, host: "BusHost", ram: "HostMemory", events: "EventStream", flush_code: Callable[[], None],
                 devices: list[BlockDevice] | None = None):
        self.host = host
        self.ram = ram
        self.events = events
        self.flush_code = flush_code
        self.devices = devices if devices is not None else [BlockDevice(number) for number in range(DEVICE_COUNT)]
        self.iommu = Iommu(ram, len(self.devices))
        self._dma_write_observers: list[DmaWriteObserver] = []

    # --- who is told where DMA writes land -----------------------------------------------------------------
    def observe_dma_writes(self, observer: DmaWriteObserver) -> None:
        """From now on `observer` is told of every DMA write into RAM (device, host address, bytes)."""
        self._dma_write_observers.append(observer)

    def forget_dma_writes(self, observer: DmaWriteObserver) -> None:
        self._dma_write_observers.remove(observer)

    def _dma_write(self, device: int, host: int, data: bytes) -> None:
        """`data` into RAM at a host-physical address the IOMMU gave, and the observers told."""
        self.ram.write(host, data)
        for observer in self._dma_write_observers:
            observer(device, host, len(data))

    # --- DMA -----------------------------------------------------------------------------------------------
    def _dma_read(self, device: int, address: int, length: int) -> bytes | Fault:
        """`length` bytes at a DMA address, page by page through the IOMMU."""
        out = bytearray()
        while length:
            host = self.iommu.translate(device, address, write=False)
            if isinstance(host, Fault):
                return host
            take = min(length, PAGE_SIZE - address % PAGE_SIZE)
            out += self.ram.read(host, take)
            address, length = address + take, length - take
        return bytes(out)

    def _dma_targets(self, device: int, address: int, length: int, write: bool) -> list[tuple[int, int]] | Fault:
        """Every page of a buffer translated first, so that a fault moves nothing: (host, length) pieces."""
        pieces = []
        while length:
            host = self.iommu.translate(device, address, write=write)
            if isinstance(host, Fault):
                return host
            take = min(length, PAGE_SIZE - address % PAGE_SIZE)
            pieces.append((host, take))
            address, length = address + take, length - take
        return pieces

    def _publish_fault(self, lp: "LogicalProcessor", fault: Fault) -> None:
        self.events.publish(lp.now, lp.index, "iommu-fault", device=fault.device, address=fault.address,
                            write=fault.write, reason=int(fault.reason))
        if self.iommu.fault_vector:
            self.host.lps[0].raise_interrupt(self.iommu.fault_vector)

    # --- the doorbell ------------------------------------------------------------------------------------
    def doorbell(self, lp: "LogicalProcessor", device: BlockDevice, tail: int) -> None:
        """TAIL written: the entries from the old tail to `tail` are carried out now, in order."""
        device.advance(lp.now)
        if device.queue_fault or device.doorbell_fault or not device.queue_entries:
            return
        if (tail - device.head) & WORD_MASK > device.queue_entries:
            device.doorbell_fault = True     # more given than the queue holds (or a TAIL behind HEAD)
            return
        start = lp.now if not device.completions else device.completions[-1]
        moved_ram = False
        while device.tail != tail & WORD_MASK:
            slot = device.queue + (device.tail % device.queue_entries) * QUEUE_ENTRY.size
            raw = self._dma_read(device.number, slot, QUEUE_ENTRY.size)
            if isinstance(raw, Fault):
                device.queue_fault = True
                self._publish_fault(lp, raw)
                break
            entry = QUEUE_ENTRY.unpack(raw)
            status, moved = self._carry_out(lp, device, entry)
            moved_ram |= moved and entry["command"] == DiskCommand.READ
            back = self._dma_targets(device.number, slot + QUEUE_ENTRY.offset("status"), 4, write=True)
            if isinstance(back, Fault):
                device.queue_fault = True
                self._publish_fault(lp, back)
                break
            self._dma_write(device.number, back[0][0], int(status).to_bytes(STATUS_BYTES, "little"))
            byte_count = entry["count"] * DISK_BLOCK_SIZE if status == EntryStatus.DONE else 0
            start += transfer_ticks(DiskCommand(entry["command"]) if status == EntryStatus.DONE else DiskCommand.WRITE,
                                    byte_count)
            device.completions.append(start)
            device.tail = (device.tail + 1) & WORD_MASK
            device.entries_done += 1
            self.events.publish(lp.now, lp.index, "dma", device=device.number, command=entry["command"],
                                block=entry["block"], count=entry["count"], buffer=entry["buffer"],
                                status=int(status), completion=start)
        if moved_ram:
            self.flush_code()
        if device.completions and device.vector():
            device.interrupt_due = device.completions[-1]
            lps = self.host.lps
            target = lps[device.route_lp()] if device.route_lp() < len(lps) else None
            if target is not None:
                target.end_run_by(device.interrupt_due)

    def _carry_out(self, lp: "LogicalProcessor", device: BlockDevice, entry: dict) -> tuple[EntryStatus, bool]:
        """One entry: checked, its buffer translated whole, then the data moved. (status, data moved)."""
        try:
            command = DiskCommand(entry["command"])
        except ValueError:
            return EntryStatus.BAD_COMMAND, False
        count, block, buffer = entry["count"], entry["block"], entry["buffer"]
        if not count or block + count > device.blocks or buffer % PAGE_SIZE:
            return EntryStatus.BAD_RANGE, False
        byte_count = count * DISK_BLOCK_SIZE
        pieces = self._dma_targets(device.number, buffer, byte_count, write=command == DiskCommand.READ)
        if isinstance(pieces, Fault):
            self._publish_fault(lp, pieces)
            return EntryStatus.FAULT, False
        offset = block * DISK_BLOCK_SIZE
        for host, length in pieces:
            if command == DiskCommand.WRITE:
                device.contents.write(offset, self.ram.read(host, length))
            else:
                self._dma_write(device.number, host, device.contents.read(offset, length))
            offset += length
        device.bytes_moved += byte_count
        return EntryStatus.DONE, True

    # --- interrupts ----------------------------------------------------------------------------------------
    def deadline(self, lp_index: int) -> int | None:
        """The earliest completion interrupt due on `lp_index`."""
        due = [device.interrupt_due for device in self.devices
               if device.interrupt_due is not None and device.route_lp() == lp_index]
        return min(due) if due else None

    def complete(self, lp_index: int, now: int) -> list[int]:
        """The vectors of the completion interrupts due on `lp_index` by `now` (each raised once)."""
        vectors = []
        for device in self.devices:
            if device.interrupt_due is not None and device.route_lp() == lp_index and now >= device.interrupt_due:
                device.interrupt_due = None
                vectors.append(device.vector())
        return vectors

    def save_state(self) -> dict:
        return {"devices": [device.save_state() for device in self.devices], "iommu": self.iommu.save_state()}

    def restore_state(self, state: dict) -> None:
        for device, saved in zip(self.devices, state["devices"]):
            device.restore_state(saved)
        self.iommu.restore_state(state["iommu"])

    def reset(self) -> None:
        for device in self.devices:
            device.reset()
        self.iommu.reset()
