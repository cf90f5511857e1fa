"""The fields of a transfer message, found from the record layouts of hypervisors/transfer.py, and which of them the new hypervisor can check."""
from __future__ import annotations

from dataclasses import dataclass

from hypervisors import transfer

@dataclass(frozen=True)
class Field:
    name: str               # record.field, e.g. "vp[2].rax", "header.bytes"
    offset: int
    width: int
    checkable: bool


def _struct_fields(layout, base: int, prefix: str) -> list[Field]:
    trusted = transfer.TRUSTED_FIELDS.get(layout.name, set())   # marked beside the layouts
    return [Field(f"{prefix}.{name}", base + layout.offset(name), size,
                  not (name.startswith("_pad") or name in trusted))
            for name, size in layout.fields]


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


def records(message: bytes) -> list[tuple[int, int]]:
    """(offset, size with header) of each record."""
    header_size = transfer.TRANSFER_HEADER.size
    if len(message) < header_size:
        return []
    count = int.from_bytes(message[_COUNT_AT:_COUNT_AT + _COUNT_BYTES], "little")
    record_header = transfer.RECORD_HEADER.size
    spans, cursor = [], header_size
    for _ in range(count):
        if cursor + record_header > len(message):
            break
        at = cursor + _LENGTH_AT
        size = record_header + int.from_bytes(message[at:at + _LENGTH_BYTES], "little")
        if cursor + size > len(message):
            break
        spans.append((cursor, size))
        cursor += size
    return spans


def field_at(fields: list[Field], offset: int) -> Field | None:
    for field in fields:
        if field.offset <= offset < field.offset + field.width:
            return field
    return None
