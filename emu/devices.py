"""The machine's devices on the I/O-port bus: COM1, debug exit, clock, per-LP timer and IPIs, console channels,
doorbell, restart-phase marker, disk (emu/disk.py), the assignable block devices and their IOMMU
(emu/block_devices.py, emu/iommu.py). The port numbers are in emu/ports.py."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Protocol

from emu import ports
from emu.block_devices import BlockDevice, BlockDevices
from emu.disk import Disk
from emu.iommu import FAULT_WRITE_SHIFT
from emu.ports import (
    CLOCK_HIGH_PORT, CLOCK_LOW_PORT, COM1_BASE, COM1_PORT_COUNT, CONSOLE_CHANNEL_PORT, DEBUG_EXIT_PORT,
    DISK_ADDRESS_HIGH_PORT, DISK_ADDRESS_LOW_PORT, DISK_BLOCK_PORT, DISK_CAPACITY_PORT, DISK_COMMAND_PORT,
    DISK_COUNT_PORT, DISK_VECTOR_PORT, DOORBELL_DATA_PORT, DOORBELL_STATUS_PORT, DOORBELL_VECTOR_PORT,
    IPI_ALL_BUT_SELF, IPI_DESTINATION_MASK, IPI_DESTINATION_SHIFT, IPI_PORT, IPI_VECTOR_MASK, LP_COUNT_PORT,
    LP_ID_PORT, LSR_THR_EMPTY, LSR_TRANSMITTER_EMPTY, RESTART_PHASE_PORT, TIMER_ARM_PORT, TIMER_PERIOD_PORT,
    TIMER_VECTOR_PORT, UART_LSR, UART_THR,
)
from emu.vmx_defs import FIRST_DEVICE_VECTOR, U32_MASK as WORD_MASK

if TYPE_CHECKING:
    from emu.events import EventStream
    from emu.lp import LogicalProcessor
    from emu.memory import HostMemory

WORD_BITS = 32
BYTE_MASK = 0xFF
MACHINE_CHANNEL = 0


def _device_vector(value: int) -> int:
    """The vector in bits 7:0, or 0 (none) for vectors 0-31, which belong to exceptions: the
    timer and doorbell stay silent and an IPI is not sent (as an APIC refuses illegal vectors)."""
    vector = value & IPI_VECTOR_MASK
    return vector if vector >= FIRST_DEVICE_VECTOR else 0


class Console:
    """Bytes written to COM1, kept per console channel."""

    def __init__(self, echo: Callable[[int, bytes], None] | None = None):
        self.channels: dict[int, bytearray] = {}
        self.channel = MACHINE_CHANNEL
        self.echo = echo

    def write_byte(self, value: int) -> None:
        self.channels.setdefault(self.channel, bytearray()).append(value & BYTE_MASK)
        if self.echo:
            self.echo(self.channel, bytes([value & BYTE_MASK]))

    def text(self, channel: int = MACHINE_CHANNEL) -> str:
        return self.channels.get(channel, bytearray()).decode("utf-8", errors="replace")

    def save_state(self) -> tuple:
        return {channel: bytes(data) for channel, data in self.channels.items()}, self.channel

    def restore_state(self, state: tuple) -> None:
        channels, self.channel = state
        self.channels = {channel: bytearray(data) for channel, data in channels.items()}


class Timer:
    """A per-LP timer counting virtual ticks: one-shot or periodic, raising one vector."""

    def __init__(self):
        self.vector = 0
        self.period = 0
        self.deadline: int | None = None

    def arm(self, now: int, ticks: int) -> None:
        self.deadline = now + ticks if ticks and self.vector else None

    def expire(self, now: int) -> int | None:
        """Returns the vector if the deadline has passed, re-arming a periodic timer."""
        if self.deadline is None or now < self.deadline:
            return None
        self.deadline = self.deadline + self.period if self.period else None
        if self.deadline is not None and self.deadline <= now:
            self.deadline = now + self.period  # a long pause does not queue a burst of ticks
        return self.vector

    def save_state(self) -> tuple:
        return self.vector, self.period, self.deadline

    def restore_state(self, state: tuple) -> None:
        self.vector, self.period, self.deadline = state


class Doorbell:
    """The operator's mailbox into the running hypervisor: messages of 32-bit words."""

    def __init__(self):
        self.messages: deque[list[int]] = deque()
        self.vector = 0
        self.acknowledged = 0

    def post(self, words: list[int]) -> None:
        self.messages.append([w & WORD_MASK for w in words])

    def words_left(self) -> int:
        return len(self.messages[0]) if self.messages else 0

    def next_word(self) -> int:
        if not self.messages or not self.messages[0]:
            return 0
        return self.messages[0].pop(0)

    def acknowledge(self) -> None:
        if self.messages:
            self.messages.popleft()
            self.acknowledged += 1

    def save_state(self) -> tuple:
        return [list(message) for message in self.messages], self.vector, self.acknowledged

    def restore_state(self, state: tuple) -> None:
        messages, self.vector, self.acknowledged = state
        self.messages = deque(list(message) for message in messages)


class BusHost(Protocol):
    """What the bus asks of the machine: the LP making the access, every LP (IPIs, the LP count),
    and a stop (the debug exit)."""

    running_lp: "LogicalProcessor"
    lps: list["LogicalProcessor"]

    def request_stop(self, reason: str, exit_status: int | None = None, lp: int | None = None,
                     report: str = "") -> None: ...


class IoBus:
    """Routes IN/OUT by port to the machine's devices; unclaimed ports read all ones, writes vanish.
    It uses the machine's RAM (disk DMA), its event stream, `flush_code` (RAM written by DMA) and a
    BusHost."""

    UNCLAIMED_READ = 0xFFFF_FFFF
    CONSOLE_PORT = COM1_BASE + UART_THR     # the console's bytes (OUT); an LP's loop may queue them

    def __init__(self, host: BusHost, events: "EventStream", ram: "HostMemory", flush_code: Callable[[], None],
                 disk: Disk | None = None, block_devices: list[BlockDevice] | None = None):
        self.host = host
        self.events = events
        self.ram = ram
        self.flush_code = flush_code
        self.console = Console()
        self.doorbell = Doorbell()
        self.disk = disk if disk is not None else Disk()
        self.block_devices = BlockDevices(host, ram, events, flush_code, block_devices)
        self.iommu = self.block_devices.iommu
        self._clock_high_latch: dict[int, int] = {}
        self.restart_phase = 0     # the last value root wrote to RESTART_PHASE_PORT

    def save_state(self) -> dict:
        """The devices' registers and contents (the disk's included), for a snapshot."""
        return {"console": self.console.save_state(), "doorbell": self.doorbell.save_state(),
                "clock_latch": dict(self._clock_high_latch), "restart_phase": self.restart_phase,
                "disk": self.disk.save_state(), "block_devices": self.block_devices.save_state()}

    def restore_state(self, state: dict) -> None:
        self.console.restore_state(state["console"])
        self.doorbell.restore_state(state["doorbell"])
        self._clock_high_latch = dict(state["clock_latch"])
        self.restart_phase = state["restart_phase"]
        self.disk.restore_state(state["disk"])
        self.block_devices.restore_state(state["block_devices"])

    # --- what an LP asks of the devices that interrupt it -----------------------------------------------
    def deadline(self, lp_index: int) -> int | None:
        """The earliest tick a device will interrupt LP `lp_index` (the disk, the block devices)."""
        due = [tick for tick in (self.disk.deadline(lp_index), self.block_devices.deadline(lp_index))
               if tick is not None]
        return min(due) if due else None

    def completed_vectors(self, lp_index: int, now: int) -> list[int]:
        """The vectors of the completions due on LP `lp_index` by `now`, each given once."""
        vectors = self.block_devices.complete(lp_index, now)
        disk_vector = self.disk.complete(lp_index, now)
        return ([disk_vector] if disk_vector else []) + [vector for vector in vectors if vector]

    def read(self, port: int, size: int) -> int:
        lp = self.host.running_lp
        value = self._read(port, lp)
        self.events.publish(lp.now, lp.index, "io-in", port=port, size=size, value=value)
        return value & ((1 << (8 * size)) - 1)

    def _read(self, port: int, lp) -> int:
        if COM1_BASE <= port < COM1_BASE + COM1_PORT_COUNT:
            return LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY if port - COM1_BASE == UART_LSR else 0
        if port == CLOCK_LOW_PORT:
            now = lp.now
            self._clock_high_latch[lp.index] = now >> WORD_BITS
            return now & WORD_MASK
        if port == CLOCK_HIGH_PORT:
            return self._clock_high_latch.get(lp.index, 0)
        if port == LP_ID_PORT:
            return lp.index
        if port == LP_COUNT_PORT:
            return len(self.host.lps)
        if port == DOORBELL_STATUS_PORT:
            return self.doorbell.words_left()
        if port == DOORBELL_DATA_PORT:
            return self.doorbell.next_word()
        if port == RESTART_PHASE_PORT and self._from_root(lp):
            return self.restart_phase
        if port == DISK_COMMAND_PORT and self._from_root(lp):
            return int(self.disk.current_status(lp.now))
        if port == DISK_CAPACITY_PORT and self._from_root(lp):
            return self.disk.blocks
        if (register := self._block_register(port)) is not None:
            return self._device_read(lp, *register)
        if ports.IOMMU_ROOT_LOW_PORT <= port <= ports.IOMMU_FAULT_VECTOR_PORT and self._from_root(lp):
            return self._iommu_read(port)
        return self.UNCLAIMED_READ

    def _block_register(self, port: int) -> tuple[BlockDevice, int] | None:
        """The block device whose registers `port` is among, and the register's offset (DEVICE_*)."""
        index, register = divmod(port - ports.BLOCK_DEVICE_BASE, ports.BLOCK_DEVICE_STRIDE)
        devices = self.block_devices.devices
        return (devices[index], register) if port >= ports.BLOCK_DEVICE_BASE and index < len(devices) else None

    def _device_read(self, lp, device: BlockDevice, register: int) -> int:
        values = {ports.DEVICE_QUEUE_LOW: device.queue & WORD_MASK, ports.DEVICE_QUEUE_HIGH: device.queue >> WORD_BITS,
                  ports.DEVICE_QUEUE_SIZE: device.queue_entries, ports.DEVICE_TAIL: device.tail,
                  ports.DEVICE_CAPACITY: device.blocks}
        if register == ports.DEVICE_HEAD:
            device.advance(lp.now)
            return device.head
        if register == ports.DEVICE_STATUS:
            return int(device.status(lp.now))
        if register == ports.DEVICE_ROUTE:
            return device.route if self._from_root(lp) else self.UNCLAIMED_READ
        return values.get(register, self.UNCLAIMED_READ)

    def _iommu_read(self, port: int) -> int:
        iommu = self.iommu
        fault = iommu.oldest_fault()
        if port == ports.IOMMU_ROOT_LOW_PORT:
            return iommu.root & WORD_MASK
        if port == ports.IOMMU_ROOT_HIGH_PORT:
            return iommu.root >> WORD_BITS
        if port == ports.IOMMU_CONTROL_PORT:
            return iommu.control
        if port == ports.IOMMU_FAULT_COUNT_PORT:
            return len(iommu.faults)
        if fault is None:
            return 0
        return {ports.IOMMU_FAULT_DEVICE_PORT: fault.device, ports.IOMMU_FAULT_ADDRESS_LOW_PORT: fault.address & WORD_MASK,
                ports.IOMMU_FAULT_ADDRESS_HIGH_PORT: fault.address >> WORD_BITS,
                ports.IOMMU_FAULT_REASON_PORT: int(fault.reason) | int(fault.write) << FAULT_WRITE_SHIFT}.get(port, 0)

    @staticmethod
    def _from_root(lp) -> bool:
        """The access comes from the LP's root mode, not from a guest reaching the bus without an I/O exit."""
        return lp.running_context() is lp.root

    def write(self, port: int, size: int, value: int) -> None:
        lp = self.host.running_lp
        self.events.publish(lp.now, lp.index, "io-out", port=port, size=size, value=value)
        if port == self.CONSOLE_PORT:
            self.console.write_byte(value)
        elif port == DEBUG_EXIT_PORT:
            self.host.request_stop("debug-exit", exit_status=((value & BYTE_MASK) << 1) | 1, lp=lp.index)
        elif port == TIMER_VECTOR_PORT:
            lp.timer.vector = _device_vector(value)
            if not lp.timer.vector:
                lp.timer.deadline = None
        elif port == TIMER_PERIOD_PORT:
            lp.timer.period = value & WORD_MASK
        elif port == TIMER_ARM_PORT:
            lp.timer.arm(lp.now, value & WORD_MASK)
            if lp.timer.deadline is not None:
                lp.end_run_by(lp.timer.deadline)
        elif port == IPI_PORT:
            self._send_ipi(lp, value)
        elif port == CONSOLE_CHANNEL_PORT:
            self.console.channel = value & WORD_MASK
        elif port == DOORBELL_STATUS_PORT:
            self.doorbell.acknowledge()
        elif port == DOORBELL_VECTOR_PORT:
            self.doorbell.vector = _device_vector(value)
        elif port == RESTART_PHASE_PORT and self._from_root(lp):
            # A marker in the event stream for hypervisors' protocol phases; to a guest the port is unclaimed.
            self.restart_phase = value & WORD_MASK
            self.events.publish(lp.now, lp.index, "restart-phase", phase=self.restart_phase)
        elif DISK_BLOCK_PORT <= port <= DISK_VECTOR_PORT and self._from_root(lp):
            self._disk_register(lp, port, value & WORD_MASK)
        elif (register := self._block_register(port)) is not None:
            self._device_write(lp, *register, value & WORD_MASK)
        elif ports.IOMMU_ROOT_LOW_PORT <= port <= ports.IOMMU_FAULT_VECTOR_PORT and self._from_root(lp):
            self._iommu_write(port, value & WORD_MASK)

    def queued_console_write(self, time: int, lp_index: int, size: int, value: int) -> None:
        """An OUT to CONSOLE_PORT that LP `lp_index`'s transition loop queued (emu/fastpath.c
        hhr_port_out_hook) at virtual time `time`: published and written as `write` does, in order."""
        self.events.publish(time, lp_index, "io-out", port=self.CONSOLE_PORT, size=size, value=value)
        self.console.write_byte(value)

    def _device_write(self, lp, device: BlockDevice, register: int, value: int) -> None:
        """A block device's register; a guest reaches all but the interrupt route."""
        if register == ports.DEVICE_QUEUE_LOW:
            device.queue = (device.queue & ~WORD_MASK) | value
        elif register == ports.DEVICE_QUEUE_HIGH:
            device.queue = (device.queue & WORD_MASK) | value << WORD_BITS
        elif register == ports.DEVICE_QUEUE_SIZE:
            device.set_queue_size(value)
        elif register == ports.DEVICE_TAIL:
            self.block_devices.doorbell(lp, device, value)
        elif register == ports.DEVICE_ROUTE and self._from_root(lp):
            device.route = value

    def _iommu_write(self, port: int, value: int) -> None:
        iommu = self.iommu
        if port == ports.IOMMU_ROOT_LOW_PORT:
            iommu.root = (iommu.root & ~WORD_MASK) | value
        elif port == ports.IOMMU_ROOT_HIGH_PORT:
            iommu.root = (iommu.root & WORD_MASK) | value << WORD_BITS
        elif port == ports.IOMMU_CONTROL_PORT:
            iommu.control = value
        elif port == ports.IOMMU_INVALIDATE_PORT:
            iommu.invalidate(value)
        elif port == ports.IOMMU_FAULT_COUNT_PORT:
            iommu.drop_oldest_fault()
        elif port == ports.IOMMU_FAULT_VECTOR_PORT:
            iommu.fault_vector = _device_vector(value)

    def _disk_register(self, lp, port: int, value: int) -> None:
        """A write to one of the disk's registers; to a guest the ports are unclaimed (DMA reaches all of RAM)."""
        disk = self.disk
        if port == DISK_BLOCK_PORT:
            disk.block = value
        elif port == DISK_ADDRESS_LOW_PORT:
            disk.address = (disk.address & ~WORD_MASK) | value
        elif port == DISK_ADDRESS_HIGH_PORT:
            disk.address = (disk.address & WORD_MASK) | value << WORD_BITS
        elif port == DISK_COUNT_PORT:
            disk.count = value
        elif port == DISK_VECTOR_PORT:
            disk.vector = _device_vector(value)
        elif port == DISK_COMMAND_PORT:
            disk.command(lp, self.ram, value, self.flush_code)
            self.events.publish(lp.now, lp.index, "disk", command=value, block=disk.block,
                                        count=disk.count, address=disk.address, status=int(disk.status),
                                        completion=disk.completion)

    def _send_ipi(self, sender, value: int) -> None:
        vector = _device_vector(value)
        if not vector:
            return
        if value & IPI_ALL_BUT_SELF:
            targets = [lp for lp in self.host.lps if lp is not sender]
        else:
            destination = (value >> IPI_DESTINATION_SHIFT) & IPI_DESTINATION_MASK
            lps = self.host.lps
            targets = [lps[destination]] if destination < len(lps) else []
        for target in targets:
            self.events.publish(sender.now, sender.index, "ipi", vector=vector, to=target.index)
            target.raise_interrupt(vector)
            if target is sender:
                sender.running_context().request_stop()  # a self-IPI is taken at the end of the block
