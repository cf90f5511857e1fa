"""`hhr fuzz` on a setup with a block device assigned (docs/fuzzing.md): the DEVICE record's fields are
among those it edits, and each field the receiver checks, given a value no device, partition, VP or
vector of this machine has, is refused, with every guest going on as it was."""
from __future__ import annotations

import pytest

from emu.block_devices import DEVICE_COUNT
from hypervisors import layouts, transfer
from hypervisors.memory_map import MAX_PARTITIONS
from tools.fuzz import executor, fields
from tools.fuzz.inputs import Edit, FuzzInput

DEVICE_GUESTS = ("blksoak,mem=8M,device=blk0", "counter,mem=4M")    # blksoak outlives the restart
EXCEPTION_VECTOR = 8                    # a vector set-device-interrupt refuses (docs/guests.md)
OTHER_VECTOR = 0x51                     # not blksoak's (blkirq.inc COMPLETION_VECTOR 0x50)
# For each field the receiver checks (receive_device, hypervisors/common/devices.inc), a value it must refuse.
BAD_VALUES = {"partition": MAX_PARTITIONS, "index": 7, "device": DEVICE_COUNT,
              "vector": EXCEPTION_VECTOR, "pending": OTHER_VECTOR}


@pytest.fixture(scope="module")
def machine() -> executor.TransferMachine:
    return executor.TransferMachine(executor.Setup(guests=DEVICE_GUESTS))


def device_record(machine: executor.TransferMachine) -> tuple[int, dict[str, fields.Field]]:
    """The message with the DEVICE record, and its fields by name."""
    for number, message in enumerate(machine.messages, 1):
        found = {field.name.split(".", 1)[1]: field for field in fields.message_fields(message)
                 if field.name.startswith("device[")}
        if found:
            return number, found
    pytest.fail("no DEVICE record crossed: the setup's device was not busy at the restart")


def test_the_device_record_is_among_the_fields_fuzzed(machine):
    _, found = device_record(machine)
    assert set(BAD_VALUES) <= {name for name, field in found.items() if field.checkable}
    assert machine.execute(FuzzInput("messages", device_record(machine)[0])).outcome == "committed"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_device_record_no_machine_could_hold_is_refused_and_the_guests_go_on(machine, name):
    number, found = device_record(machine)
    field = found[name]
    result = machine.execute(FuzzInput("messages", number, (Edit("set", field.offset, field.width, BAD_VALUES[name],
                                                                 field=field.name),), fix_digest=True))
    assert result.finding is None, result.finding
    assert result.outcome == "aborted" and result.replies[-1] == (transfer.Call.STATE, True, transfer.Reply.VALUE)


NOT_A_VECTOR = 0x1000                   # bit 12 of an entry's interruption info is reserved


def test_a_guest_the_old_hypervisor_stops_itself_for_its_changed_memory_is_not_the_transfer_s_finding():
    """A `state` input changes the old hypervisor's own memory: here the vector of blksoak's completion
    waiting in its VP record, which the old hypervisor then fails to inject (a failed VM entry: it
    stops the partition) before the blackout. The restart carries the stopped partition as it is;
    the guest was lost to the old hypervisor, and the oracle does not count it against the transfer."""
    machine = executor.TransferMachine(executor.Setup(guests=DEVICE_GUESTS, lps=2, request_at=100_000))
    machine.checkpoints.restore("m1")
    (vp,) = [record for record in machine.booted.vp_records() if record.partition == 0]
    layout = machine.booted.records.vp
    edit = Edit("set", vp.address + layout.offset("device_pending"), layout.field_size("device_pending"),
                NOT_A_VECTOR, field="vp[0].device_pending")
    result = machine.execute(FuzzInput("state", 1, (edit,)), deep=True)
    assert result.outcome == "committed" and result.finding is None, result.finding
    assert machine.stopped_by_old_hypervisor == {0}
    blksoak = machine.booted.partitions()[0]
    assert blksoak["state"] == layouts.PARTITION_STOPPED and blksoak["stop_reason"] == layouts.PARTITION_STOP_ENTRY_FAILED
