"""The machine's devices on the I/O-port bus: COM1, debug exit, clock, per-LP timer and IPIs, console channels,
doorbell, restart-phase marker, disk (emu/disk.py)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable

from emu.disk import Disk
from emu.vmcs_fields import U32_MASK as WORD_MASK
from emu.vmx_defs import FIRST_DEVICE_VECTOR

if TYPE_CHECKING:
    from emu.machine import Machine

# 16550 UART at COM1 (the PC's standard base). Only what software needs to print is modelled.
COM1_BASE = 0x3F8
COM1_PORT_COUNT = 8
UART_THR = 0              # transmit holding register (write)
UART_LSR = 5              # line status register (read)
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40

# QEMU's isa-debug-exit: writing V stops the machine with exit status (V << 1) | 1.
DEBUG_EXIT_PORT = 0xF4

# Machine-specific ports (documented in docs/machine.md), all 32-bit.
CLOCK_LOW_PORT = 0x500        # in: virtual time in ticks, bits 31:0 (latches bits 63:32)
CLOCK_HIGH_PORT = 0x504       # in: bits 63:32 latched by the last read of CLOCK_LOW_PORT
LP_ID_PORT = 0x508            # in: number of the reading logical processor
LP_COUNT_PORT = 0x50C         # in: number of logical processors
TIMER_VECTOR_PORT = 0x510     # out: vector the LP's timer raises (0 stops the timer)
TIMER_PERIOD_PORT = 0x514     # out: ticks between timer interrupts; 0 = one-shot
TIMER_ARM_PORT = 0x518        # out: ticks from now to the next timer interrupt (0 disarms)
IPI_PORT = 0x520              # out: bits 7:0 vector, bits 15:8 destination LP, bit 16 all-but-self
CONSOLE_CHANNEL_PORT = 0x540  # out: channel that following COM1 bytes belong to (0 = machine)
DOORBELL_STATUS_PORT = 0x530  # in: words left in the current doorbell message; out: acknowledge
DOORBELL_DATA_PORT = 0x534    # in: next 32-bit word of the current message
DOORBELL_VECTOR_PORT = 0x538  # out: vector raised on LP 0 when a message arrives (0 = none)
RESTART_PHASE_PORT = 0x544    # root only; out: publish a `restart-phase` event; in: the last value written
# The disk (emu/disk.py), root mode only.
DISK_BLOCK_PORT = 0x550            # out: the first block of the next command
DISK_ADDRESS_LOW_PORT = 0x554      # out: host-physical buffer address, bits 31:0
DISK_ADDRESS_HIGH_PORT = 0x558     # out: bits 63:32
DISK_COUNT_PORT = 0x55C            # out: blocks to move
DISK_COMMAND_PORT = 0x560          # out: a DiskCommand, carried out at once; in: a DiskStatus
DISK_VECTOR_PORT = 0x564           # out: vector raised on the issuing LP at completion (0 = none)
DISK_CAPACITY_PORT = 0x568         # in: the disk's size in blocks

IPI_VECTOR_MASK = 0xFF
IPI_DESTINATION_SHIFT = 8
IPI_DESTINATION_MASK = 0xFF
IPI_ALL_BUT_SELF = 1 << 16
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


class IoBus:
    """Routes IN/OUT by port to the machine's devices; unclaimed ports read all ones, writes vanish."""

    UNCLAIMED_READ = 0xFFFF_FFFF

    def __init__(self, machine: "Machine", disk: Disk | None = None):
        self.machine = machine
        self.console = Console()
        self.doorbell = Doorbell()
        self.disk = disk if disk is not None else Disk()
        self._clock_high_latch: dict[int, int] = {}
        self.restart_phase = 0     # the last value root wrote to RESTART_PHASE_PORT

    def read(self, port: int, size: int) -> int:
        m = self.machine
        lp = m.running_lp
        value = self._read(port, lp)
        m.events.publish(lp.now, lp.index, "io-in", port=port, size=size, value=value)
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
            return len(self.machine.lps)
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
        return self.UNCLAIMED_READ

    @staticmethod
    def _from_root(lp) -> bool:
        """The access comes from the LP's root mode, not from a guest reaching the bus without an I/O exit."""
        return lp.running_context() is lp.root

    def write(self, port: int, size: int, value: int) -> None:
        m = self.machine
        lp = m.running_lp
        m.events.publish(lp.now, lp.index, "io-out", port=port, size=size, value=value)
        if port == COM1_BASE + UART_THR:
            self.console.write_byte(value)
        elif port == DEBUG_EXIT_PORT:
            m.request_stop("debug-exit", exit_status=((value & BYTE_MASK) << 1) | 1, lp=lp.index)
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
            m.events.publish(lp.now, lp.index, "restart-phase", phase=self.restart_phase)
        elif DISK_BLOCK_PORT <= port <= DISK_VECTOR_PORT and self._from_root(lp):
            self._disk_register(lp, port, value & WORD_MASK)

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
            disk.command(lp, self.machine.ram, value, self.machine.flush_code)
            self.machine.events.publish(lp.now, lp.index, "disk", command=value, block=disk.block,
                                        count=disk.count, address=disk.address, status=int(disk.status),
                                        completion=disk.completion)

    def _send_ipi(self, sender, value: int) -> None:
        vector = _device_vector(value)
        if not vector:
            return
        if value & IPI_ALL_BUT_SELF:
            targets = [lp for lp in self.machine.lps if lp is not sender]
        else:
            destination = (value >> IPI_DESTINATION_SHIFT) & IPI_DESTINATION_MASK
            targets = [self.machine.lps[destination]] if destination < len(self.machine.lps) else []
        for target in targets:
            self.machine.events.publish(sender.now, sender.index, "ipi", vector=vector, to=target.index)
            target.raise_interrupt(vector)
            if target is sender:
                sender.running_context().request_stop()  # a self-IPI is taken at the end of the block
