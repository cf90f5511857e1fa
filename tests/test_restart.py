"""Hot restart (docs/protocol.md), in every direction and through every abort: guests keep running with
their memory in place, and what they compute is what they compute without a restart."""
from __future__ import annotations

import pytest

from guests import catalog
from hypervisors import boot, layouts, memory_state, transfer
from hypervisors.memory_map import FREE_BASE, HEAP_BASE, HYPERVISOR_BASE, LARGE_PAGE_SIZE
from tools import restart as restart_module
from tools import run as run_module

GUESTS = ["storm,vps=2", "heartbeat", "hashchain", "timer"]
DETERMINISTIC = {"storm", "hashchain"}          # outputs that do not depend on timing
REQUEST_AT = 400_000
PHASES_IN_ORDER = ["requested", "service", "invariants", "precopy", "blackout", "commit", "devirtualize"]


@pytest.fixture(scope="module")
def without_restart() -> dict:
    return {g["name"]: g for g in run_module.run("hv1", GUESTS, lps=2).document["guests"]}


def restarted(source: str, target: str, injection: str = "none") -> dict:
    return restart_module.restart(source, target, GUESTS, lps=2, request_at=REQUEST_AT, injection=injection)


def assert_guests_unharmed(document: dict, without_restart: dict) -> None:
    for guest in document["guests"]:
        assert guest["exit_code"] == 0, guest
        if guest["name"] in DETERMINISTIC:
            assert guest["console"] == without_restart[guest["name"]]["console"]


@pytest.mark.parametrize("source, target", [("hv1", "hv2"), ("hv2", "hv1"), ("hv1", "hv1"), ("hv2", "hv2")])
def test_restart_in_every_direction(source, target, without_restart):
    document = restarted(source, target)
    restart = document["restart"]
    assert restart["status"] == "done" and document["hypervisor"] == target
    assert_guests_unharmed(document, without_restart)
    assert [phase["phase"] for phase in restart["phases"]] == PHASES_IN_ORDER
    assert restart["guest_memory_unchanged"] is True, "a hypervisor wrote guest memory in the blackout"
    assert restart["guest_pages_in_place"] is True, "a guest page moved"
    assert restart["digest_agrees_with_python"] is True
    running = [vp for vp in restart["vps"] if vp["state"] == "running"]
    assert running and all(vp["blackout_ticks"] > 0 for vp in running)
    assert restart["phases"][PHASES_IN_ORDER.index("blackout")]["inverse_calls"] >= 2   # final state, verify
    assert sum(phase["bytes_sent"] for phase in restart["phases"]) > 0


def test_after_the_restart_the_old_hypervisors_memory_is_free_and_the_database_agrees():
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=REQUEST_AT)
    recorder = restart_module.request(booted, "hv2")
    assert recorder.finished and booted.hypervisor == "hv2"
    while memory_state.lock_held(booted):
        booted.machine.run(max_instructions=booted.machine.retired + 100)
    state = memory_state.read(booted)
    assert memory_state.problems(state) == []
    assert layouts.OWNER_PREVIOUS not in state.frame_owners
    assert all(owner != layouts.OWNER_PREVIOUS for owner, _ in state.page_owners.values())
    old_frames = [HYPERVISOR_BASE // LARGE_PAGE_SIZE, *range(HEAP_BASE // LARGE_PAGE_SIZE, FREE_BASE // LARGE_PAGE_SIZE)]
    assert {state.frame_owners[frame] for frame in old_frames} == {layouts.OWNER_FREE}
    assert booted.image_base == recorder.service_region


@pytest.mark.parametrize("injection, status, detail", [
    ("digest", "digest_mismatch", None),
    ("hang-boot", "service_timeout", None),
    ("fault-boot", "service_failed", None),
    ("corrupt-message", "refused", transfer.Reply.DIGEST),
])
def test_an_abort_leaves_the_old_hypervisor_running_and_guests_unharmed(injection, status, detail, without_restart):
    document = restarted("hv1", "hv2", injection)
    restart = document["restart"]
    assert restart["status"] == status
    if detail is not None:
        assert restart["detail"] == detail
    assert document["hypervisor"] == "hv1"
    assert_guests_unharmed(document, without_restart)
    assert f"restart aborted: status {transfer.Status[status.upper()].value}" in document["hypervisor_console"]
    assert restart["phases"][-1]["phase"] == "aborted"


def test_a_new_hypervisor_that_hangs_in_a_call_is_stopped_by_the_preemption_timer():
    booted = boot.boot([catalog.parse("hashchain"), catalog.parse("storm")], hypervisor="hv2")
    booted.machine.run(max_instructions=REQUEST_AT)
    recorder = restart_module.request(booted, "hv1", injection="hang-call")
    assert recorder.finished and booted.hypervisor == "hv2"
    assert transfer.Status(booted.read_qword("restart_status")) == transfer.Status.CALL_FAILED
    assert booted.read_qword("restart_detail") == 52                  # VMX-preemption timer expired
    result = booted.machine.run(max_instructions=2_000_000_000)
    assert result.stop.reason == "debug-exit"
    assert [p["exit_code"] for p in booted.partitions()] == [0, 0]


def test_restarts_in_a_row_with_an_abort_between(without_restart):
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=REQUEST_AT)
    outcomes = []
    for target, injection in [("hv2", "none"), ("hv1", "digest"), ("hv1", "none"), ("hv2", "none")]:
        restart_module.request(booted, target, injection=injection)
        outcomes.append((booted.hypervisor, transfer.Status(booted.read_qword("restart_status")).name))
    assert outcomes == [("hv2", "DONE"), ("hv2", "DIGEST_MISMATCH"), ("hv1", "DONE"), ("hv2", "DONE")]
    result = booted.machine.run(max_instructions=2_000_000_000)
    assert result.stop.reason == "debug-exit"
    assert_guests_unharmed(run_module.document(booted, result, 2), without_restart)


def test_a_bad_request_is_refused():
    booted = boot.boot([catalog.parse("hashchain")], hypervisor="hv1")
    booted.machine.run(max_instructions=REQUEST_AT)
    booted.machine.ring_doorbell([transfer.REQUEST_MAGIC, transfer.PROTOCOL_VERSION, 0])   # far too short
    booted.machine.run(max_instructions=REQUEST_AT + 1_000_000)
    assert transfer.Status(booted.read_qword("restart_status")) == transfer.Status.BAD_REQUEST
    assert booted.machine.run(max_instructions=2_000_000_000).stop.reason == "debug-exit"
    assert booted.partitions()[0]["exit_code"] == 0


def test_the_same_restart_twice_is_the_same_run():
    def without_host_times(document: dict) -> dict:
        restart = dict(document["restart"])
        restart.pop("host_seconds")
        restart["phases"] = [{k: v for k, v in phase.items() if k != "host_ms"} for phase in restart["phases"]]
        restart["vps"] = [{k: v for k, v in vp.items() if k != "blackout_host_ms"} for vp in restart["vps"]]
        restart.pop("blackout_max_host_ms")
        return {**document, "restart": restart}
    assert without_host_times(restarted("hv1", "hv2")) == without_host_times(restarted("hv1", "hv2"))


def test_the_state_digest_changes_with_every_byte_and_with_what_came_before():
    start = transfer.STATE_DIGEST_START
    assert transfer.chain_digest(start, b"") != start
    one = transfer.chain_digest(start, b"abc")
    assert one != transfer.chain_digest(start, b"abd")
    assert one != transfer.chain_digest(start, b"abc\0")                # the length counts
    assert transfer.chain_digest(one, b"x") != transfer.chain_digest(start, b"x")
