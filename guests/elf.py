"""Static ELF64 executables as guests: their loadable segments laid out as one flat image, zero fill left to guest RAM."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisors.memory_map import GUEST_LOAD_ADDRESS

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
# ELF64 header and program header (System V ABI, "ELF-64 Object File Format" 1.5).
HEADER = struct.Struct("<4sBBBBB7sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
MAX_IMAGE = 256 << 20       # the staged bytes: from GUEST_LOAD_ADDRESS to the last non-zero file byte


class ElfError(ValueError):
    """Not a static x86-64 executable for the guest ABI; the message says what is wrong."""


@dataclass(frozen=True)
class FlatGuest:
    image: bytes          # from GUEST_LOAD_ADDRESS to the last non-zero file byte: what is staged
    entry: int
    extent: int           # bytes from GUEST_LOAD_ADDRESS the segments take in guest RAM, zero fill included


def is_elf(data: bytes) -> bool:
    return data[:len(ELF_MAGIC)] == ELF_MAGIC


def flatten(data: bytes) -> FlatGuest:
    """Segments placed at their addresses relative to GUEST_LOAD_ADDRESS: the file bytes to stage, and
    the extent their zero fill (bss) reaches in guest RAM."""
    if len(data) < HEADER.size:
        raise ElfError("too short for an ELF header")
    (magic, klass, encoding, _version, _abi, _abi_version, _pad, kind, machine, _eversion, entry,
     phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest) = HEADER.unpack_from(data)
    if klass != ELFCLASS64 or encoding != ELFDATA2LSB or machine != EM_X86_64:
        raise ElfError("not a little-endian x86-64 ELF64 file")
    if kind != ET_EXEC:
        raise ElfError("not a static executable (ET_EXEC): link with -static -no-pie")
    segments = []
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + PROGRAM_HEADER.size > len(data):
            raise ElfError("program header table runs past the end of the file")
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = \
            PROGRAM_HEADER.unpack_from(data, offset)
        if p_type != PT_LOAD or not p_memsz:
            continue
        if p_vaddr < GUEST_LOAD_ADDRESS or p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise ElfError(f"segment at {p_vaddr:#x} is below {GUEST_LOAD_ADDRESS:#x} or malformed: "
                           "link with -Wl,-Ttext-segment=0x100000")
        # Guest RAM starts zero (docs/boot.md): a segment's trailing zero bytes, like its zero fill
        # (bss), need no staging room.
        segments.append((p_vaddr, data[p_offset:p_offset + p_filesz].rstrip(b"\0"), p_memsz))
    if not segments:
        raise ElfError("no loadable segment")
    extent = max(vaddr + memsz for vaddr, _bytes, memsz in segments) - GUEST_LOAD_ADDRESS
    staged = max([vaddr + len(contents) - GUEST_LOAD_ADDRESS for vaddr, contents, _memsz in segments if contents],
                 default=0)
    if staged > MAX_IMAGE:
        raise ElfError(f"the file's bytes would span more than {MAX_IMAGE >> 20} MiB of guest memory")
    image = bytearray(staged)
    for vaddr, contents, _memsz in segments:
        start = vaddr - GUEST_LOAD_ADDRESS
        image[start:start + len(contents)] = contents
    return FlatGuest(bytes(image), entry, extent)
