"""The trace file (`.hhrt`, docs/tracing.md "The trace file"): the record layouts emu/tracepath.c writes and Python's data records, and a reader that walks them in order."""
from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterator

from emu import fast

MAGIC = b"HHRTRACE\x00\x00\x00\x01"     # the file's first bytes: name, then the layout version (1)
FORMAT_VERSION = 1
IMAGE_DIGEST_DIGITS = 16

lib = fast.lib
INSTRUCTION, CODE, LOAD, DATA, BIND = (lib.HHR_RECORD_INSTRUCTION, lib.HHR_RECORD_CODE, lib.HHR_RECORD_LOAD,
                                       lib.HHR_RECORD_DATA, lib.HHR_RECORD_BIND)
TIME_NEXT, RIP_NEXT, RIP_ADVANCED = lib.HHR_INSN_TIME_NEXT, lib.HHR_INSN_RIP_NEXT, lib.HHR_INSN_RIP_ADVANCED
HAS_WRITES, HAS_READS = lib.HHR_INSN_WRITES, lib.HHR_INSN_READS
LOAD_INITIAL = lib.HHR_LOAD_INITIAL
ENDS_WINDOW = lib.HHR_VMCS_ENDS_WINDOW
REGISTER_COUNT = lib.HHR_TRACE_REGISTERS

# Layouts (little-endian), as tracepath.c writes them.
INSTRUCTION_HEAD = struct.Struct("<BBBBHBxI")     # kind, lp, phase, flags, context, size, mask
LOAD_HEAD = struct.Struct("<BBBBH2xIQ")           # kind, lp, phase, flags, context, mask, time
CODE_HEAD = struct.Struct("<BBH4xQ")              # kind, length, context, address
DATA_HEAD = struct.Struct("<B3xI")                # kind, length
BIND_RECORD = struct.Struct("<B1xH4xQ")           # kind, context, vmcs
WORD = struct.Struct("<Q")
MEMORY_LIST_HEAD = struct.Struct("<II")           # entries, bytes that follow
MEMORY_ENTRY_HEAD = struct.Struct("<QI")          # address, length
VALUES = [struct.Struct(f"<{count}Q") for count in range(REGISTER_COUNT + 1)]
POPCOUNT = [bin(mask).count("1") for mask in range(1 << 8)]


def popcount(mask: int) -> int:
    return POPCOUNT[mask & 0xFF] + POPCOUNT[(mask >> 8) & 0xFF] + POPCOUNT[(mask >> 16) & 0xFF] + \
        POPCOUNT[mask >> 24]


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))   # json.dumps's, made once: one per event


def data_payload(record: dict) -> bytes:
    """A data record's bytes: one JSON object, its keys in the order they were made."""
    return _COMPACT_JSON.encode(record).encode()


def image_digest(image) -> str:
    """What names an image's build in a file: the renderer symbolizes with the image this build
    assembles, which must be the one that ran."""
    return hashlib.sha256(image.code).hexdigest()[:IMAGE_DIGEST_DIGITS]


class TraceFileError(ValueError):
    """Not a trace file, or one cut short."""


def _memory(buffer, offset: int) -> tuple[list[tuple[int, bytes]], int]:
    count, _length = MEMORY_LIST_HEAD.unpack_from(buffer, offset)
    offset += MEMORY_LIST_HEAD.size
    entries = []
    for _ in range(count):
        address, length = MEMORY_ENTRY_HEAD.unpack_from(buffer, offset)
        offset += MEMORY_ENTRY_HEAD.size
        entries.append((address, bytes(buffer[offset:offset + length])))
        offset += length
    return entries, offset


class TraceReader:
    """Walks a trace file's records in order, each a tuple whose first item is its kind:

    - (INSTRUCTION, lp, phase, flags, context, size, mask, time, address, values, writes, reads):
      `size` is Unicorn's (the renderer decodes the exact one), `mask` the registers changed (RIP
      left out when it only advanced by `size`: flag RIP_ADVANCED), `values` theirs in mask order,
      `writes` and `reads` lists of (linear address, bytes);
    - (LOAD, lp, phase, initial, context, mask, time, values);
    - (CODE, context, address, bytes); (BIND, context, vmcs); (DATA, a dict)."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        try:
            size = self._file.seek(0, 2)
            if size < len(MAGIC):
                raise TraceFileError(f"{path} is not an hhr trace file (too short)")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            self._file.close()
            raise TraceFileError(f"{path} is not an hhr trace file ({exc})") from None
        if self._map[:len(MAGIC) - 1] != MAGIC[:-1]:
            self.close()
            raise TraceFileError(f"{path} is not an hhr trace file")
        if self._map[len(MAGIC) - 1] != FORMAT_VERSION:
            self.close()
            raise TraceFileError(f"{path} is a trace file of layout version {self._map[len(MAGIC) - 1]}; "
                                 f"this hhr reads version {FORMAT_VERSION}")
        self.size = len(self._map)

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def buffer(self):
        """The file's bytes (a read-only map)."""
        return self._map

    def records(self) -> Iterator:
        buffer, end = self._map, self.size
        offset = len(MAGIC)
        last_time: dict[int, int] = {}
        next_rip: dict[int, int] = {}
        instruction_head, word, values_of = INSTRUCTION_HEAD, WORD, VALUES
        try:
            while offset < end:
                if buffer[offset] != INSTRUCTION:
                    record, offset = self.record_at(offset)
                    yield record
                    continue
                _, lp, phase, flags, context, size, mask = instruction_head.unpack_from(buffer, offset)
                offset += instruction_head.size
                if flags & TIME_NEXT:
                    time = last_time[lp] + 1
                else:
                    time = word.unpack_from(buffer, offset)[0]
                    offset += 8
                if flags & RIP_NEXT:
                    address = next_rip[lp]
                else:
                    address = word.unpack_from(buffer, offset)[0]
                    offset += 8
                layout = values_of[popcount(mask)] if mask else values_of[0]
                values = layout.unpack_from(buffer, offset)
                offset += layout.size
                writes = reads = []
                if flags & HAS_WRITES:
                    writes, offset = _memory(buffer, offset)
                if flags & HAS_READS:
                    reads, offset = _memory(buffer, offset)
                last_time[lp] = time
                next_rip[lp] = address + size
                yield (INSTRUCTION, lp, phase, flags, context, size, mask, time, address, values, writes, reads)
        except (struct.error, KeyError) as exc:
            raise TraceFileError(f"{self.path}: damaged or cut short near byte {offset} ({exc})") from None

    def record_at(self, offset: int) -> tuple[tuple, int]:
        """The record at `offset` that is not an instruction, and the offset of the next."""
        buffer = self._map
        try:
            kind = buffer[offset]
            if kind == CODE:
                _, length, context, address = CODE_HEAD.unpack_from(buffer, offset)
                offset += CODE_HEAD.size
                return (CODE, context, address, bytes(buffer[offset:offset + length])), offset + length
            if kind == LOAD:
                _, lp, phase, flags, context, mask, time = LOAD_HEAD.unpack_from(buffer, offset)
                offset += LOAD_HEAD.size
                layout = VALUES[popcount(mask)]
                values = layout.unpack_from(buffer, offset)
                return (LOAD, lp, phase, bool(flags & LOAD_INITIAL), context, mask, time, values), offset + layout.size
            if kind == DATA:
                _, length = DATA_HEAD.unpack_from(buffer, offset)
                offset += DATA_HEAD.size
                if offset + length > self.size:
                    raise struct.error("a data record runs past the end")
                return (DATA, json.loads(bytes(buffer[offset:offset + length]))), offset + length
            if kind == BIND:
                _, context, vmcs = BIND_RECORD.unpack_from(buffer, offset)
                return (BIND, context, vmcs), offset + BIND_RECORD.size
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceFileError(f"{self.path}: damaged or cut short near byte {offset} ({exc})") from None
        raise TraceFileError(f"{self.path}: unknown record kind {kind} at byte {offset}")
