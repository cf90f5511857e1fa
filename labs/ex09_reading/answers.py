"""Exercise 9: reading the hand-off (docs/labs/09-reading.md).

Each function gets the JSON Lines records of one hot restart's trace (docs/tracing.md, schema
`hhr-trace` version 1) as a list of dicts, and returns the answer to one question. `hhr lab run 9`
prints the `hhr trace` commands that make the same records, so you can look at them first. The
grader asks your functions about a hand-off of its own choosing, so an answer must be computed.
"""
from tools.lab.holes import HOLE


def inverse_calls(events):
    """How many inverse hypercalls (VMCALLR) the old hypervisor made in the whole hand-off: an int.
    `events`: every event record of the hand-off (`hhr trace --events-only --format jsonl`)."""
    HOLE(9, 1)


def call_sequence(events):
    """The names of those calls, in the order they were made: a list of str, e.g. ["invariants", ...]."""
    HOLE(9, 2)


def busiest_new_routine(blackout):
    """The routine of the *new* hypervisor that executed the most instructions in the blackout, as
    the trace names it without offset: a str such as "hv2:receive_vp".
    `blackout`: every record of the blackout phase (`hhr trace --phase blackout --format jsonl`)."""
    HOLE(9, 3)


def blackout_ticks(events):
    """How long LP 0 spent in the blackout phase, in virtual ticks: from LP 0's `restart-phase` event
    that begins the blackout to its `restart-phase` event that begins the commit. An int."""
    HOLE(9, 4)
