"""The fields of a transfer message, found from the record layouts of hypervisors/transfer.py, and which of them the new hypervisor can check."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisors import transfer

@dataclass(frozen=True)
class Field:
    name: str               # record.field, e.g. "vp[2].rax", "header.bytes"
    offset: int
    width: int
    checkable: bool


_LAYOUT_FIELDS: dict[int, list[tuple[str, int, int, bool]]] = {}   # by layout: (name, offset, size, checkable)


def _struct_fields(layout, base: int, prefix: str) -> list[Field]:
    found = _LAYOUT_FIELDS.get(id(layout))
    if found is None:
        trusted = transfer.TRUSTED_FIELDS.get(layout.name, set())   # marked beside the layouts
        found = _LAYOUT_FIELDS[id(layout)] = [(name, layout.offset(name), size,
                                               not (name.startswith("_pad") or name in trusted))
                                              for name, size in layout.fields]
    return [Field(f"{prefix}.{name}", base + offset, size, checkable) for name, offset, size, checkable in found]


def message_fields(message: bytes) -> list[Field]:
    """Every field of a message as far as its records hold together: the header, each record's
    header and body (a VMCS record's (encoding, value) pairs too)."""
    header_size = transfer.TRANSFER_HEADER.size
    fields = _struct_fields(transfer.TRANSFER_HEADER, 0, "header")
    if len(message) < header_size:
        return [field for field in fields if field.offset + field.width <= len(message)]
    header = transfer.TRANSFER_HEADER.unpack(message[:header_size])
    cursor = header_size
    for number in range(header["record_count"]):
        if cursor + transfer.RECORD_HEADER.size > len(message):
            break
        record = transfer.RECORD_HEADER.unpack(message[cursor:cursor + transfer.RECORD_HEADER.size])
        try:
            kind = transfer.RecordType(record["type"])
        except ValueError:
            break
        name = f"{kind.name.lower()}[{number}]"
        fields += _struct_fields(transfer.RECORD_HEADER, cursor, f"{name}.record")
        body = cursor + transfer.RECORD_HEADER.size
        layout = transfer.RECORD_LAYOUTS[kind]
        if body + layout.size <= len(message):
            fields += _struct_fields(layout, body, name)
        if kind == transfer.RecordType.VMCS:
            pair = body + layout.size
            for index in range((record["length"] - layout.size) // transfer.VMCS_FIELD.size):
                if pair + transfer.VMCS_FIELD.size > len(message):
                    break
                fields += _struct_fields(transfer.VMCS_FIELD, pair, f"{name}.field[{index}]")
                pair += transfer.VMCS_FIELD.size
        cursor = body + record["length"]
    return fields


# Where `records` reads a message's record count and each record's length (read in place: it runs for
# every mutation, and unpacking whole headers there cost more than the rest of the mutation).
_COUNT_AT = transfer.TRANSFER_HEADER.offset("record_count")
_COUNT_BYTES = transfer.TRANSFER_HEADER.field_size("record_count")
_LENGTH_AT = transfer.RECORD_HEADER.offset("length")
_LENGTH_BYTES = transfer.RECORD_HEADER.field_size("length")


_UNSIGNED = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_READ_LENGTH = struct.Struct(_UNSIGNED[_LENGTH_BYTES]).unpack_from


def records(message: bytes, known: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """(offset, size with header) of each record. `known`: the first records, already found (a walk
    of a message whose bytes before their end are these: `records_after_edits`)."""
    header_size = transfer.TRANSFER_HEADER.size
    end = len(message)
    if end < header_size:
        return []
    count = int.from_bytes(message[_COUNT_AT:_COUNT_AT + _COUNT_BYTES], "little")
    record_header = transfer.RECORD_HEADER.size
    spans = list(known[:count])
    cursor = spans[-1][0] + spans[-1][1] if spans else header_size
    append, read_length, length_at = spans.append, _READ_LENGTH, _LENGTH_AT
    for _ in range(count - len(spans)):
        if cursor + record_header > end:
            break
        size = record_header + read_length(message, cursor + length_at)[0]
        if cursor + size > end:
            break
        append((cursor, size))
        cursor += size
    return spans


def has_records(message: bytes) -> bool:
    """`records(message)` is not empty (its first step only)."""
    header_size = transfer.TRANSFER_HEADER.size
    if len(message) < header_size + transfer.RECORD_HEADER.size or \
            not int.from_bytes(message[_COUNT_AT:_COUNT_AT + _COUNT_BYTES], "little"):
        return False
    return header_size + transfer.RECORD_HEADER.size + _READ_LENGTH(message, header_size + _LENGTH_AT)[0] <= len(message)


def records_after_edits(message: bytes, original: bytes, original_records: list[tuple[int, int]],
                        edits) -> list[tuple[int, int]]:
    """`records(message)`, `message` being `original` (whose records are `original_records`) with
    `edits` made (inputs.apply_edits): the records lying wholly before the first byte any edit
    touches (the header's bytes changed in place aside) are the original's, and the walk goes on from there."""
    length, untouched = len(original), len(original)
    for edit in edits:                    # each edit's offset as apply_edits clips it
        if edit.at:
            return records(message)
        offset = min(max(edit.offset, 0), length)
        width = edit.width if edit.op == "set" else 1
        if not (edit.op in ("set", "xor") and offset + width <= transfer.TRANSFER_HEADER.size):
            untouched = min(untouched, offset)   # (the header's bytes in place: only its count is walked,
        if edit.op == "insert":                  # and it is read again)
            length += len(edit.data)
        elif edit.op == "delete":
            length -= max(0, min(edit.width, length - offset))
    if untouched < transfer.TRANSFER_HEADER.size:
        return records(message)
    kept = 0
    while kept < len(original_records) and sum(original_records[kept]) <= untouched:
        kept += 1
    return records(message, original_records[:kept])


def record_walk_bytes(message: bytes) -> bytes:
    """One byte per byte of the message, 1 where `records` reads it (the record count, each record's
    length): a message differing from this one only elsewhere, and as long, has the same records."""
    marks = bytearray(len(message))
    if len(message) >= transfer.TRANSFER_HEADER.size:
        marks[_COUNT_AT:_COUNT_AT + _COUNT_BYTES] = b"\x01" * _COUNT_BYTES
    for offset, _ in records(message):
        marks[offset + _LENGTH_AT:offset + _LENGTH_AT + _LENGTH_BYTES] = b"\x01" * _LENGTH_BYTES
    return bytes(marks)


def field_at(fields: list[Field], offset: int) -> Field | None:
    for field in fields:
        if field.offset <= offset < field.offset + field.width:
            return field
    return None
