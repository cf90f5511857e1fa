"""New fuzz inputs from old ones: structure-aware edits of transfer-record fields at the valid/invalid boundary, record-level edits, raw byte edits."""
from __future__ import annotations

import random
from dataclasses import dataclass

from hypervisors import transfer
from hypervisors.memory_map import LARGE_PAGE_SIZE, MAX_PARTITIONS, MAX_VPS, PAGE_SIZE
from tools.fuzz import fields as fields_module
from tools.fuzz.inputs import Edit, FuzzInput, apply_edits

MAX_EDITS = 8                    # edits one input carries at most
NEW_EDITS_MAX = 3                # edits one mutation adds at most
STRUCTURED_SHARE = 0.7           # of new edits: a field to a boundary value (the rest: raw or record edits)
RECORD_EDIT_SHARE = 0.3          # of the rest: a record dropped or duplicated
FIX_DIGEST_FLIP = 0.25           # chance a child changes its parent's fix_digest
INSERT_MAX = 16                  # bytes a raw insert adds at most
BYTE_MAX = 0xFF
CANONICAL_HOLE = 1 << 47         # the first non-canonical address
SIGN_BIT_64 = 1 << 63
BITS_PER_BYTE = 8
FIX_DIGEST_SHARE = 0.5           # fresh message inputs that ask for the digest to be fixed
COUNT_BYTES = transfer.TRANSFER_HEADER.field_size("record_count")
TYPE_BYTES = transfer.RECORD_HEADER.field_size("type")
STRIKE_CHANGE_SHARE = 0.03       # children that strike elsewhere: another call number, or (state) before the restart
BEFORE_RESTART = 0               # a state input's message number before the first: the service partition's boot
# Call numbers an inverse hypercall may carry instead of its own: each the receiver knows, the first
# past them, and the edges of RAX.
CALL_NUMBERS = tuple(sorted({0, *(int(call) for call in transfer.Call), max(transfer.Call) + 1, (1 << 32) - 1,
                             1 << 32, SIGN_BIT_64, (1 << 64) - 1}))
FIELD_CACHE_ENTRIES = 256        # parents whose messages' fields are kept
MESSAGE_CACHE_ENTRIES = 64       # edited messages (and their record spans) kept: a parent's children
                                 # start from the same one


@dataclass
class MachineFacts:
    """What boundary values depend on: the machine's size and the new hypervisor's region."""

    ram_size: int
    service_region: int


def boundary_values(width: int, value: int, facts: MachineFacts, rng: random.Random) -> list[int]:
    """Values at and around the edges of what a field of `width` bytes holding `value` may hold."""
    top = (1 << (BITS_PER_BYTE * width)) - 1
    values = {0, 1, top, top - 1, value - 1, value + 1, value ^ (1 << rng.randrange(BITS_PER_BYTE * width)),
              value * 2, value >> 1, top >> 1, (top >> 1) + 1}
    if width == 4:
        values |= {MAX_PARTITIONS, MAX_PARTITIONS - 1, MAX_VPS, MAX_VPS + 1, PAGE_SIZE, len(transfer.RecordType) + 1}
    if width >= 8:
        values |= {facts.ram_size, facts.ram_size - PAGE_SIZE, facts.ram_size + PAGE_SIZE,
                   facts.service_region, facts.service_region + transfer.SERVICE_REGION_SIZE - PAGE_SIZE,
                   value + PAGE_SIZE, value - PAGE_SIZE, value + LARGE_PAGE_SIZE, value - LARGE_PAGE_SIZE,
                   value + 1, CANONICAL_HOLE, SIGN_BIT_64, value | (PAGE_SIZE - 1)}
    values.discard(value)
    return sorted(candidate & top for candidate in values)


class Mutator:
    """Makes inputs for one machine setup: the messages of its reference restart, its facts, and
    the old hypervisor's record fields (target `state`)."""

    def __init__(self, rng: random.Random, messages: list[bytes], facts: MachineFacts,
                 state_fields: list[fields_module.Field], read_state, vmcs_messages: list[int]):
        self.rng = rng
        self.messages = messages                # message number - 1: its bytes as sent
        self.facts = facts
        self.state_fields = state_fields
        self.read_state = read_state            # (address, width) -> int, the old hypervisor's memory
        self.vmcs_messages = vmcs_messages or [len(messages)]
        self._field_cache: dict[tuple, list[fields_module.Field]] = {}
        self._bodies: dict[transfer.RecordType, list[bytes]] = {}
        self._edited: dict[tuple, list] = {}    # (number, edits): [message, its record spans or None]
        self._walks: dict[int, tuple[list, bytes]] = {}   # number: the message as sent's records, and
                                                          # the bytes their walk reads

    def fresh(self, target: str) -> FuzzInput:
        if target == "state":
            return FuzzInput("state", 1)
        if target == "vmcs":
            return FuzzInput("vmcs", self.rng.choice(self.vmcs_messages), fix_digest=True)
        return FuzzInput("messages", self.rng.randrange(1, len(self.messages) + 1),
                         fix_digest=self.rng.random() < FIX_DIGEST_SHARE)

    def mutate(self, parent: FuzzInput) -> FuzzInput:
        rng = self.rng
        edits = list(parent.edits)
        if len(edits) >= MAX_EDITS:
            edits = rng.sample(edits, MAX_EDITS // 2)
        fix_digest = parent.fix_digest != (rng.random() < FIX_DIGEST_FLIP)
        fix_length = parent.fix_length != (rng.random() < FIX_DIGEST_FLIP)
        for _ in range(rng.randint(1, NEW_EDITS_MAX)):
            edit = self._state_edit() if parent.target == "state" else self._message_edit(parent, edits)
            if edit is not None:
                edits.append(edit)
        # Now and then a child strikes elsewhere (not passed on: a whole restart from before it begins
        # costs several inputs, a call number refused at once reaches no record).
        message, call = (1 if parent.target == "state" else parent.message), None
        if rng.random() < STRIKE_CHANGE_SHARE:
            if parent.target == "state":      # before the restart begins: the service partition's boot
                message = BEFORE_RESTART
            else:                             # another call number in RAX: a call the receiver does not know, or
                call = rng.choice(CALL_NUMBERS)   # one it does at the wrong time
        if parent.target == "state":
            fix_digest = fix_length = False
        return FuzzInput(parent.target, message, tuple(edits), fix_digest, fix_length, call)

    def _state_edit(self) -> Edit | None:
        if not self.state_fields:
            return None
        field = self.rng.choice(self.state_fields)
        value = self.read_state(field.offset, field.width)
        return Edit("set", field.offset, field.width,
                    self.rng.choice(boundary_values(field.width, value, self.facts, self.rng)), field=field.name)

    def _message_edit(self, parent: FuzzInput, edits: list[Edit]) -> Edit | None:
        rng = self.rng
        number = parent.message if parent.message > 0 else len(self.messages) + 1 + parent.message
        edited = self._edited_message(number, tuple(edits))
        message = edited[0]
        if not message:
            return None
        fields = self._fields(number, parent.edits, parent.target == "vmcs")
        if rng.random() < STRUCTURED_SHARE and fields:
            field = rng.choice(fields)
            value = int.from_bytes(message[field.offset:field.offset + field.width], "little")
            return Edit("set", field.offset, field.width,
                        rng.choice(boundary_values(field.width, value, self.facts, rng) + _field_values(field.name)),
                        field=field.name)
        if fields_module.has_records(message) and rng.random() < RECORD_EDIT_SHARE:
            if edited[1] is None:         # (walked only when a record edit is drawn)
                edited[1] = self._records(number, tuple(edits), message)
            return self._record_edit(message, edited[1], edits)
        offset = rng.randrange(len(message))
        operation = rng.choice(("xor", "set", "insert", "delete"))
        if operation == "xor":
            return Edit("xor", offset, value=1 << rng.randrange(BITS_PER_BYTE))
        if operation == "set":
            return Edit("set", offset, 1, rng.randrange(BYTE_MAX + 1))
        if operation == "insert":
            return Edit("insert", offset, data=bytes(rng.randrange(BYTE_MAX + 1)
                                                     for _ in range(rng.randint(1, INSERT_MAX))))
        return Edit("delete", offset, rng.randint(1, INSERT_MAX))

    def _edited_message(self, number: int, edits: tuple[Edit, ...]) -> list:
        """[message `number` as `edits` leave it, its record spans (found when first asked)]: kept
        for the next mutations, which mostly start from the same parent's edits."""
        key = (number, edits)
        found = self._edited.get(key)
        if found is None:
            if len(self._edited) >= MESSAGE_CACHE_ENTRIES:
                self._edited.pop(next(iter(self._edited)))
            found = self._edited[key] = [bytes(apply_edits(self.messages[number - 1], edits)), None]
        return found

    def _records(self, number: int, edits: tuple[Edit, ...], message: bytes) -> list[tuple[int, int]]:
        """`fields.records(message)`, `message` being message `number` as `edits` leave it: those of
        the message as sent when the edits only set or xor bytes its record walk does not read, else
        a walk that starts after the records the edits leave alone."""
        if number not in self._walks:
            sent = self.messages[number - 1]
            self._walks[number] = (fields_module.records(sent), fields_module.record_walk_bytes(sent))
        spans, walked = self._walks[number]
        for edit in edits:
            if edit.op not in ("set", "xor") or edit.at:
                break
            offset = min(max(edit.offset, 0), len(walked))
            stop = min(offset + (edit.width if edit.op == "set" else 1), len(walked))
            if walked.count(1, offset, stop):
                break
        else:
            return spans
        return fields_module.records_after_edits(message, self.messages[number - 1], spans, edits)

    def _fields(self, number: int, edits: tuple[Edit, ...], vmcs_only: bool = False) -> list[fields_module.Field]:
        """The fields of message `number` as `edits` (a parent's) leave it: found once per parent (its
        children's own edits are aimed by them too) and, while the edits keep the message's shape
        (no bytes in or out, record headers and count as they were), those of the message as sent.
        `vmcs_only`: only the VMCS records' fields (all of them if it has none)."""
        if all(edit.op in ("set", "xor") and not _shapes(edit) for edit in edits):
            edits = ()
        key = (number, edits, vmcs_only)
        if key not in self._field_cache:
            if len(self._field_cache) >= FIELD_CACHE_ENTRIES:
                self._field_cache.pop(next(iter(self._field_cache)))
            found = fields_module.message_fields(bytes(apply_edits(self.messages[number - 1], edits)))
            if vmcs_only:
                found = [field for field in found if field.name.startswith("vmcs[")] or found
            self._field_cache[key] = found
        return self._field_cache[key]

    def _new_record(self) -> bytes:
        """A record of a random type: a body the recorded messages sent for that type if there is
        one (a MAP, a VP ...), else the layout's size of zeros with partition 0 (a WINDOW_RESET)."""
        kind = self.rng.choice(list(transfer.RecordType))
        layout = transfer.RECORD_LAYOUTS[kind]
        if kind not in self._bodies:          # (found once per type)
            self._bodies[kind] = [message[offset + transfer.RECORD_HEADER.size:offset + size]
                                  for message in self.messages for offset, size in fields_module.records(message)
                                  if int.from_bytes(message[offset:offset + TYPE_BYTES], "little") == kind]
        bodies = self._bodies[kind]
        body = self.rng.choice(bodies) if bodies else bytes(layout.size)
        return transfer.RECORD_HEADER.pack(type=kind, version=transfer.RECORD_VERSION, length=len(body)) + body

    def _record_edit(self, message: bytes, spans: list[tuple[int, int]], edits: list[Edit]) -> Edit:
        """A record made, duplicated or dropped; the record count follows in an edit of its own."""
        offset, size = self.rng.choice(spans)
        count_offset = transfer.TRANSFER_HEADER.offset("record_count")
        count = int.from_bytes(message[count_offset:count_offset + COUNT_BYTES], "little")
        operation = self.rng.choice(("new", "duplicate", "drop"))
        if operation == "new":                # a record of any type, one the sender never sent here
            edits.append(Edit("insert", offset, data=self._new_record(), field="record.insert"))
            return Edit("set", count_offset, COUNT_BYTES, count + 1, field="header.record_count")
        if operation == "duplicate":
            edits.append(Edit("insert", offset, data=message[offset:offset + size], field="record.duplicate"))
            return Edit("set", count_offset, COUNT_BYTES, count + 1, field="header.record_count")
        edits.append(Edit("delete", offset, size, field="record.drop"))
        return Edit("set", count_offset, COUNT_BYTES, count - 1, field="header.record_count")


def _shapes(edit: Edit) -> bool:
    """The edit may move record boundaries: it touches the header's count or byte count, or a record header."""
    name = edit.field or edit.at
    return name.startswith("header.") or ".record." in name or edit.at != "" or (
        not name and edit.offset < transfer.TRANSFER_HEADER.size)


def _field_values(name: str) -> list[int]:
    """Values that mean something to a field of this name: every record type, every layout's length."""
    if name.endswith(".record.type"):
        return [int(kind) for kind in transfer.RecordType]
    if name.endswith(".record.length"):
        return sorted({layout.size for layout in transfer.RECORD_LAYOUTS.values()})
    if name.endswith((".owner",)):
        return [int(owner) for owner in transfer.TransferOwner]
    return []
