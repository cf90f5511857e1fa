"""The state stream's digest chain recomputed in Python over the messages as sent, and compared with the one the old hypervisor sends at VERIFY (or writes last to a suspend image)."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.disk import DISK_BLOCK_SIZE
from emu.events import Event, EventKind
from hypervisors import transfer
from hypervisors.boot import Booted
from hypervisors.timeline import Transition
from tools.host_clock import HostClock

EVENT_KINDS = frozenset({EventKind.VMCALLR.value, EventKind.VMCALLR_RETURN.value})
CHAINED_CALLS = (transfer.Call.INVARIANTS, transfer.Call.STATE)
# A post-copy's fetches: the old hypervisor writes their messages during the call, so they are read
# at its return; they continue the chain, and DRAIN_DIGEST carries it last.
FETCH_CALLS = (transfer.Call.FETCH_NEXT, transfer.Call.FETCH_TABLE)


@dataclass
class DigestCheck:
    """Subscribe `on_event` to the machine's events (EVENT_KINDS) and, for a suspend, `on_transition`
    to the restart timeline (the image is read at SUSPENDED). `agrees` is None until the digest is seen."""

    booted: Booted
    clock: HostClock = field(default_factory=HostClock)
    chain: bytes = transfer.STATE_DIGEST_START
    agrees: bool | None = None          # the old hypervisor's chain equals this one
    drain_agrees: bool | None = None    # a post-copy: its chain after the fetches too (DRAIN_DIGEST)
    records_by_type: dict[str, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)     # LP: a post-copy fetch under way

    def on_event(self, event: Event) -> None:
        if event.kind == EventKind.VMCALLR_RETURN:
            self._fetched(self.calls.pop(event.lp, None), event)
            return
        call = event.data["call"]
        if call in (*FETCH_CALLS, transfer.Call.DRAIN_DIGEST):
            self.calls[event.lp] = call
            return
        if call not in (*CHAINED_CALLS, transfer.Call.VERIFY):
            return
        message = message_in_area(self.booted)
        if call in CHAINED_CALLS:
            self._add(message)
        else:
            self.agrees = digest_of(message) == self.chain

    def _fetched(self, call: int | None, event: Event) -> None:
        if call is None or not event.data["ok"] or event.data["result"] != transfer.Reply.ACCEPT:
            return
        message = message_in_area(self.booted)
        if call == transfer.Call.DRAIN_DIGEST:
            self.drain_agrees = digest_of(message) == self.chain
        else:
            self.chain = transfer.chain_digest(self.chain, message)

    def on_transition(self, transition: Transition) -> None:
        if transition.phase == transfer.Phase.SUSPENDED:
            with self.clock.excluded():
                self._read_suspend_image()

    def _add(self, message: bytes) -> None:
        self.chain = transfer.chain_digest(self.chain, message)
        for record_type in record_types(message):
            self.records_by_type[record_type] = self.records_by_type.get(record_type, 0) + 1

    def _read_suspend_image(self) -> None:
        """The messages the old hypervisor wrote to the disk: counted, typed and chained as the
        inverse hypercalls' messages are, and the chain compared with the digest written last."""
        messages = suspend_messages(self.booted.machine.io.disk)
        for message in messages[:-1]:
            self._add(message)
        self.agrees = digest_of(messages[-1]) == self.chain


def message_in_area(booted: Booted) -> bytes:
    """The message in the transfer area, as long as its header says (at most the area)."""
    ram, area = booted.machine.ram, booted.transfer_area
    header = transfer.TRANSFER_HEADER.unpack(ram.read(area, transfer.TRANSFER_HEADER.size))
    return ram.read(area, min(header["bytes"], transfer.TRANSFER_AREA_SIZE))


def digest_of(message: bytes) -> bytes:
    """The chain a digest message (VERIFY's) carries."""
    return message[transfer.TRANSFER_HEADER.size:transfer.TRANSFER_HEADER.size + transfer.STATE_DIGEST_BYTES]


def record_types(message: bytes) -> list[str]:
    """The type names of a message's records, in order (as far as the message holds together)."""
    return [name for name, _ in records_of(message)]


def records_of(message: bytes) -> list[tuple[str, dict]]:
    """A message's records in order, each its type's name and its fields (empty for a type or length
    this side does not know), as far as the message holds together."""
    header = transfer.TRANSFER_HEADER.unpack(message[:transfer.TRANSFER_HEADER.size])
    records, cursor = [], transfer.TRANSFER_HEADER.size
    for _ in range(header["record_count"]):
        if cursor + transfer.RECORD_HEADER.size > len(message):
            break
        record = transfer.RECORD_HEADER.unpack(message[cursor:cursor + transfer.RECORD_HEADER.size])
        body = message[cursor + transfer.RECORD_HEADER.size:cursor + transfer.RECORD_HEADER.size + record["length"]]
        try:
            record_type = transfer.RecordType(record["type"])
        except ValueError:
            records.append((f"type {record['type']}", {}))
        else:
            layout = transfer.RECORD_LAYOUTS[record_type]
            fields = layout.unpack(body[:layout.size]) if len(body) >= layout.size else {}
            records.append((record_type.name.lower(), fields))
        cursor += transfer.RECORD_HEADER.size + record["length"]
    return records


def suspend_messages(disk) -> list[bytes]:
    """The messages of the suspend image on `disk`, in order, the digest message last (empty without
    an image)."""
    header = transfer.SUSPEND_HEADER.unpack(
        disk.read(transfer.SUSPEND_HEADER_BLOCK * DISK_BLOCK_SIZE, transfer.SUSPEND_HEADER.size))
    if header["magic"] != transfer.SUSPEND_MAGIC:
        return []
    messages, block = [], header["state_block"]
    for _ in range(header["messages"]):
        header_bytes = disk.read(block * DISK_BLOCK_SIZE, transfer.TRANSFER_HEADER.size)
        size = min(transfer.TRANSFER_HEADER.unpack(header_bytes)["bytes"], transfer.TRANSFER_AREA_SIZE)
        messages.append(disk.read(block * DISK_BLOCK_SIZE, size))
        block += max(1, -(-size // DISK_BLOCK_SIZE))
    return messages
