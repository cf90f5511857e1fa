"""`hhr fuzz` reaches the receiver's blocks a plain message edit cannot (docs/fuzzing.md): an unknown
call number, the service partition's boot, the take-over on other LPs; and `foreign-write` and
`lost-guest-state` judge a setup with two LPs."""
from __future__ import annotations

import random

import pytest

from emu import fast
from hypervisors import build, transfer
from tools.fuzz import coverage, executor, mutators, oracles
from tools.fuzz.inputs import Edit, FuzzInput
from tools.fuzz.mutators import MachineFacts, Mutator

SMALL_GUESTS = ("storm,mem=8M", "counter,mem=4M")
TWO_LP_REQUEST_AT = 100_000              # with two LPs the guests run twice as fast: the restart comes earlier
UNKNOWN_CALL = max(transfer.Call) + 1
MUTATIONS_TRIED = 400


@pytest.fixture(scope="module")
def machine() -> executor.TransferMachine:
    return executor.TransferMachine(executor.Setup(guests=SMALL_GUESTS), check_guests=False)


@pytest.fixture(scope="module")
def two_lps() -> executor.TransferMachine:
    return executor.TransferMachine(executor.Setup(guests=SMALL_GUESTS, lps=2, request_at=TWO_LP_REQUEST_AT),
                                    check_guests=False)


def entered_after(machine: executor.TransferMachine, fuzz_input: FuzzInput) -> tuple[executor.Result, set[str]]:
    """The input run on an emptied block map, and the blocks of service.inc it entered (by label)."""
    image = build.image(machine.setup.to_hv)
    fast.ffi.memmove(machine.block_map, bytes(len(image.code)), len(image.code))
    result = machine.execute(fuzz_input)
    marks = bytes(fast.ffi.buffer(machine.block_map))
    return result, {image.symbolize(address) for address, entered in
                    coverage.entered_blocks(image, marks, "service.inc") if entered}


def test_an_unknown_call_number_is_refused_in_receive_call_s_fall_through(machine):
    result, entered = entered_after(machine, FuzzInput("messages", 2, call=UNKNOWN_CALL))
    assert result.outcome == "aborted" and result.finding is None and result.changed
    assert result.replies[0][2] == transfer.Reply.ORDER
    assert "receive_call.out_of_order" in entered
    result, entered = entered_after(machine, FuzzInput("messages", 2))
    assert result.outcome == "committed" and "receive_call.out_of_order" not in entered


def test_a_known_call_at_the_wrong_time_is_refused_too(machine):
    """The INVARIANTS message delivered as COMMIT: refused (out of order), the guests go on."""
    result = machine.execute(FuzzInput("messages", 1, call=transfer.Call.COMMIT))
    assert result.outcome == "aborted" and result.finding is None
    assert result.replies[0][2] != transfer.Reply.ACCEPT


def test_the_call_number_is_kept_in_the_input_file():
    entry = FuzzInput("messages", 3, (Edit("xor", 40, value=1),), call=UNKNOWN_CALL)
    assert FuzzInput.decode(entry.encode()) == entry
    plain = FuzzInput("messages", 3)
    assert "call" not in plain.as_json()      # inputs without one are written as before


def test_a_state_input_at_message_0_runs_the_service_partition_s_boot(machine):
    result, entered = entered_after(machine, FuzzInput("state", 0))
    assert result.outcome == "committed" and result.finding is None
    assert {"service_entry", "service_entry+0x15"} <= entered
    result, entered = entered_after(machine, FuzzInput("state", 1))
    assert result.outcome == "committed" and "service_entry" not in entered


def test_the_mutator_strikes_elsewhere_now_and_then(machine):
    mutator = Mutator(random.Random(7), machine.messages, MachineFacts(machine.machine.ram.size, machine.region),
                      machine.state_fields(), machine.read_state, machine.vmcs_messages)
    calls = {mutator.mutate(FuzzInput("messages", 2)).call for _ in range(MUTATIONS_TRIED)}
    assert calls - {None} and calls - {None} <= set(mutators.CALL_NUMBERS)
    messages = {mutator.mutate(FuzzInput("state", 1)).message for _ in range(MUTATIONS_TRIED)}
    assert messages == {mutators.BEFORE_RESTART, 1}


def test_two_lps_take_over_with_the_other_lp_waiting(two_lps):
    result, entered = entered_after(two_lps, FuzzInput("messages", 2))
    assert result.outcome == "committed" and result.finding is None
    assert "takeover_wait" in entered


def follow_first(machine: executor.TransferMachine, callback, kinds) -> None:
    """`callback` sees the events before the fuzzer's own callback does."""
    events = machine.machine.events
    events.unsubscribe(machine._on_event)
    events.subscribe(callback, kinds)
    events.subscribe(machine._on_event, machine.events_followed)


def test_the_foreign_write_oracle_with_two_lps(two_lps, monkeypatch):
    """A write on the call's LP during the call is caught; the guests of the other LP write on."""
    page = two_lps.partition_pages[0].start << executor.PAGE_SHIFT

    def writes_a_guest_page(event):
        if event.kind == "vmcallr-return":
            two_lps.machine.ram.write(page, b"!")
    follow_first(two_lps, writes_a_guest_page, frozenset({"vmcallr-return"}))
    try:
        result = two_lps.execute(FuzzInput("messages", 2))
    finally:
        two_lps.machine.events.unsubscribe(writes_a_guest_page)
    assert result.finding is not None and result.finding.kind == oracles.FOREIGN_WRITE
    other = two_lps.machine.lps[1]
    run_slice, slices = other.run_slice, []

    def writes_on_the_other_lp(slice_end):
        if two_lps.state is not None and not two_lps.state.replies:    # during the struck call
            slices.append(slice_end)
            two_lps.machine.ram.write(page, b"!")
        return run_slice(slice_end)
    monkeypatch.setattr(other, "run_slice", writes_on_the_other_lp)
    result = two_lps.execute(FuzzInput("messages", 2))
    assert slices and result.finding is None and result.outcome == "committed"


def test_the_lost_guest_state_oracle_with_two_lps(two_lps):
    """An abort that loses a register of every VP is caught (the VPs that ran during the abort, whose
    records running changes, are left out: one that did not is enough)."""
    records = build.hypervisor("hv1").records

    def clobbers_every_vp(event):
        if event.kind == "restart-phase" and event.data["phase"] == transfer.Phase.ABORTED:
            for record in range(two_lps.booted.vp_total):
                address = two_lps.booted.vp_base + record * records.vp.size + records.vp.offset("rbx")
                two_lps.machine.ram.write_u64(address, 0xBAD)
    refused = FuzzInput("messages", 2, (Edit("xor", 0, value=1),))
    assert two_lps.execute(refused).finding is None
    two_lps.machine.events.subscribe(clobbers_every_vp, frozenset({"restart-phase"}))
    try:
        result = two_lps.execute(refused)
    finally:
        two_lps.machine.events.unsubscribe(clobbers_every_vp)
    assert result.outcome == "aborted" and result.finding.kind == oracles.LOST_GUEST_STATE
