"""What a guest that drives its assigned block device assembles with: the device's ports and registers, its queue entry's layout, the statuses and commands (docs/machine.md 6.11)."""
from __future__ import annotations

from emu import block_devices, disk, ports

_REGISTERS = ("BLOCK_DEVICE_BASE", "BLOCK_DEVICE_STRIDE", "DEVICE_QUEUE_LOW", "DEVICE_QUEUE_HIGH", "DEVICE_QUEUE_SIZE",
              "DEVICE_TAIL", "DEVICE_HEAD", "DEVICE_STATUS", "DEVICE_CAPACITY")


def constants() -> dict[str, int]:
    values = {name: getattr(ports, name) for name in _REGISTERS}
    values |= block_devices.QUEUE_ENTRY.constants()
    values |= {f"ENTRY_{status.name}": int(status) for status in block_devices.EntryStatus}
    values |= {f"DEVICE_{status.name}": int(status) for status in block_devices.DeviceStatus}
    values |= {f"COMMAND_{command.name}": int(command) for command in disk.DiskCommand}
    values |= {"BLOCK_DEVICE_COUNT": block_devices.DEVICE_COUNT, "BLOCK_SIZE": disk.DISK_BLOCK_SIZE,
               "NO_DEVICE_PORT_VALUE": 0xFFFF_FFFF}
    return values
