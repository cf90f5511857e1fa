"""An assembled image: bytes at a fixed load address with its symbol table, line table and data ranges."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import disasm
from .errors import AsmError, SymbolNotFound

IMAGE_FORMAT = "hhr-asm-image"
IMAGE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LineEntry:
    """The first address of the bytes one source line produced."""

    address: int
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Image:
    """Code assembled for `base`; `symbols` maps every label to its absolute address (source order)."""

    base: int
    code: bytes
    symbols: dict[str, int]
    lines: tuple[LineEntry, ...] = ()
    data_ranges: tuple[tuple[int, int], ...] = ()  # [start, end) emitted by data directives
    _by_address: list[tuple[int, int, str]] = field(init=False, repr=False, compare=False)
    _line_addresses: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Sorted (address, definition order, name): the first-defined label wins at a shared address.
        ordered = sorted((address, order, name) for order, (name, address) in enumerate(self.symbols.items()))
        object.__setattr__(self, "_by_address", ordered)
        object.__setattr__(self, "_line_addresses", [entry.address for entry in self.lines])

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + len(self.code)

    def contains(self, address: int) -> bool:
        return self.base <= address < self.end

    def symbol(self, name: str) -> int:
        """The absolute address of a label; SymbolNotFound (an AsmError and a KeyError) if there is none."""
        try:
            return self.symbols[name]
        except KeyError:
            raise SymbolNotFound(f"no label {name!r} in this image ({len(self.symbols)} labels)") from None

    def symbolize(self, address: int) -> str:
        """`label+0x12` for the nearest label at or below address, `label` at offset 0; a bare hex address
        outside [base, end] or below the first label."""
        if not self.base <= address <= self.end:
            return f"{address:#x}"
        index = bisect.bisect_right(self._by_address, (address, len(self._by_address), "")) - 1
        if index < 0:
            return f"{address:#x}"
        label_address = self._by_address[index][0]
        # Several labels at one address: take the first defined.
        while index > 0 and self._by_address[index - 1][0] == label_address:
            index -= 1
        name = self._by_address[index][2]
        offset = address - label_address
        return name if offset == 0 else f"{name}+{offset:#x}"

    def source_line(self, address: int) -> LineEntry | None:
        """The source line whose bytes contain address (None outside the image)."""
        if not self.contains(address) or not self.lines:
            return None
        index = bisect.bisect_right(self._line_addresses, address) - 1
        return self.lines[index] if index >= 0 else None

    def disassemble(self, start: int | None = None, end: int | None = None) -> list[str]:
        """Listing lines `0x100010  lp_start+0x10  0f 01 c1  vmcall` for [start, end) (default: all)."""
        start = self.base if start is None else start
        end = self.end if end is None else end
        if not self.base <= start <= end <= self.end:
            raise AsmError(f"range {start:#x}..{end:#x} is not inside the image {self.base:#x}..{self.end:#x}")
        code = self.code[start - self.base:end - self.base]
        return disasm.listing(
            code, start, symbolize=self.symbolize, contains=self.contains, data_ranges=self.data_ranges
        )

    # --- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": IMAGE_FORMAT,
            "version": IMAGE_FORMAT_VERSION,
            "base": self.base,
            "code": self.code.hex(),
            "symbols": dict(self.symbols),
            "lines": [[entry.address, entry.file, entry.line] for entry in self.lines],
            "data_ranges": [list(pair) for pair in self.data_ranges],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        if data.get("format") != IMAGE_FORMAT or data.get("version") != IMAGE_FORMAT_VERSION:
            raise AsmError(
                f"not an {IMAGE_FORMAT} version {IMAGE_FORMAT_VERSION} record "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        return cls(
            base=int(data["base"]),
            code=bytes.fromhex(data["code"]),
            symbols={str(name): int(address) for name, address in data["symbols"].items()},
            lines=tuple(LineEntry(int(a), str(f), int(n)) for a, f, n in data.get("lines", ())),
            data_ranges=tuple((int(s), int(e)) for s, e in data.get("data_ranges", ())),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Image:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
