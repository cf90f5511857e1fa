"""The machine's I/O-port map: each device's port numbers and the format of what they carry (docs/machine.md 6.1)."""
from __future__ import annotations

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
# The IOMMU (emu/iommu.py), root mode only (docs/machine.md 6.12).
IOMMU_ROOT_LOW_PORT = 0x5C0        # out/in: host-physical address of the root table, bits 31:0
IOMMU_ROOT_HIGH_PORT = 0x5C4       # out/in: bits 63:32
IOMMU_CONTROL_PORT = 0x5C8         # out/in: bit 0 translation on
IOMMU_INVALIDATE_PORT = 0x5CC      # out: a device's IOTLB entries dropped (0xFFFF_FFFF: every device's)
IOMMU_FAULT_COUNT_PORT = 0x5D0     # in: faults in the log; out: drop the oldest
IOMMU_FAULT_DEVICE_PORT = 0x5D4    # in: the oldest fault's device
IOMMU_FAULT_ADDRESS_LOW_PORT = 0x5D8   # in: its DMA address, bits 31:0
IOMMU_FAULT_ADDRESS_HIGH_PORT = 0x5DC  # in: bits 63:32
IOMMU_FAULT_REASON_PORT = 0x5E0    # in: its FaultReason | write << 8
IOMMU_FAULT_VECTOR_PORT = 0x5E4    # out: vector raised on LP 0 at each fault (0 = none)
# The assignable block devices (emu/block_devices.py): device n's registers are at
# BLOCK_DEVICE_BASE + n * BLOCK_DEVICE_STRIDE + one of the offsets below. A guest reaches them when
# its I/O bitmap lets it; DEVICE_ROUTE is root's only.
BLOCK_DEVICE_BASE = 0x600
BLOCK_DEVICE_STRIDE = 0x20
DEVICE_QUEUE_LOW = 0x00            # out/in: the queue's DMA address, bits 31:0
DEVICE_QUEUE_HIGH = 0x04           # out/in: bits 63:32
DEVICE_QUEUE_SIZE = 0x08           # out: entries (at most 256), and the queue starts empty; in
DEVICE_TAIL = 0x0C                 # out: the doorbell: entries up to this index are given; in
DEVICE_HEAD = 0x10                 # in: entries done
DEVICE_STATUS = 0x14               # in: a DeviceStatus
DEVICE_CAPACITY = 0x18             # in: blocks
DEVICE_ROUTE = 0x1C                # root only; out/in: the completion interrupt, LP << 8 | vector

# The value written to IPI_PORT (docs/machine.md 6.6).
IPI_VECTOR_MASK = 0xFF
IPI_DESTINATION_SHIFT = 8
IPI_DESTINATION_MASK = 0xFF
IPI_ALL_BUT_SELF = 1 << 16
