"""Exercise 9: reading the hand-off: questions about a hot restart answered by code over its `hhr trace` records."""
from __future__ import annotations

from tools.lab import material, reading_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test
from tools.lab.reading_run import BLACKOUT, EVENTS, Question

NUMBER = 9
QUESTIONS = (Question(1, "inverse_calls", EVENTS), Question(2, "call_sequence", EVENTS),
             Question(3, "busiest_new_routine", BLACKOUT), Question(4, "blackout_ticks", EVENTS))


def _summary(run, rendering: str) -> dict:
    return next(record for record in run.extra["records"][rendering] if record["type"] == "summary")


def _events(run, kind: str) -> list[dict]:
    return [record for record in run.extra["records"][EVENTS] if record["type"] == "event" and record["kind"] == kind]


def _answer(run, function: str):
    answer = run.extra.get("answers", {}).get(function)
    if answer is None:
        raise Expected(f"an answer from {function}()", run.summary())
    if answer.error is not None:
        raise Expected(f"an answer from {function}()", answer.error)
    return answer.value


def _compare(run, function: str, truth, what: str) -> None:
    value = _answer(run, function)
    if value != truth:
        raise Expected(f"{what}: {truth!r} ({run.extra['scenario'].describe()})", repr(value))


def _inverse_calls(run):
    truth = sum(_summary(run, EVENTS)["inverse_calls_by_number"].values())
    _compare(run, "inverse_calls", truth, "the number of VMCALLR events")


def _call_sequence(run):
    truth = [event["data"]["call_name"] for event in sorted(_events(run, "vmcallr"), key=lambda event: event["seq"])]
    _compare(run, "call_sequence", truth, "the calls' names in the order made")


def _busiest_new_routine(run):
    header = run.extra["records"][BLACKOUT][0]
    new = next(image["label"] for image in header["images"] if image["role"] == "new")
    routines = {name: count for name, count in _summary(run, BLACKOUT)["instructions_by_routine"].items()
                if name.startswith(new + ":")}
    most = max(routines.values())
    value = _answer(run, "busiest_new_routine")
    if routines.get(value) != most:
        busiest = sorted(name for name, count in routines.items() if count == most)
        raise Expected(f"the new hypervisor's busiest routine in the blackout: {' or '.join(busiest)} ({most} "
                       f"instructions; {run.extra['scenario'].describe()})", repr(value))


def _blackout_ticks(run):
    phases = {event["data"]["phase_name"]: event["t"] for event in reversed(_events(run, "restart-phase"))
              if event["lp"] == 0}
    _compare(run, "blackout_ticks", phases["commit"] - phases["blackout"],
             "LP 0's ticks from the blackout's announcement to the commit's")


EXERCISE = Exercise(
    number=NUMBER, slug="reading", title="Reading the hand-off",
    summary="questions about a hot restart answered by code over its hhr trace records: calls, routines, phases",
    files=(reading_run.ANSWERS_FILE,),
    holes=(
        Hole(1, "Count the inverse hypercalls", "docs/machine.md 8, 9.1", """
Every VMCALLR publishes a `vmcallr` event (docs/machine.md 8.3 step 7), in the trace a record
{"type": "event", "kind": "vmcallr", ...}. Look at them first:
    hhr lab run 9      (prints the hhr trace commands for its seed)
    grep vmcallr events.jsonl"""),
        Hole(2, "List the calls in the order made", "docs/protocol.md, docs/tracing.md", """
A `vmcallr` event's data has the call number (`call`) and its name (`call_name`); the records
come in the order things happened. Which calls does a pre-copy restart make, and which of them
can repeat (docs/protocol.md, sections 3 to 6)?"""),
        Hole(3, "Find the new hypervisor's busiest routine in the blackout", "docs/tracing.md", """
An `insn` record names where it is in `sym` as "label:routine+offset" (null outside known code),
and a local label counts as its routine: "hv2:receive_records.loop+0x1c" is in
"hv2:receive_records". The header record's `images` say which label is the new hypervisor (role
"new"). Count the
instructions per routine of the new hypervisor only. Why is the busiest one busy: what is the
blackout spent on (docs/protocol.md, section 5)?"""),
        Hole(4, "Measure LP 0's blackout", "docs/machine.md 6.9, docs/tracing.md", """
LP 0 announces each phase through the restart-phase port (docs/machine.md 6.9): a `restart-phase`
event whose data names the phase (`phase_name`). The blackout lasts from LP 0's announcement of
"blackout" to its announcement of "commit"; `t` is the virtual time (ticks) of a record."""),
    ),
    tests=(
        Test("inverse-calls", 10, "E#9-1", "the number of inverse hypercalls", _inverse_calls),
        Test("call-sequence", 10, "E#9-2", "the calls in order", _call_sequence),
        Test("busiest-routine", 10, "E#9-3", "the new hypervisor's busiest routine in the blackout",
             _busiest_new_routine),
        Test("blackout-ticks", 10, "E#9-4", "LP 0's blackout in ticks", _blackout_ticks),
    ),
    mistakes=(
        Mistake("E#9-1", 'record["kind"] == "vmcallr"', 'record["kind"].startswith("vmcallr")', ("inverse-calls",),
                "the calls' returns counted as calls too"),
        Mistake("E#9-2", "for record in events\n", "for record in reversed(events)\n", ("call-sequence",),
                "the calls listed last first"),
        Mistake("E#9-3", 'image["role"] == "new"', 'image["role"] == "old"', ("busiest-routine",),
                "the old hypervisor's routines counted"),
        Mistake("E#9-4", 'begins("commit") - begins("blackout")', 'begins("devirtualize") - begins("blackout")',
                ("blackout-ticks",), "measured to the devirtualization instead of the commit"),
    ),
    prepare=material.prepare_answers,
    run=lambda exercise, directory, seed: reading_run.run(exercise, directory, seed, QUESTIONS),
)
