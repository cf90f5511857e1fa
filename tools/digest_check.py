"""The state stream's digest chain recomputed in Python over the messages as sent, and compared with the one the old hypervisor sends at VERIFY (or writes last to a suspend image)."""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.disk import DISK_BLOCK_SIZE
from emu.events import Event, EventKind
from hypervisors import transfer
from hypervisors.boot import Booted
from hypervisors.timeline import Transition
from tools.host_clock import HostClock

EVENT_KINDS = frozenset({EventKind.VMCALLR.value})
CHAINED_CALLS = (transfer.Call.INVARIANTS, transfer.Call.STATE)


@dataclass
class DigestCheck:
    """Subscribe `on_event` to the machine's events (EVENT_KINDS) and, for a suspend, `on_transition`
    to the restart timeline (the image is read at SUSPENDED). `agrees` is None until the digest is seen."""

    booted: Booted
    clock: HostClock = field(default_factory=HostClock)
    chain: bytes = transfer.STATE_DIGEST_START
    agrees: bool | None = None          # the old hypervisor's chain equals this one
    records_by_type: dict[str, int] = field(default_factory=dict)

    def on_event(self, event: Event) -> None:
        call = event.data["call"]
        if call not in (*CHAINED_CALLS, transfer.Call.VERIFY):
            return
        message = message_in_area(self.booted)
        if call in CHAINED_CALLS:
            self._add(message)
        else:
            self.agrees = digest_of(message) == self.chain

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
    header = transfer.TRANSFER_HEADER.unpack(message[:transfer.TRANSFER_HEADER.size])
    names, cursor = [], transfer.TRANSFER_HEADER.size
    for _ in range(header["record_count"]):
        if cursor + transfer.RECORD_HEADER.size > len(message):
            break
        record = transfer.RECORD_HEADER.unpack(message[cursor:cursor + transfer.RECORD_HEADER.size])
        try:
            names.append(transfer.RecordType(record["type"]).name.lower())
        except ValueError:
            names.append(f"type {record['type']}")
        cursor += transfer.RECORD_HEADER.size + record["length"]
    return names


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
