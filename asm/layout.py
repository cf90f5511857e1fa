"""Structure layouts defined once in Python: offsets become assembly constants, pack/unpack serve the host."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

MAX_NATURAL_ALIGNMENT = 8
PADDING_PREFIX = "_"  # a field named `_...` is explicit padding: no constant, packed as zeros
_FIELD_NAME = re.compile(r"[A-Za-z_]\w*\Z", re.ASCII)
_INTEGER_FIELD_MAX_SIZE = 8  # unpack() returns ints for fields up to 8 bytes, bytes for larger ones


class LayoutError(ValueError):
    """A Struct definition or a pack/unpack call does not fit the layout."""


def natural_alignment(size: int) -> int:
    """The largest power of two dividing size, capped at 8 (a 4-byte field sits at a multiple of 4)."""
    return min(size & -size, MAX_NATURAL_ALIGNMENT)


class Struct:
    """A little-endian structure: fields in order, each naturally aligned; padding is written out."""

    def __init__(self, name: str, fields: Sequence[tuple[str, int]], *, size: int | None = None):
        if not _FIELD_NAME.match(name):
            raise LayoutError(f"struct name {name!r} is not an identifier")
        self.name = name
        self._offsets: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        offset = 0
        for field_name, field_size in fields:
            where = f"{name}.{field_name}"
            if not _FIELD_NAME.match(field_name):
                raise LayoutError(f"{where}: field name is not an identifier")
            if field_name in self._offsets:
                raise LayoutError(f"{where}: field defined twice")
            if isinstance(field_size, bool) or not isinstance(field_size, int) or field_size <= 0:
                raise LayoutError(f"{where}: size must be a positive int, got {field_size!r}")
            alignment = 1 if field_name.startswith(PADDING_PREFIX) else natural_alignment(field_size)
            if offset % alignment:
                raise LayoutError(
                    f"{where} at offset {offset:#x} is not aligned to {alignment} bytes: "
                    f"add an explicit padding field (a name starting with {PADDING_PREFIX!r})"
                )
            self._offsets[field_name] = offset
            self._sizes[field_name] = field_size
            offset += field_size
        if size is not None and size != offset:
            raise LayoutError(f"{name}: fields add up to {offset:#x} bytes, expected {size:#x}")
        self.size = offset
        prefix = name.upper()
        if f"{prefix}_SIZE" in {f"{prefix}_{field.upper()}" for field in self.field_names}:
            raise LayoutError(f"{name}: a field named 'size' would collide with the constant {prefix}_SIZE")

    @property
    def fields(self) -> tuple[tuple[str, int], ...]:
        return tuple(self._sizes.items())

    @property
    def field_names(self) -> tuple[str, ...]:
        """Named (non-padding) fields in order."""
        return tuple(name for name in self._offsets if not name.startswith(PADDING_PREFIX))

    def _known(self, field: str) -> None:
        if field not in self._offsets:
            raise LayoutError(f"{self.name} has no field {field!r} (fields: {', '.join(self.field_names)})")

    def offset(self, field: str) -> int:
        self._known(field)
        return self._offsets[field]

    def field_size(self, field: str) -> int:
        self._known(field)
        return self._sizes[field]

    def constants(self, prefix: str | None = None) -> dict[str, int]:
        """`PREFIX_FIELD` offsets and `PREFIX_SIZE`; PREFIX defaults to the struct name in upper case."""
        prefix = self.name.upper() if prefix is None else prefix
        table = {f"{prefix}_{field.upper()}": self._offsets[field] for field in self.field_names}
        table[f"{prefix}_SIZE"] = self.size
        return table

    def pack(self, **values: int | bytes) -> bytes:
        """The structure's bytes; ints are little-endian unsigned, bytes must fill the field, missing fields are 0."""
        buffer = bytearray(self.size)
        for field, value in values.items():
            self._known(field)
            if field.startswith(PADDING_PREFIX):
                raise LayoutError(f"{self.name}.{field} is padding and cannot be given a value")
            size, offset = self._sizes[field], self._offsets[field]
            if isinstance(value, (bytes, bytearray, memoryview)):
                encoded = bytes(value)
                if len(encoded) != size:
                    raise LayoutError(f"{self.name}.{field} takes {size} bytes, got {len(encoded)}")
            elif isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < 1 << (8 * size):
                    raise LayoutError(f"{self.name}.{field} = {value:#x} does not fit in {size} unsigned bytes")
                encoded = value.to_bytes(size, "little")
            else:
                raise LayoutError(f"{self.name}.{field} takes an int or bytes, got {type(value).__name__}")
            buffer[offset:offset + size] = encoded
        return bytes(buffer)

    def unpack(self, data: bytes) -> dict[str, int | bytes]:
        """Named fields of exactly `size` bytes: ints for fields up to 8 bytes, bytes for larger ones."""
        if len(data) != self.size:
            raise LayoutError(f"{self.name} is {self.size} bytes, got {len(data)}")
        values: dict[str, int | bytes] = {}
        for field in self.field_names:
            raw = bytes(data[self._offsets[field]:self._offsets[field] + self._sizes[field]])
            values[field] = int.from_bytes(raw, "little") if len(raw) <= _INTEGER_FIELD_MAX_SIZE else raw
        return values

    def __repr__(self) -> str:
        return f"Struct({self.name!r}, size={self.size:#x}, fields={list(self.field_names)})"


def merge_constants(*tables: Mapping[str, int]) -> dict[str, int]:
    """Combine constant tables for assemble(); a name given two different values is an error."""
    merged: dict[str, int] = {}
    for table in tables:
        for name, value in table.items():
            if name in merged and merged[name] != value:
                raise LayoutError(f"constant {name} defined twice ({merged[name]:#x} and {value:#x})")
            merged[name] = value
    return merged
