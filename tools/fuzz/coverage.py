"""The static side of coverage: basic blocks of a hypervisor image's code (capstone), for the figures next to the edges hit."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    """Basic blocks of the named source's code entered (`entered_blocks`)."""
    return sum(1 for _, entered in entered_blocks(image, block_map, source_suffix) if entered)


def basic_blocks(image: Image, source_suffix: str | None = None) -> int:
    """Basic blocks of the image's code (data left out); with `source_suffix`, only of the code that
    the source file so named produced (e.g. "service.inc": the receiving side of a restart)."""
    return len(block_starts(image, source_suffix))


def block_starts(image: Image, source_suffix: str | None = None) -> list[int]:
    """The addresses of the basic blocks `basic_blocks` counts, in order."""
    wanted = addresses_from(image, source_suffix)
    return [block.start for block in _blocks(image) if block.start in wanted]


def entered_blocks(image: Image, block_map, source_suffix: str | None = None) -> list[tuple[int, bool]]:
    """Each basic block of the named source's code (address order) and whether it was entered. The
    block map marks where the emulator's translated blocks began; those end only at a branch, so a
    block that begins at a jump target and is reached by falling into it from the block before is
    entered without a mark of its own: it counts as entered when that block was. A mark anywhere
    inside a block (a translated block begun mid-way, after a restore or an event) enters it too."""
    marks = bytes(block_map)
    wanted = addresses_from(image, source_suffix)
    found = []
    previous: _Block | None = None
    previous_entered = False
    for block in _blocks(image):
        entered = any(marks[block.start - image.base:block.end - image.base])
        if not entered and previous is not None and previous.falls_into == block.start:
            entered = previous_entered
        if block.start in wanted:
            found.append((block.start, entered))
        previous, previous_entered = block, entered
    return found


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    falls_into: int | None       # the next block's address when this one ends without a branch, else None


_BLOCK_CACHE: dict[tuple[int, bytes], list[_Block]] = {}


def _blocks(image: Image) -> list[_Block]:
    """The image's basic blocks (capstone): leaders are the first instruction of code, the
    instruction after a branch and the targets of branches within the image."""
    key = (image.base, hashlib.sha256(image.code).digest())
    if key in _BLOCK_CACHE:
        return _BLOCK_CACHE[key]
    leaders: set[int] = set()
    after_branch: set[int] = set()
    code_spans: list[tuple[int, int]] = []
    cursor = image.base
    for data_start, data_end in sorted(image.data_ranges) + [(image.end, image.end)]:
        if data_start > cursor:
            code_spans.append((cursor, data_start))
            instructions = list(disasm.decode(image.code[cursor - image.base:data_start - image.base], cursor))
            if instructions:
                leaders.add(instructions[0].address)
            for instruction in instructions:
                mnemonic = instruction.text.split()[0] if instruction.text else ""
                if mnemonic.startswith(BRANCH_PREFIXES):
                    leaders.add(instruction.address + len(instruction.raw))
                    after_branch.add(instruction.address + len(instruction.raw))
                    target = instruction.target()
                    if target is not None and image.contains(target):
                        leaders.add(target)
        cursor = max(cursor, data_end)
    ordered = sorted(leaders)
    blocks = []
    for index, start in enumerate(ordered):
        span_end = next((stop for begin, stop in code_spans if begin <= start < stop), start)
        following = ordered[index + 1] if index + 1 < len(ordered) else image.end
        end = min(following, span_end)
        falls = following if end == following and following not in after_branch else None
        blocks.append(_Block(start, end, falls))
    _BLOCK_CACHE[key] = blocks
    return blocks


def union_map(maps: list[bytes]) -> bytes:
    """Maps of equal size (edge counters or block marks) merged: 1 where any is nonzero, else 0."""
    merged = 0
    for marks in maps:
        merged |= int.from_bytes(marks.translate(_NONZERO_AS_ONE), "little")
    return merged.to_bytes(max((len(marks) for marks in maps), default=0), "little")


def marks_in_union(maps: list[bytes]) -> int:
    """Entries nonzero in at least one of the maps."""
    return union_map(maps).count(1)


_NONZERO_AS_ONE = bytes([0] + [1] * 255)


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
    for start, stop in ranges:         # (slices of the map, counted in C: this runs after every input)
        low, high = start - image.base, stop - image.base
        if block_map[low:high].count(0) != high - low:
            return True
    return False
