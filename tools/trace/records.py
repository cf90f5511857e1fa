"""What the recorder hands on for each instruction executed in the window."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class InstructionRecord:
    """One instruction: where and when it ran, its bytes, the registers before and after it, and
    the memory it wrote (and, when the recorder records reads, read) as (linear address, bytes). `after` is None when the window closed first."""

    time: int                           # the LP's clock when it began: instructions retired before it
    lp: int
    context: object                     # the emu ExecutionContext (root instance or guest instance)
    vmcs: int | None                    # the VMCS of a guest instance, None in root mode
    address: int
    code: bytes
    before: tuple[int, ...]
    after: tuple[int, ...] | None = None
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    reads: list[tuple[int, bytes]] = field(default_factory=list)
