"""The static side of coverage: basic blocks of a hypervisor image's code (capstone), for the figures next to the edges hit."""
from __future__ import annotations

from asm import disasm
from asm.image import Image

BRANCH_PREFIXES = ("j", "loop", "call", "ret", "iret", "vmcall", "vmlaunch", "vmresume", "hlt", "ud2")


def addresses_from(image: Image, source_suffix: str | None) -> set[int]:
    """The image's addresses whose bytes the named source file produced (all with None)."""
    if source_suffix is None:
        return set(range(image.base, image.end))
    lines = sorted(image.lines, key=lambda entry: entry.address)
    wanted: set[int] = set()
    for entry, following in zip(lines, lines[1:] + [None]):
        if entry.file.endswith(source_suffix):
            wanted.update(range(entry.address, following.address if following is not None else image.end))
    return wanted


def blocks_entered(image: Image, block_map, source_suffix: str | None = None) -> int:
    """Blocks entered (marks of the fuzzer's block map, one per block start) in the named source's code."""
    marks = bytes(block_map)
    wanted = addresses_from(image, source_suffix)
    return sum(1 for offset, mark in enumerate(marks) if mark and image.base + offset in wanted)


def basic_blocks(image: Image, source_suffix: str | None = None) -> int:
    """Basic blocks of the image's code (data left out); with `source_suffix`, only of the code that
    the source file so named produced (e.g. "service.inc": the receiving side of a restart)."""
    wanted = addresses_from(image, source_suffix)
    leaders: set[int] = set()
    cursor = image.base
    for data_start, data_end in sorted(image.data_ranges) + [(image.end, image.end)]:
        if data_start > cursor:
            instructions = list(disasm.decode(image.code[cursor - image.base:data_start - image.base], cursor))
            if instructions:
                leaders.add(instructions[0].address)
            for instruction in instructions:
                mnemonic = instruction.text.split()[0] if instruction.text else ""
                if mnemonic.startswith(BRANCH_PREFIXES):
                    leaders.add(instruction.address + len(instruction.raw))
                    target = instruction.target()
                    if target is not None and image.contains(target):
                        leaders.add(target)
        cursor = max(cursor, data_end)
    return len({leader for leader in leaders if leader in wanted})


# Instructions after which execution never falls through to the next byte.
NO_FALL_THROUGH = ("jmp", "ret", "iret", "ud2", "sysret", "vmlaunch", "vmresume")
ALIGNMENT_GAP_MAX = 16    # bytes between two data ranges taken as alignment padding (merged with them)


def data_out_of_reach(image: Image) -> list[tuple[int, int]]:
    """The image's data ranges (addresses) that code cannot run into by falling through: those right
    after an unconditional jump or return (data ranges a few bytes of alignment apart count as one).
    Only a jump into them runs them, and a block entered there shows in the block map (`data_entered`)."""
    merged: list[list[int]] = []
    for start, stop in sorted(image.data_ranges):
        if merged and start - merged[-1][1] < ALIGNMENT_GAP_MAX:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    starts = sorted(entry.address for entry in image.lines)
    found = []
    for start, stop in merged:
        position = next((index for index, address in enumerate(starts) if address >= start), len(starts))
        if position == 0:
            continue
        previous = starts[position - 1]
        instructions = list(disasm.decode(image.code[previous - image.base:start - image.base], previous))
        if len(instructions) == 1 and instructions[0].mnemonic.startswith(NO_FALL_THROUGH):
            found.append((start, stop))
    return found


def data_entered(image: Image, block_map, ranges: list[tuple[int, int]]) -> bool:
    """A block was entered inside one of `ranges` (addresses): code ran what was taken for data."""
    marks = bytes(block_map)
    return any(any(marks[start - image.base:stop - image.base]) for start, stop in ranges)
