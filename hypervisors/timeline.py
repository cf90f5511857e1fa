"""The restart timeline: the machine's event stream turned into typed phase transitions, the one place that says which restart phase is current and when a restart is over."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from emu.events import Event, EventKind
from hypervisors.transfer import Mode, Phase, Status

FOLLOWED_KINDS = frozenset({EventKind.RESTART_PHASE.value})
# An LP's own events that move it between phases after the commit (`LpPhases`).
LP_FOLLOWED_KINDS = frozenset({EventKind.CR3_WRITE.value, EventKind.VMXOFF.value, EventKind.VM_ENTRY.value,
                               EventKind.HLT.value})
# An LP's devirtualization (docs/protocol.md 6): MOV to CR3 (the new page tables), VMXOFF, the jump.
DEVIRTUALIZATION_KINDS = frozenset({EventKind.CR3_WRITE.value, EventKind.VMXOFF.value})
# Announced phases that other LPs enter by their own events, not at LP 0's announcement.
HAND_OFF_PHASES = frozenset({Phase.COMMIT, Phase.DEVIRTUALIZE, Phase.RESUMED})
# A post-copy's phases after its commit (docs/protocol.md, Post-copy): the restart is over at RESUMED,
# as every committed one; these follow it, and begin no restart of their own.
DRAIN_PHASES = frozenset({Phase.POSTCOPY, Phase.DRAINED, Phase.DRAIN_FAILED})
DRAIN_ENDS = frozenset({Phase.DRAINED, Phase.DRAIN_FAILED})


class Outcome(enum.Enum):
    """How a restart ended."""

    COMMITTED = "committed"             # RESUMED: the new hypervisor runs the guests (after a suspend: resumed)
    ABORTED = "aborted"                 # the old hypervisor is still in charge (or a resume refused the image)


@dataclass(frozen=True)
class Ending:
    """The end of a restart: its outcome, and for an abort the status and detail the hypervisor posted
    (None when the timeline was given no way to read them)."""

    outcome: Outcome
    status: Status | None = None
    detail: int | None = None


@dataclass(frozen=True)
class Transition:
    """One restart-phase change, on the clock of the LP that wrote it."""

    value: int                          # what the hypervisor wrote to the restart-phase port
    phase: Phase | None                 # that value as a phase (None: no phase has that number)
    previous: Phase | None
    time: int
    lp: int
    restart: int                        # which restart of the machine's (1, 2, ...); 0 outside one
    mode: Mode | None                   # as the operator's request asked (None: not told)
    begins: bool                        # the first phase of a restart
    ending: Ending | None               # set on the transition that ends the restart

    @property
    def ongoing(self) -> bool:
        """A restart goes on after this transition (False at its end, and at IDLE outside one)."""
        return self.restart != 0 and self.ending is None

    @property
    def name(self) -> str:
        """The phase's name (`phase N` for a number no phase has)."""
        return self.phase.name if self.phase is not None else f"phase {self.value}"


@dataclass(frozen=True)
class LpTransition:
    """One LP entering a phase: at an announcement (`own` False: the time is the announcer's clock)
    or at an event of its own (`own` True: the time is this LP's clock, and the event comes causally
    after the announcement it follows)."""

    lp: int
    phase: Phase | None
    previous: Phase | None
    time: int
    own: bool
    restart: int


StatusReader = Callable[[], tuple[int, int]]     # (restart_status, restart_detail) of the hypervisor in charge
TransitionListener = Callable[[Transition], None]
LpTransitionListener = Callable[[LpTransition], None]


def ends_restart(phase: Phase | None, resuming: bool) -> Outcome | None:
    """When a restart is over (docs/protocol.md): RESUMED commits it; after an abort (ABORTED, then
    IDLE once the LPs are back with their guests) the old hypervisor is in charge again; a resume
    that refuses the image (ABORTED once RESUMING was seen) powers the machine off."""
    if phase == Phase.RESUMED:
        return Outcome.COMMITTED
    if phase == Phase.IDLE or (phase == Phase.ABORTED and resuming):
        return Outcome.ABORTED
    return None


class RestartTimeline:
    """Follows restart-phase events (`on_event`, or `follow` an event stream) and tells its listeners
    each transition, in the order they subscribed. Also readable at any time: the current phase, the
    restart in progress, whether it is over and how it ended."""

    def __init__(self, *, phase: int = Phase.IDLE, mode: Mode | None = None, status: StatusReader | None = None):
        """`phase`: the machine's restart-phase port now (a timeline started mid-restart, from a
        checkpoint, knows a restart is under way); `mode`: what the operator requested (the doorbell
        event carries only the request's length); `status`: reads why a restart aborted."""
        self.value = int(phase)
        self.mode = mode
        self.status = status
        self.restarts = 0
        self.in_restart = self.value != Phase.IDLE
        if self.in_restart:
            self.restarts = 1
        self.aborted = False                # an ABORTED was seen in the restart in progress (or the last)
        self.past_commit = False            # DEVIRTUALIZE was seen: the restart can no longer abort
        self.resuming = self.phase == Phase.RESUMING   # a hypervisor booted to resume reads the suspend image
        self.draining = self.phase == Phase.POSTCOPY    # a committed post-copy still pulls the windows
        self.ending: Ending | None = None   # how the last restart ended (None while one runs or none has)
        self.transitions: list[Transition] = []
        self._listeners: list[TransitionListener] = []
        self.lps = LpPhases(self.value)     # the phase each LP is in (read every event: `on_event`)

    @property
    def phase(self) -> Phase | None:
        return _phase(self.value)

    @property
    def over(self) -> bool:
        """The last restart that began has ended (False before any began)."""
        return self.ending is not None

    @property
    def committed(self) -> bool:
        """The last restart that began has ended with the new hypervisor running the guests."""
        return self.ending is not None and self.ending.outcome == Outcome.COMMITTED

    def subscribe(self, listener: TransitionListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: TransitionListener) -> None:
        self._listeners.remove(listener)

    def follow(self, events) -> None:
        """Subscribe to an event stream (emu/events.py) for the kinds the timeline reads."""
        events.subscribe(self.on_event, FOLLOWED_KINDS)

    def leave(self, events) -> None:
        events.unsubscribe(self.on_event)

    def lp_phase(self, lp: int) -> Phase | None:
        """The phase LP `lp` is in (`LpPhases`); the same as `phase` outside the hand-off."""
        return self.lps.phase(lp)

    def lp_value(self, lp: int) -> int:
        return self.lps.value(lp)

    def on_event(self, event: Event) -> None:
        """A restart-phase event moves the timeline; an LP's MOV to CR3, VMXOFF, VM entry or HLT only
        that LP's phase (`LpPhases`), for a reader that is given every event, as the trace session and
        the Chrome writer are: `follow` subscribes to restart-phase events only."""
        if event.kind == EventKind.RESTART_PHASE:
            self._transition(event.data["phase"], event.time, event.lp)
        elif event.kind in LP_FOLLOWED_KINDS:
            self.lps.on_event(event)

    __call__ = on_event

    def _transition(self, value: int, time: int, lp: int) -> None:
        phase, previous = _phase(value), self.phase
        begins = phase != Phase.IDLE and phase not in DRAIN_PHASES and not self.in_restart
        if phase in DRAIN_PHASES:
            self.draining = phase not in DRAIN_ENDS
        if begins:
            self.restarts += 1
            self.in_restart, self.aborted, self.past_commit, self.resuming, self.ending = True, False, False, False, None
        if phase == Phase.ABORTED:
            self.aborted = True
        elif phase == Phase.DEVIRTUALIZE:
            self.past_commit = True
        elif phase == Phase.RESUMING:
            self.resuming = True
        outcome = ends_restart(phase, self.resuming) if self.in_restart else None
        ending = None
        if outcome is not None:
            ending = self._ending(outcome)
            self.in_restart, self.ending = False, ending
        self.value = value
        restart = self.restarts if self.in_restart or ending is not None or phase in DRAIN_PHASES else 0
        transition = Transition(value, phase, previous, time, lp, restart, self.mode, begins, ending)
        self.transitions.append(transition)
        self.lps.announce(transition)
        for listener in tuple(self._listeners):
            listener(transition)

    def _ending(self, outcome: Outcome) -> Ending:
        if outcome == Outcome.COMMITTED:
            return Ending(outcome, Status.DONE)
        if self.status is None:
            return Ending(outcome)
        status, detail = self.status()
        try:
            return Ending(outcome, Status(status), detail)
        except ValueError:
            return Ending(outcome, None, detail)


class LpPhases:
    """The phase each LP is in, for labelling what an LP does (docs/tracing.md, "Phases per LP").
    An announcement applies to every LP at once, except during the hand-off, where each LP is
    moved by its own events, which come after the announcement they follow (an LP leaves the
    rendezvous only when LP 0 has committed; docs/protocol.md 6):

    - COMMIT and DEVIRTUALIZE (announced): the announcer enters them; every other LP stays in
      BLACKOUT, waiting at the rendezvous;
    - an LP's first step of devirtualization once COMMIT is announced (its MOV to CR3, or its VMXOFF:
      an LP waiting at the rendezvous runs no guest, so its first CR3 write is the one to the new
      page tables): that LP enters DEVIRTUALIZE;
    - RESUMED (announced): the announcer enters it; an LP that has devirtualized enters it at its
      first VM entry or HLT (an LP with no guest to run) after the announcement.
    Any other announcement (an abort included) moves every LP at once."""

    def __init__(self, value: int):
        self.values: dict[int, int] = {}    # LP: its phase (an LP not seen yet is in `default`)
        self.default = value
        self.announced = value
        self.committed = False              # COMMIT was announced in the restart in progress
        self.restart = 0
        self.devirtualized: set[int] = set()
        self.transitions: list[LpTransition] = []
        self._listeners: list[LpTransitionListener] = []

    def value(self, lp: int) -> int:
        return self.values.get(lp, self.default)

    def phase(self, lp: int) -> Phase | None:
        return _phase(self.value(lp))

    def subscribe(self, listener: LpTransitionListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: LpTransitionListener) -> None:
        self._listeners.remove(listener)

    def announce(self, transition: Transition) -> None:
        """LP `transition.lp` wrote a phase: it is in it; the others as the rules above say."""
        value, phase, time = transition.value, transition.phase, transition.time
        self.announced, self.restart = value, transition.restart or self.restart
        self.values.setdefault(transition.lp, self.default)
        if phase == Phase.COMMIT:
            self.committed = True
        if phase not in HAND_OFF_PHASES or not self.committed:   # RESUMED after a resume from disk: all at once
            self.committed = False
            self.devirtualized.clear()
            self.default = value
            for lp in sorted(self.values):
                self._enter(lp, value, time, own=False)
            return
        self._enter(transition.lp, value, time, own=False)
        if phase == Phase.DEVIRTUALIZE:
            self.devirtualized.add(transition.lp)

    def on_event(self, event: Event) -> None:
        """An LP's own event after the commit (MOV to CR3, VMXOFF, VM entry, HLT)."""
        if not self.committed:
            return
        lp, kind = event.lp, event.kind
        if kind in DEVIRTUALIZATION_KINDS and lp not in self.devirtualized:
            self.devirtualized.add(lp)
            self._enter(lp, Phase.DEVIRTUALIZE, event.time, own=True)
        elif kind in (EventKind.VM_ENTRY, EventKind.HLT) and self.announced == Phase.RESUMED \
                and lp in self.devirtualized and self.value(lp) != Phase.RESUMED:
            self._enter(lp, Phase.RESUMED, event.time, own=True)

    def _enter(self, lp: int, value: int, time: int, *, own: bool) -> None:
        previous = self.values.setdefault(lp, self.default)
        if value == previous:
            return
        self.values[lp] = value
        transition = LpTransition(lp, _phase(value), _phase(previous), time, own, self.restart)
        self.transitions.append(transition)
        for listener in tuple(self._listeners):
            listener(transition)


def _phase(value: int) -> Phase | None:
    try:
        return Phase(value)
    except ValueError:
        return None
