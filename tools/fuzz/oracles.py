"""What counts as a finding: its kinds, and the judgements that compare a run with the reference."""
from __future__ import annotations

from dataclasses import dataclass

# Each kind is a separate oracle (docs/fuzzing.md).
EXCEPTION = "exception"              # a Python exception out of the machine
GUEST_OUTPUT = "guest-output"        # a state accepted, and a guest then computes something else
HANG = "hang"                        # the transfer did not end within the instruction budget
FOREIGN_WRITE = "foreign-write"      # the new hypervisor's call wrote outside its service region
LOST_GUEST_STATE = "lost-guest-state"  # an abort left a guest's state other than it was
DIGEST_ACCEPTED = "digest-accepted"  # a message changed in flight, its digest not fixed, and yet committed
KINDS = (EXCEPTION, GUEST_OUTPUT, HANG, FOREIGN_WRITE, LOST_GUEST_STATE, DIGEST_ACCEPTED)

# Guests whose console names times or interleavings: only their outcome is compared.
TIMING_DEPENDENT = {"heartbeat", "timer", "hello"}


@dataclass
class Finding:
    kind: str
    description: str                 # one line


# After a post-copy's commit, a window that does not add up, or an old side whose code fails, stops the
# partitions whose windows had not come whole, with this stop reason, and no other (docs/protocol.md,
# Post-copy): the damage the protocol promises to contain, which the receiver can only see then.
POSTCOPY_STOP_REASON = "post-copy failed"


def guest_differences(reports: list[dict], reference: list[dict], contained: frozenset[str] = frozenset(),
                      excused: frozenset[int] = frozenset()) -> list[str]:
    """How each guest's end differs from the reference run without a restart (empty: the same); a
    guest stopped by a stop reason in `contained`, or stopped and among the guests `excused` (by their
    place in the boot order), differs by design."""
    differences = []
    for number, (guest, expected) in enumerate(zip(reports, reference)):
        if guest["state"] == "stopped" and (guest["stop_reason"] in contained or number in excused):
            continue
        for key in ("state", "exit_code", "stop_reason"):
            if guest[key] != expected[key]:
                differences.append(f"{guest['name']}: {key} {guest[key]!r}, reference {expected[key]!r}")
        if guest["name"] not in TIMING_DEPENDENT and guest["console"] != expected["console"]:
            differences.append(f"{guest['name']}: console differs")
    return differences
