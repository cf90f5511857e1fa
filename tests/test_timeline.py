"""The restart timeline (hypervisors/timeline.py): phase transitions read from a recorded event stream, a
committed restart, an aborted one, a suspend and its resume, a timeline started mid-restart, and the
phase each LP is in during the hand-off (`LpPhases`)."""
from __future__ import annotations

import pytest

from emu.events import Event, EventKind
from guests import catalog
from hypervisors import boot
from hypervisors.timeline import LpTransition, Outcome, RestartTimeline, Transition
from hypervisors.transfer import Mode, Phase, Status
from tools import restart as restart_module

REFUSAL_DETAIL = 7


def phase_events(*phases: int, lp: int = 0, start: int = 1_000, step: int = 100) -> list[Event]:
    """restart-phase events as the machine publishes them, each after a VM exit (which the timeline
    does not read)."""
    events, seq = [], 0
    for number, phase in enumerate(phases):
        time = start + number * step
        events.append(Event(seq, time - 1, lp, EventKind.VM_EXIT.value, {"vmcs": 0x1000, "reason": 12,
                                                                          "qualification": 0, "rip": 0}))
        events.append(Event(seq + 1, time, lp, EventKind.RESTART_PHASE.value, {"phase": int(phase)}))
        seq += 2
    return events


def follow(events: list[Event], timeline: RestartTimeline | None = None) -> tuple[RestartTimeline, list[Transition]]:
    timeline = timeline or RestartTimeline()
    seen: list[Transition] = []
    timeline.subscribe(seen.append)
    for event in events:
        timeline.on_event(event)
    return timeline, seen


def test_a_committed_restart_recorded_from_the_machine():
    """A real hot restart's event stream, recorded and read again by a fresh timeline: the phases in
    protocol order, one beginning, one ending (committed), the recorder's own timeline the same."""
    booted = boot.boot([catalog.parse("hashchain"), catalog.parse("counter")], hypervisor="hv1", lps=1)
    booted.machine.run(max_instructions=300_000)
    recorded: list[Event] = []
    booted.machine.events.subscribe(recorded.append)
    recorder = restart_module.request(booted, "hv2", check_memory=False)
    booted.machine.events.unsubscribe(recorded.append)
    assert recorder.finished and recorder.committed and booted.hypervisor == "hv2"

    timeline, seen = follow(recorded, RestartTimeline(mode=Mode.PRECOPY))
    assert [t.phase for t in seen] == [Phase.REQUESTED, Phase.SERVICE, Phase.INVARIANTS, Phase.PRECOPY,
                                       Phase.BLACKOUT, Phase.COMMIT, Phase.DEVIRTUALIZE, Phase.RESUMED]
    assert [t.begins for t in seen] == [True] + [False] * 7
    assert all(t.ending is None and t.ongoing for t in seen[:-1]) and not seen[-1].ongoing
    assert seen[-1].ending.outcome == Outcome.COMMITTED and seen[-1].ending.status == Status.DONE
    assert [t.previous for t in seen[1:]] == [t.phase for t in seen[:-1]]
    assert all(t.restart == 1 and t.mode == Mode.PRECOPY for t in seen)
    assert timeline.over and timeline.past_commit and not timeline.aborted
    phase_times = [event.time for event in recorded if event.kind == EventKind.RESTART_PHASE]
    assert [t.time for t in seen] == phase_times
    assert recorder.timeline.transitions == seen
    assert [mark.virtual_time for mark in recorder.marks] == phase_times


def test_an_aborted_restart_ends_at_idle_with_the_reason():
    reads = []

    def status() -> tuple[int, int]:
        reads.append(True)
        return int(Status.REFUSED), REFUSAL_DETAIL

    timeline = RestartTimeline(status=status)
    _, seen = follow(phase_events(Phase.REQUESTED, Phase.SERVICE, Phase.INVARIANTS, Phase.ABORTED), timeline)
    assert timeline.aborted and not timeline.over and seen[-1].ending is None, "the LPs are not back yet"
    assert not reads
    _, more = follow(phase_events(Phase.IDLE, start=5_000), timeline)
    ending = more[-1].ending
    assert ending is not None and ending.outcome == Outcome.ABORTED
    assert (ending.status, ending.detail) == (Status.REFUSED, REFUSAL_DETAIL) and len(reads) == 1
    assert timeline.over and timeline.ending == ending and not timeline.past_commit
    # The next request is a second restart: the abort is forgotten.
    follow(phase_events(Phase.REQUESTED, start=9_000), timeline)
    assert timeline.transitions[-1].begins and timeline.transitions[-1].restart == 2
    assert not timeline.over and not timeline.aborted and timeline.ending is None


def test_a_suspend_is_not_over_until_the_resume_and_a_refused_resume_ends_it():
    timeline, seen = follow(phase_events(Phase.REQUESTED, Phase.INVARIANTS, Phase.BLACKOUT, Phase.SUSPENDING,
                                         Phase.SUSPENDED), RestartTimeline(mode=Mode.SUSPEND))
    assert not timeline.over and timeline.phase == Phase.SUSPENDED, "the machine powers off, the restart goes on"
    follow(phase_events(Phase.RESUMING, Phase.RESUMED, start=50), timeline)    # the reset machine's clock
    assert timeline.over and timeline.ending.outcome == Outcome.COMMITTED and timeline.restarts == 1
    assert all(t.mode == Mode.SUSPEND for t in timeline.transitions)

    refused, _ = follow(phase_events(Phase.REQUESTED, Phase.SUSPENDING, Phase.SUSPENDED))
    follow(phase_events(Phase.RESUMING, Phase.ABORTED, start=50), refused)
    assert refused.over and refused.ending.outcome == Outcome.ABORTED, "a refused resume stops the machine"
    assert refused.ending.status is None, "no status reader was given"


def test_a_timeline_started_mid_restart_and_an_unknown_phase():
    timeline, seen = follow(phase_events(Phase.BLACKOUT, 99, Phase.COMMIT), RestartTimeline(phase=Phase.PRECOPY))
    assert timeline.restarts == 1 and not any(t.begins for t in seen), "a checkpoint's restart is under way"
    assert seen[1].phase is None and seen[1].name == "phase 99" and seen[2].previous is None
    assert RestartTimeline().phase == Phase.IDLE and not RestartTimeline().over
    idle, seen = follow(phase_events(Phase.IDLE))
    assert not idle.over and seen[0].ending is None and seen[0].restart == 0, "IDLE outside a restart ends nothing"
    assert not seen[0].ongoing


def lp_event(seq: int, time: int, lp: int, kind: EventKind, **data) -> Event:
    return Event(seq, time, lp, kind.value, data)


def handoff_events(*, vmxoff_before_announcement: bool) -> list[Event]:
    """A two-LP hand-off as the machine publishes it: LP 0 announces each phase; LP 1's clock is
    behind LP 0's (an LP's clock is its own), and its devirtualization comes after LP 0's COMMIT in
    the machine's order, before or after LP 0's DEVIRTUALIZE."""
    lp1_devirtualizes = [lp_event(0, 5_550_141, 1, EventKind.CR3_WRITE, old=0x1000, new=0x2000, rip=0, context="lp1"),
                         lp_event(0, 5_550_142, 1, EventKind.VMXOFF),
                         lp_event(0, 5_550_175, 1, EventKind.VMXON, region=0x3000, ok=True)]
    events = [lp_event(0, 5_400_000, 0, EventKind.RESTART_PHASE, phase=Phase.BLACKOUT),
              lp_event(0, 5_380_000, 1, EventKind.VMCLEAR, vmcs=0x4000),
              lp_event(0, 5_380_100, 1, EventKind.HLT),                      # waiting at the rendezvous
              lp_event(0, 5_569_000, 0, EventKind.RESTART_PHASE, phase=Phase.COMMIT)]
    announced = [lp_event(0, 5_569_870, 0, EventKind.RESTART_PHASE, phase=Phase.DEVIRTUALIZE),
                 lp_event(0, 5_569_877, 0, EventKind.CR3_WRITE, old=0x1000, new=0x2000, rip=0, context="lp0"),
                 lp_event(0, 5_569_878, 0, EventKind.VMXOFF)]
    events += lp1_devirtualizes + announced if vmxoff_before_announcement else announced + lp1_devirtualizes
    events += [lp_event(0, 5_600_000, 1, EventKind.HLT),                     # waits for RESUMED: still devirtualizing
               lp_event(0, 5_620_000, 0, EventKind.RESTART_PHASE, phase=Phase.RESUMED),
               lp_event(0, 5_620_100, 0, EventKind.VM_ENTRY, vmcs=0x5000, launch=True, rip=0),
               lp_event(0, 5_610_000, 1, EventKind.VM_ENTRY, vmcs=0x6000, launch=True, rip=0)]
    return [Event(seq, event.time, event.lp, event.kind, event.data) for seq, event in enumerate(events)]


@pytest.mark.parametrize("vmxoff_before_announcement", [True, False], ids=["vmxoff-first", "announcement-first"])
def test_each_lp_enters_devirtualize_at_its_own_first_step_and_resumed_at_its_first_entry(vmxoff_before_announcement):
    timeline = RestartTimeline(phase=Phase.PRECOPY)
    entered: list[LpTransition] = []
    timeline.lps.subscribe(entered.append)
    labels = []
    for event in handoff_events(vmxoff_before_announcement=vmxoff_before_announcement):
        timeline.on_event(event)
        labels.append((event.lp, event.kind, event.time, timeline.lp_phase(event.lp)))
    lp1 = [(kind, phase) for lp, kind, _, phase in labels if lp == 1]
    assert lp1 == [("vmclear", Phase.BLACKOUT), ("hlt", Phase.BLACKOUT),
                   ("cr3-write", Phase.DEVIRTUALIZE), ("vmxoff", Phase.DEVIRTUALIZE), ("vmxon", Phase.DEVIRTUALIZE),
                   ("hlt", Phase.DEVIRTUALIZE), ("vm-entry", Phase.RESUMED)]
    lp0 = [(kind, phase) for lp, kind, _, phase in labels if lp == 0]
    assert lp0 == [("restart-phase", Phase.BLACKOUT), ("restart-phase", Phase.COMMIT),
                   ("restart-phase", Phase.DEVIRTUALIZE), ("cr3-write", Phase.DEVIRTUALIZE),
                   ("vmxoff", Phase.DEVIRTUALIZE), ("restart-phase", Phase.RESUMED), ("vm-entry", Phase.RESUMED)]
    own = [(t.lp, t.previous, t.phase, t.time) for t in entered if t.own]
    assert own == [(1, Phase.BLACKOUT, Phase.DEVIRTUALIZE, 5_550_141), (1, Phase.DEVIRTUALIZE, Phase.RESUMED, 5_610_000)]
    assert all(t.restart == 1 for t in entered)
    assert timeline.phase == Phase.RESUMED and timeline.over


def test_outside_the_hand_off_every_lp_follows_the_announcement_at_once():
    """An abort, a suspend's resume (RESUMED with no commit): no LP lags; before the commit an LP's
    VMXOFF (none happens, but a CR3 write does: guests switch page tables) moves nothing."""
    timeline = RestartTimeline()
    events = phase_events(Phase.REQUESTED, Phase.BLACKOUT, Phase.ABORTED)
    events.append(lp_event(99, 1_500, 1, EventKind.CR3_WRITE, old=0, new=0x1000, rip=0, context="vmcs@0x1000"))
    follow(events, timeline)
    assert timeline.lp_phase(0) == timeline.lp_phase(1) == Phase.ABORTED
    follow(phase_events(Phase.RESUMING, Phase.RESUMED, start=50), timeline)
    assert timeline.lp_phase(0) == timeline.lp_phase(1) == timeline.lp_phase(7) == Phase.RESUMED
    assert not any(t.own for t in timeline.lps.transitions)


def test_the_lps_of_a_recorded_two_lp_restart_devirtualize_after_the_commit():
    """A real hand-off on two LPs: each LP enters DEVIRTUALIZE once (by its own event, or LP 0 by its
    announcement), after the COMMIT in the machine's order, then RESUMED."""
    booted = boot.boot([catalog.parse("hashchain"), catalog.parse("timer")], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=300_000)
    recorded: list[Event] = []
    booted.machine.events.subscribe(recorded.append)
    recorder = restart_module.request(booted, "hv2", check_memory=False)
    booted.machine.run(max_instructions=booted.machine.retired + 100_000)
    booted.machine.events.unsubscribe(recorded.append)
    assert recorder.committed
    timeline, _ = follow(recorded)
    for lp in (0, 1):
        entries = [t for t in timeline.lps.transitions if t.lp == lp and t.phase in (Phase.DEVIRTUALIZE, Phase.RESUMED)]
        assert [t.phase for t in entries] == [Phase.DEVIRTUALIZE, Phase.RESUMED], lp
        assert all(t.own for t in entries) == (lp == 1)
        vmxoff = next(event for event in recorded if event.lp == lp and event.kind == EventKind.VMXOFF)
        commit = next(event for event in recorded if event.kind == EventKind.RESTART_PHASE
                      and event.data["phase"] == Phase.COMMIT)
        assert vmxoff.seq > commit.seq and entries[0].time <= vmxoff.time
        assert timeline.lp_phase(lp) == Phase.RESUMED
