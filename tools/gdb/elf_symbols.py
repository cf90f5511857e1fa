"""`hhr symbols`: an ELF file with an image's code and labels at the address it runs at, for gdb's add-symbol-file (docs/gdb.md)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from asm import Image
from hypervisors import build
from tools.trace.symbols import builtin_guest_image

# ELF-64 (System V ABI, x86-64 supplement): the few fields a symbol file needs.
ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_EXEC, EM_X86_64 = 2, 62
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB = 0, 1, 2, 3
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
STB_GLOBAL = 1
STT_OBJECT, STT_FUNC = 1, 2
ELF_HEADER = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
SYMBOL = struct.Struct("<IBBHQQ")
TEXT_SECTION = 1                        # section numbers: 0 null, 1 .text, 2 .symtab, 3 .strtab, 4 .shstrtab
SECTION_NAMES = (b"", b".text", b".symtab", b".strtab", b".shstrtab")
CODE_ALIGNMENT = 16
WORD = 8


@dataclass(frozen=True)
class SymbolFile:
    image_name: str
    image: Image
    address: int                        # where the image runs


def image_named(name: str) -> Image:
    """A hypervisor's image (hv1, hv2) or a built-in guest's."""
    if name in build.HYPERVISORS:
        return build.image(name)
    guest = builtin_guest_image(name)
    if guest is None:
        raise ValueError(f"no image {name!r}: {', '.join(build.HYPERVISORS)} or a built-in guest")
    return guest


def _strings(names: list[bytes]) -> tuple[bytes, list[int]]:
    table, offsets = bytearray(b"\0"), []
    for name in names:
        offsets.append(len(table) if name else 0)
        if name:
            table += name + b"\0"
    return bytes(table), offsets


def elf(image: Image, address: int, prefix: str = "") -> bytes:
    """The image's code as `.text` at `address`, and every label as a symbol there: a function, or an
    object for a label in a data range."""
    ordered = sorted(image.symbols.items(), key=lambda item: (item[1], item[0]))
    names = [(prefix + name).encode() for name, _ in ordered]
    strtab, name_offsets = _strings(names)
    symbols = bytearray(SYMBOL.size)                                   # symbol 0: none
    for index, ((name, assembled), name_offset) in enumerate(zip(ordered, name_offsets)):
        following = [value for _, value in ordered[index + 1:] if value > assembled]
        size = (following[0] if following else image.end) - assembled
        in_data = any(start <= assembled < end for start, end in image.data_ranges)
        kind = STT_OBJECT if in_data else STT_FUNC
        symbols += SYMBOL.pack(name_offset, STB_GLOBAL << 4 | kind, 0, TEXT_SECTION,
                               assembled - image.base + address, size)
    shstrtab, section_name_offsets = _strings(list(SECTION_NAMES))
    text_offset = -(-ELF_HEADER.size // CODE_ALIGNMENT) * CODE_ALIGNMENT
    body = bytearray(text_offset - ELF_HEADER.size) + image.code
    layout = {}
    for section, data in ((".symtab", bytes(symbols)), (".strtab", strtab), (".shstrtab", shstrtab)):
        body += bytes(-(ELF_HEADER.size + len(body)) % WORD)
        layout[section] = (ELF_HEADER.size + len(body), len(data))
        body += data
    body += bytes(-(ELF_HEADER.size + len(body)) % WORD)
    section_headers_offset = ELF_HEADER.size + len(body)
    headers = [SECTION_HEADER.pack(*([0] * 10)),
               SECTION_HEADER.pack(section_name_offsets[1], SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, address,
                                   text_offset, len(image.code), 0, 0, CODE_ALIGNMENT, 0),
               SECTION_HEADER.pack(section_name_offsets[2], SHT_SYMTAB, 0, 0, *layout[".symtab"], 3, 1, WORD,
                                   SYMBOL.size),
               SECTION_HEADER.pack(section_name_offsets[3], SHT_STRTAB, 0, 0, *layout[".strtab"], 0, 0, 1, 0),
               SECTION_HEADER.pack(section_name_offsets[4], SHT_STRTAB, 0, 0, *layout[".shstrtab"], 0, 0, 1, 0)]
    header = ELF_HEADER.pack(ELF_MAGIC, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, 0, 0, ET_EXEC, EM_X86_64, EV_CURRENT,
                             address, 0, section_headers_offset, 0, ELF_HEADER.size, 0, 0, SECTION_HEADER.size,
                             len(headers), len(SECTION_NAMES) - 1)
    return header + bytes(body) + b"".join(headers)


def write(name: str, output: str, address: int | None = None, prefix: str = "") -> SymbolFile:
    image = image_named(name)
    at = image.base if address is None else address
    with open(output, "wb") as handle:
        handle.write(elf(image, at, prefix))
    return SymbolFile(name, image, at)
