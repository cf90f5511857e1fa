"""Any bytes as a fuzz input: hhr's own JSON (tools/fuzz/inputs.py), what survives of it after a byte mutation, or raw bytes read as edits (a peer's queue entry)."""
from __future__ import annotations

import json
import re

from hypervisors import transfer
from tools.fuzz.inputs import OPERATIONS, Edit, FuzzInput

# Bounds an edit from a foreign file is held to, so that no file can make an edit costly to apply.
EDIT_WIDTH_MAX = transfer.TRANSFER_AREA_SIZE       # bytes a `set` or `delete` may cover
INSERT_BYTES_MAX = transfer.TRANSFER_AREA_SIZE     # bytes an `insert` may carry
EDITS_MAX = 64                                     # edits taken from one file

# Raw bytes (no target named in them): a header, then one edit per chunk (all little-endian):
#   header: message (signed byte; 0 reads as 1), flags (bit 0 fix_digest, bit 1 fix_length)
#   chunk:  operation (byte, modulo the four operations), offset (2 bytes), width - 1 (byte, modulo
#           RAW_WIDTH_MAX), value (8 bytes; an insert carries its first `width` bytes)
# A raw input always strikes a message in flight (target `messages`): the offsets of the other
# targets are addresses of the old hypervisor's records, which raw bytes cannot aim at.
RAW_HEADER_BYTES = 2
RAW_CHUNK_BYTES = 12
RAW_WIDTH_MAX = 8
RAW_FIX_DIGEST, RAW_FIX_LENGTH = 1, 2
RAW_TARGET = "messages"

_TARGET = re.compile(rb'"target"\s*:\s*"(\w+)"')
_MESSAGE = re.compile(rb'"message"\s*:\s*(-?\d{1,6})')
_FLAG = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*true') for name in ("fix_digest", "fix_length")}
_OBJECT = re.compile(rb"\{[^{}]*\}")


def bounded(edit: Edit) -> Edit:
    """The edit with its width and data held to what a transfer area can hold (and none negative)."""
    return Edit(edit.op, edit.offset, min(max(edit.width, 0), EDIT_WIDTH_MAX), edit.value,
                edit.data[:INSERT_BYTES_MAX], edit.field, edit.at)


def decode_any(data: bytes) -> FuzzInput:
    """A fuzz input from any bytes, never an exception: hhr's own encoding as it is; a document in
    which a target is still named (one mutated by a byte-level fuzzer) with the fields and edits
    that still parse; anything else read as raw edits (`RAW_*` above)."""
    try:
        entry = FuzzInput.decode(data)
        return FuzzInput(entry.target, entry.message, tuple(bounded(edit) for edit in entry.edits[:EDITS_MAX]),
                         entry.fix_digest, entry.fix_length)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        pass
    salvaged = _salvaged(data)
    return salvaged if salvaged is not None else _raw(data)


def _salvaged(data: bytes) -> FuzzInput | None:
    target = _TARGET.search(data)
    if target is None or target.group(1).decode() not in ("messages", "state", "vmcs"):
        return None
    message = _MESSAGE.search(data)
    edits = []
    for match in _OBJECT.finditer(data):
        try:
            document = json.loads(match.group(0))
            if isinstance(document, dict) and document.get("op") in OPERATIONS:
                edits.append(bounded(Edit.from_json(document)))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            continue                          # this edit did not survive the mutation
        if len(edits) == EDITS_MAX:
            break
    return FuzzInput(target.group(1).decode(), int(message.group(1)) if message else 1, tuple(edits),
                     _FLAG["fix_digest"].search(data) is not None, _FLAG["fix_length"].search(data) is not None)


def _raw(data: bytes) -> FuzzInput:
    header = data[:RAW_HEADER_BYTES].ljust(RAW_HEADER_BYTES, b"\0")
    message = int.from_bytes(header[:1], "little", signed=True) or 1
    flags = header[1]
    edits = []
    body = data[RAW_HEADER_BYTES:]
    for start in range(0, min(len(body), EDITS_MAX * RAW_CHUNK_BYTES) - RAW_CHUNK_BYTES + 1, RAW_CHUNK_BYTES):
        chunk = body[start:start + RAW_CHUNK_BYTES]
        op = OPERATIONS[chunk[0] % len(OPERATIONS)]
        offset = int.from_bytes(chunk[1:3], "little")
        width = chunk[3] % RAW_WIDTH_MAX + 1
        value = int.from_bytes(chunk[4:12], "little")
        if op == "insert":
            edits.append(Edit(op, offset, data=chunk[4:4 + width], field="raw"))
        else:
            edits.append(Edit(op, offset, width, value if op == "set" else value & 0xFF, field="raw"))
    return FuzzInput(RAW_TARGET, message, tuple(edits), bool(flags & RAW_FIX_DIGEST), bool(flags & RAW_FIX_LENGTH))


def encode_raw(entry: FuzzInput) -> bytes:
    """The input as raw bytes (`RAW_*` above) that `decode_any` reads back as the same edits: the
    form a byte-level fuzzer's mutations turn into other field edits. Only a `messages` input whose
    edits have plain offsets below 64 Ki, widths of 1 to `RAW_WIDTH_MAX` and inserts of at most as
    many bytes can be so written."""
    if entry.target != RAW_TARGET or not -128 <= entry.message <= 127 or entry.message == 0:
        raise ValueError(f"raw bytes carry a {RAW_TARGET} input of message -128 to 127, not {entry.target} {entry.message}")
    if len(entry.edits) > EDITS_MAX:
        raise ValueError(f"raw bytes carry at most {EDITS_MAX} edits")
    flags = (RAW_FIX_DIGEST if entry.fix_digest else 0) | (RAW_FIX_LENGTH if entry.fix_length else 0)
    data = bytearray(entry.message.to_bytes(1, "little", signed=True) + bytes([flags]))
    for edit in entry.edits:
        width = len(edit.data) if edit.op == "insert" else (edit.width if edit.op != "xor" else 1)
        if edit.at or not 0 <= edit.offset < 1 << 16 or not 1 <= width <= RAW_WIDTH_MAX:
            raise ValueError(f"an edit raw bytes cannot carry: {edit}")
        value = edit.data.ljust(RAW_WIDTH_MAX, b"\0") if edit.op == "insert" else \
            (edit.value & ((1 << (8 * RAW_WIDTH_MAX)) - 1)).to_bytes(RAW_WIDTH_MAX, "little")
        data += bytes([OPERATIONS.index(edit.op)]) + edit.offset.to_bytes(2, "little") + bytes([width - 1]) + value
    return bytes(data)


def runnable(entry: FuzzInput, messages: int) -> FuzzInput:
    """The input made runnable on a restart of `messages` messages: a message number out of range
    (a file from another setup, or from raw bytes) is taken modulo their count."""
    number = messages + 1 + entry.message if entry.message < 0 else entry.message
    if 1 <= number <= messages or entry.target == "state":       # (a `state` input strikes before any message)
        return entry
    return FuzzInput(entry.target, (entry.message - 1) % messages + 1, entry.edits, entry.fix_digest, entry.fix_length)
