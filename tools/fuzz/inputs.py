"""A fuzz input: which part of the transfer it strikes and the edits it makes, stored as one small JSON file."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

TARGETS = ("messages", "state", "vmcs")
OPERATIONS = ("set", "xor", "insert", "delete")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Edit:
    """One change. `set`: `width` bytes at `offset` become `value` (little-endian); `xor`: the byte
    at `offset` is xored with `value`; `insert`: `data` goes in before `offset`; `delete`: `width`
    bytes at `offset` go. Offsets count from the message's first byte (target `messages`, `vmcs`),
    or from the first byte of the field named `at` in the message as the edits before left it (an
    input so made still means the same field when another build lays the message out otherwise), or
    are host-physical addresses in the old hypervisor's memory (target `state`). `field` names the
    transfer-record or hypervisor-record field the edit aims at ("" for a raw edit)."""

    op: str
    offset: int
    width: int = 0
    value: int = 0
    data: bytes = b""
    field: str = ""
    at: str = ""            # a field name (tools/fuzz/fields.py): `offset` counts from its first byte

    def as_json(self) -> dict:
        entry = {"op": self.op, "offset": self.offset}
        if self.at:
            entry["at"] = self.at
        if self.op in ("set", "delete"):
            entry["width"] = self.width
        if self.op in ("set", "xor"):
            entry["value"] = self.value
        if self.op == "insert":
            entry["data"] = self.data.hex()
        if self.field:
            entry["field"] = self.field
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> "Edit":
        if entry.get("op") not in OPERATIONS:
            raise ValueError(f"unknown edit {entry.get('op')!r}: one of {', '.join(OPERATIONS)}")
        return cls(entry["op"], int(entry["offset"]), int(entry.get("width", 0)), int(entry.get("value", 0)),
                   bytes.fromhex(entry.get("data", "")), entry.get("field", ""), entry.get("at", ""))


@dataclass(frozen=True)
class FuzzInput:
    """`message`: the number of the message struck (1 = INVARIANTS, then the STATE messages, the
    last = VERIFY's digest; counted from the end when negative: -1 = VERIFY's, -2 = the blackout's). `fix_digest`: the digest the old hypervisor sends at VERIFY is replaced by
    the chain over the messages as the new one received them, so only its own checks stand between a
    changed state and its acceptance. `fix_length`: the header's byte count follows inserts/deletes.
    `call`: the call number the new hypervisor finds in RAX at the struck message, instead of the one
    the old hypervisor made (None: that one). A `state` input strikes at message 1 (its edits made
    before any STATE message is made from the records) or at 0: before the restart begins, so that
    the run goes through the service partition's boot too."""

    target: str
    message: int
    edits: tuple[Edit, ...] = ()
    fix_digest: bool = False
    fix_length: bool = False
    call: int | None = None
    notes: dict = field(default_factory=dict, compare=False, hash=False)

    def as_json(self) -> dict:
        return {"format": FORMAT_VERSION, "target": self.target, "message": self.message,
                "fix_digest": self.fix_digest, "fix_length": self.fix_length,
                "edits": [edit.as_json() for edit in self.edits]} | ({} if self.call is None else {"call": self.call})

    def encode(self) -> bytes:
        return (json.dumps(self.as_json(), sort_keys=True) + "\n").encode()

    def name(self) -> str:
        """The corpus file name: a digest of the content (libFuzzer's layout)."""
        return hashlib.sha1(self.encode()).hexdigest()

    @classmethod
    def decode(cls, data: bytes) -> "FuzzInput":
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"not a fuzz input (JSON): {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a fuzz input of format {FORMAT_VERSION}")
        if document.get("target") not in TARGETS:
            raise ValueError(f"unknown target {document.get('target')!r}: one of {', '.join(TARGETS)}")
        return cls(document["target"], int(document["message"]),
                   tuple(Edit.from_json(entry) for entry in document.get("edits", [])),
                   bool(document.get("fix_digest")), bool(document.get("fix_length")),
                   None if document.get("call") is None else int(document["call"]))


def apply_edits(message: bytes, edits: tuple[Edit, ...]) -> bytearray:
    """The message with the edits made in order (edits past its end are clipped, edits at a field
    the message does not have are left out)."""
    data = bytearray(message)
    for edit in edits:
        offset = edit.offset
        if edit.at:
            from tools.fuzz import fields   # (fields knows transfer records; inputs stays plain)
            anchor = next((field for field in fields.message_fields(bytes(data)) if field.name == edit.at), None)
            if anchor is None:
                continue                    # no such field in this message: the edit does nothing
            offset += anchor.offset
        offset = min(max(offset, 0), len(data))
        if edit.op == "set":
            width = min(edit.width, len(data) - offset)
            data[offset:offset + width] = (edit.value & ((1 << (8 * edit.width)) - 1)).to_bytes(
                edit.width, "little")[:width]
        elif edit.op == "xor" and offset < len(data):
            data[offset] ^= edit.value & 0xFF
        elif edit.op == "insert":
            data[offset:offset] = edit.data
        elif edit.op == "delete":
            del data[offset:offset + edit.width]
    return data
