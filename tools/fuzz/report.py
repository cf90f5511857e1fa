"""`hhr fuzz --report OUT`: the receiving code's coverage over every instance of a sync directory, block by block, with the blocks never entered."""
from __future__ import annotations

from pathlib import Path

from asm.image import Image
from hypervisors import build
from tools.fuzz import coverage, sync

HYPERVISORS = ("hv1", "hv2")
COMMON_INCLUDES = "hypervisors/common/"           # the code both hypervisors share: the receiver's includes
FIRST_SOURCES = ("service.inc", "guest_state.inc")  # the receiver itself and its guest-state checks, shown first


def receiver_sources(image: Image) -> list[str]:
    """The shared includes the image holds code of, the receiver's own first (file names)."""
    names = sorted({Path(entry.file).name for entry in image.lines if COMMON_INCLUDES in entry.file})
    return [name for name in FIRST_SOURCES if name in names] + [name for name in names if name not in FIRST_SOURCES]


def block_lines(image: Image, block_map: bytes, source: str) -> tuple[list[str], list[str], int]:
    """For one source: a line per basic block (`+` entered, `-` never), the never-entered ones again, the count entered."""
    lines, never, entered = [], [], 0
    for address, mark in coverage.entered_blocks(image, block_map, "/" + source):
        place = image.source_line(address)
        text = f"0x{address:x}  {image.symbolize(address)}  {Path(place.file).name}:{place.line}" if place else \
            f"0x{address:x}  {image.symbolize(address)}"
        lines.append(f"  {'+' if mark else '-'} {text}")
        if mark:
            entered += 1
        else:
            never.append(f"    {text}")
    return lines, never, entered


def report_text(out: Path) -> str:
    """The report of the sync directory `out` (the block maps its hhr instances saved); ValueError if it has none."""
    if not out.is_dir():
        raise ValueError(f"{out}: no such directory")
    parts = []
    for hypervisor in HYPERVISORS:
        image = build.image(hypervisor)
        maps = [marks for marks in sync.saved_blocks(out, hypervisor) if len(marks) == len(image.code)]
        if not maps:
            continue
        merged = coverage.union_map(maps)
        parts.append(f"{hypervisor}, the new hypervisor: blocks entered over {len(maps)} instance(s) of {out}")
        sections = []
        for source in receiver_sources(image):
            lines, never, entered = block_lines(image, merged, source)
            if not lines:
                continue
            parts.append(f"  {source}: {entered} of {len(lines)} basic blocks entered")
            sections += [f"{source} ({hypervisor}): {entered} of {len(lines)} basic blocks entered", *lines,
                         f"  never entered ({len(never)}):", *never]
        parts += sections
    if not parts:
        raise ValueError(f"{out}: no block map of this build's hypervisors (a campaign with --output {out} saves one)")
    return "\n".join(parts)
