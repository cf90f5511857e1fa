"""Host RAM: one anonymous mapping shared by every Unicorn instance of the machine."""
from __future__ import annotations

import ctypes
import mmap
import struct

from emu.vmx_defs import PAGE_SIZE, U32_MASK

MIB = 1 << 20
MIN_RAM_SIZE = 16 * MIB
MAX_RAM_SIZE = 64 * 1024 * MIB


class MemoryError_(Exception):
    """A host-physical access outside installed RAM."""


class HostMemory:
    """Installed RAM of the machine, addressed by host-physical address from 0."""

    def __init__(self, size: int):
        if size % PAGE_SIZE or not MIN_RAM_SIZE <= size <= MAX_RAM_SIZE:
            raise ValueError(f"RAM size must be a multiple of 4 KiB between {MIN_RAM_SIZE // MIB} MiB "
                             f"and {MAX_RAM_SIZE // MIB} MiB, not {size}")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._map)
        self._anchor = (ctypes.c_char * size).from_buffer(self._map)
        self.pointer = ctypes.addressof(self._anchor)
        self.dirty = None               # an emu.dirty.DirtyPages while fuzzing: writes from here mark pages

    def holds(self, address: int, length: int = 1) -> bool:
        return 0 <= address and address + length <= self.size

    def _check(self, address: int, length: int) -> None:
        if not self.holds(address, length):
            raise MemoryError_(f"host-physical access {address:#x}+{length:#x} outside RAM of {self.size:#x}")

    def read(self, address: int, length: int) -> bytes:
        self._check(address, length)
        return bytes(self._view[address:address + length])

    def write(self, address: int, data: bytes) -> None:
        self._check(address, len(data))
        self._view[address:address + len(data)] = data
        if self.dirty is not None:
            self.dirty.mark(address, len(data))

    def read_u32(self, address: int) -> int:
        self._check(address, 4)
        return struct.unpack_from("<I", self._map, address)[0]

    def read_u64(self, address: int) -> int:
        self._check(address, 8)
        return struct.unpack_from("<Q", self._map, address)[0]

    def write_u32(self, address: int, value: int) -> None:
        self._check(address, 4)
        struct.pack_into("<I", self._map, address, value & U32_MASK)
        if self.dirty is not None:
            self.dirty.mark(address, 4)

    def write_u64(self, address: int, value: int) -> None:
        self._check(address, 8)
        struct.pack_into("<Q", self._map, address, value & 0xFFFF_FFFF_FFFF_FFFF)
        if self.dirty is not None:
            self.dirty.mark(address, 8)

    def view(self) -> memoryview:
        return self._view
