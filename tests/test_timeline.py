"""The restart timeline (hypervisors/timeline.py): phase transitions read from a recorded event stream, a
committed restart, an aborted one, a suspend and its resume, a timeline started mid-restart."""
from __future__ import annotations

from emu.events import Event, EventKind
from guests import catalog
from hypervisors import boot
from hypervisors.timeline import Outcome, RestartTimeline, Transition
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
