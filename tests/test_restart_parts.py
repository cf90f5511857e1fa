"""The restart report's parts used alone, without the recorder: the timeline with the phase meter and
the digest check on a committed restart, and a fault hook striking the VERIFY message, seen by a
digest check subscribed before it and by one subscribed after it."""
from __future__ import annotations

from guests import catalog
from hypervisors import boot
from hypervisors.timeline import Outcome, RestartTimeline
from hypervisors.transfer import Phase, Reply, Status
from tools import digest_check, phase_meter
from tools import restart as restart_module
from tools.digest_check import DigestCheck
from tools.faults import Fault, FaultHook
from tools.phase_meter import PhaseMeter

GUESTS = ("hashchain", "counter")
REQUEST_AT = 300_000
STEP = 1_000_000
BUDGET = 200_000_000
PRECOPY_PHASES = ["requested", "service", "invariants", "precopy", "blackout", "commit", "devirtualize"]


def booted_at_request() -> boot.Booted:
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor="hv1", lps=1)
    booted.machine.run(max_instructions=REQUEST_AT)
    return booted


def run_until_over(booted: boot.Booted, timeline: RestartTimeline) -> None:
    limit = booted.machine.retired + BUDGET
    while not timeline.over and booted.machine.retired < limit:
        booted.machine.run(max_instructions=booted.machine.retired + STEP)
    assert timeline.over, "the restart did not end within the budget"


def test_the_phase_meter_and_the_digest_check_without_the_recorder():
    booted = booted_at_request()
    events = booted.machine.events
    timeline = RestartTimeline()
    meter, check = PhaseMeter(booted, timeline), DigestCheck(booted)
    calls = []
    events.subscribe(calls.append, frozenset({"vmcallr"}))
    events.subscribe(meter.on_event, phase_meter.EVENT_KINDS)
    events.subscribe(check.on_event, digest_check.EVENT_KINDS)
    timeline.subscribe(meter.on_transition)
    timeline.follow(events)
    restart_module.stage(booted, "hv2")
    run_until_over(booted, timeline)
    assert timeline.ending.outcome == Outcome.COMMITTED
    rows = meter.phases()
    assert [row["phase"] for row in rows] == PRECOPY_PHASES
    assert sum(row["inverse_calls"] for row in rows) == meter.inverse_calls == len(calls)
    assert [row["virtual_start"] for row in rows] == [t.time for t in timeline.transitions[:-1]]
    assert check.agrees is True
    assert check.records_by_type["partition"] >= len(GUESTS) and check.records_by_type["vp"] >= len(GUESTS)


def test_a_digest_check_subscribed_after_a_fault_reads_the_corrupted_message():
    """`verify:corrupt` flips the last byte of the VERIFY message, the chain's: the check that reads
    it first agrees with the old hypervisor, the one after the fault does not, and the new hypervisor
    refuses the digest, so the timeline ends the restart aborted with that reason."""
    booted = booted_at_request()
    events = booted.machine.events
    timeline = RestartTimeline(status=lambda: (booted.restart_status, booted.restart_detail))
    before, after = DigestCheck(booted), DigestCheck(booted)
    hook = FaultHook(Fault.parse("verify:corrupt"), booted, timeline, "hv2")
    events.subscribe(before.on_event, digest_check.EVENT_KINDS)
    events.subscribe(hook.on_event, FaultHook.EVENT_KINDS)
    events.subscribe(after.on_event, digest_check.EVENT_KINDS)
    timeline.follow(events)
    restart_module.stage(booted, "hv2")
    run_until_over(booted, timeline)
    assert hook.fault.struck
    assert before.agrees is True and after.agrees is False
    assert before.chain == after.chain, "the chained messages before VERIFY were not touched"
    ending = timeline.ending
    assert ending.outcome == Outcome.ABORTED and timeline.aborted and not timeline.past_commit
    assert (ending.status, ending.detail) == (Status.REFUSED, Reply.DIGEST)
    assert [t.phase for t in timeline.transitions][-2:] == [Phase.ABORTED, Phase.IDLE]
