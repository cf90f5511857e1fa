"""The machine's disk: a DMA block device on root-mode ports, completing in virtual ticks, with sparse contents."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from emu.vmx_defs import U32_MASK as WORD_MASK

if TYPE_CHECKING:
    from emu.lp import LogicalProcessor
    from emu.memory import HostMemory

# Its ports are in emu/ports.py with the others (DISK_*_PORT); docs/machine.md 6.10.
DISK_BLOCK_SIZE = 4096             # bytes per block (an NVMe namespace formatted with 4 KiB LBAs)
DISK_DEFAULT_BLOCKS = 1 << 20      # 4 GiB: a whole 1 GiB guest and its hypervisor's state fit several times
DISK_CHUNK = 64 * 1024             # storage granule: a chunk that is all zero is not kept

# The cost model (docs/machine.md 6.10): one tick is one retired instruction of a nominal 1 GHz
# processor, and the figures are those of a PCIe 3.0 x4 NVMe SSD of the Samsung 970 EVO Plus class:
# sequential read 3,500 MB/s, sequential write 3,300 MB/s, about 20 microseconds per command.
TICKS_PER_SECOND = 1_000_000_000
DISK_COMMAND_LATENCY_TICKS = 20_000
DISK_READ_BYTES_PER_SECOND = 3_500_000_000
DISK_WRITE_BYTES_PER_SECOND = 3_300_000_000


class DiskCommand(enum.IntEnum):
    READ = 1                       # disk to RAM
    WRITE = 2                      # RAM to disk


class DiskStatus(enum.IntEnum):
    READY = 0                      # the last command completed (or none was given)
    BUSY = 1                       # a command is under way: it completes at its completion tick
    BAD_RANGE = 2                  # blocks outside the disk, or a count of zero
    BAD_ADDRESS = 3                # the buffer is not block-aligned or lies outside RAM
    BAD_COMMAND = 4                # an unknown command
    OVERLAP = 5                    # a command given while another was under way (it was not carried out)


def transfer_ticks(command: DiskCommand, byte_count: int) -> int:
    """Virtual ticks from a command to its completion: latency, then the bytes at the sequential bandwidth."""
    bandwidth = DISK_READ_BYTES_PER_SECOND if command == DiskCommand.READ else DISK_WRITE_BYTES_PER_SECOND
    return DISK_COMMAND_LATENCY_TICKS + -(-byte_count * TICKS_PER_SECOND // bandwidth)


# What a snapshot keeps of the disk besides its contents: the registers, the command under way, the counters.
_STATE_FIELDS = ("block", "address", "count", "vector", "status", "completion", "issuer", "commands",
                 "bytes_read", "bytes_written", "busy_ticks")


class Disk:
    """Blocks of DISK_BLOCK_SIZE bytes, kept in chunks of DISK_CHUNK bytes; chunks never written, or
    written all zero, are not stored. It is not part of any one machine: a machine reset keeps it."""

    def __init__(self, blocks: int = DISK_DEFAULT_BLOCKS):
        if not 1 <= blocks <= WORD_MASK:
            raise ValueError(f"a disk has 1 to {WORD_MASK} blocks, not {blocks}")
        self.blocks = blocks
        self.chunks: dict[int, bytearray] = {}
        # The registers and the command under way.
        self.block = 0
        self.address = 0
        self.count = 0
        self.vector = 0
        self.status = DiskStatus.READY
        self.completion: int | None = None       # the tick the command under way completes
        self.issuer: int | None = None           # the LP that gave it (it gets the vector)
        self.commands = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.busy_ticks = 0

    @property
    def size(self) -> int:
        return self.blocks * DISK_BLOCK_SIZE

    @property
    def stored_bytes(self) -> int:
        """Host memory the contents take: only chunks that hold a nonzero byte."""
        return len(self.chunks) * DISK_CHUNK

    # --- contents, by byte offset (also what the operator and tests use) ------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, target: memoryview) -> None:
        """The bytes from `offset` into `target` (RAM, for a DMA read): a chunk that is not stored
        writes zeros, and only where the target is not zero already (untouched RAM stays uncommitted)."""
        self._check_range(offset, len(target))
        done = 0
        while done < len(target):
            chunk, within = divmod(offset + done, DISK_CHUNK)
            take = min(DISK_CHUNK - within, len(target) - done)
            piece = target[done:done + take]
            stored = self.chunks.get(chunk)
            if stored is not None:
                piece[:] = memoryview(stored)[within:within + take]
            elif not _is_zero(piece):
                piece[:] = _ZERO_VIEW[:take]
            done += take

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        position = offset
        while view:
            chunk, within = divmod(position, DISK_CHUNK)
            take = min(DISK_CHUNK - within, len(view))
            piece = view[:take]
            stored = self.chunks.get(chunk)
            if stored is None:
                if not _is_zero(piece):             # zeros need no chunk: an absent chunk reads zero
                    stored = self.chunks[chunk] = bytearray(DISK_CHUNK)
                    stored[within:within + take] = piece
            else:
                stored[within:within + take] = piece
                if stored == _ZERO_CHUNK:
                    del self.chunks[chunk]
            position += take
            view = view[take:]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"disk access {offset:#x}+{length:#x} outside the disk of {self.size:#x} bytes")

    def reset(self) -> None:
        """A machine reset: the registers clear and a command under way is forgotten (its data had
        moved at the command); the contents stay."""
        self.block = self.address = self.count = self.vector = 0
        self.status = DiskStatus.READY
        self.completion = self.issuer = None

    def save_state(self) -> dict:
        """The disk's registers, counters and contents (copied: the disk outlives a snapshot)."""
        return {"fields": {name: getattr(self, name) for name in _STATE_FIELDS},
                "chunks": {index: bytes(chunk) for index, chunk in self.chunks.items()}}

    def restore_state(self, state: dict) -> None:
        for name, value in state["fields"].items():
            setattr(self, name, value)
        self.chunks = {index: bytearray(chunk) for index, chunk in state["chunks"].items()}

    # --- the device, as root code sees it ---------------------------------------------------------------
    def current_status(self, now: int) -> DiskStatus:
        if self.completion is not None and now < self.completion:
            return DiskStatus.BUSY
        return self.status

    def command(self, lp: "LogicalProcessor", ram: "HostMemory", value: int, flush_code) -> None:
        """OUT to DISK_COMMAND_PORT: checked, the data moved at once (DMA), completion due later."""
        now = lp.now
        if self.completion is not None and now < self.completion:
            self.status = DiskStatus.OVERLAP  # seen once the command under way completes
            return
        self.completion, self.issuer = None, None
        try:
            command = DiskCommand(value & WORD_MASK)
        except ValueError:
            self.status = DiskStatus.BAD_COMMAND
            return
        byte_count = self.count * DISK_BLOCK_SIZE
        if not self.count or self.block + self.count > self.blocks:
            self.status = DiskStatus.BAD_RANGE
            return
        if self.address % DISK_BLOCK_SIZE or not ram.holds(self.address, byte_count):
            self.status = DiskStatus.BAD_ADDRESS
            return
        offset = self.block * DISK_BLOCK_SIZE
        if command == DiskCommand.WRITE:
            view = ram.view()
            self.write(offset, view[self.address:self.address + byte_count])
            self.bytes_written += byte_count
        else:
            self.read_into(offset, ram.view()[self.address:self.address + byte_count])
            flush_code()                      # the buffer may hold code that was translated
            self.bytes_read += byte_count
        ticks = transfer_ticks(command, byte_count)
        self.commands += 1
        self.busy_ticks += ticks
        self.status = DiskStatus.READY
        self.completion, self.issuer = now + ticks, lp.index
        lp.end_run_by(self.completion)

    def deadline(self, lp_index: int) -> int | None:
        """The completion tick of the command `lp_index` gave, while it is under way."""
        return self.completion if self.issuer == lp_index else None

    def complete(self, lp_index: int, now: int) -> int:
        """At or after the completion tick, on the issuing LP: the vector to raise (0 for none)."""
        if self.issuer != lp_index or self.completion is None or now < self.completion:
            return 0
        self.issuer = None
        return self.vector


_ZERO_CHUNK = bytes(DISK_CHUNK)
_ZERO_VIEW = memoryview(_ZERO_CHUNK)


def _is_zero(piece: memoryview) -> bool:
    """A piece of at most a chunk is all zero (compared as bytes: memcmp, not item by item)."""
    return piece.tobytes() == _ZERO_CHUNK[:len(piece)]
