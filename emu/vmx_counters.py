"""What the machine counts of VM transitions, for statistics and measurements: exits by reason, inverse hypercalls by
call number, each VMCS's latest exit, the latest failed VM entry."""
from __future__ import annotations

import collections
from typing import Any


class VmxCounters:
    """Counts kept across every LP; none of them changes what the machine does."""

    def __init__(self):
        self.exit_counts: collections.Counter[int] = collections.Counter()
        self.inverse_call_counts: collections.Counter[int] = collections.Counter()
        self.last_exits: dict[int, int] = {}   # VMCS address: LP time of its latest VM exit
        self.last_entry_failure = None         # the EntryCheckFailure of the latest failed VM entry

    def count_exit(self, reason: int) -> None:
        self.exit_counts[reason] += 1

    def count_inverse_call(self, call: int) -> None:
        self.inverse_call_counts[call] += 1

    def save_state(self) -> dict[str, Any]:
        return {"exit_counts": collections.Counter(self.exit_counts),
                "inverse_call_counts": collections.Counter(self.inverse_call_counts),
                "last_exits": dict(self.last_exits), "last_entry_failure": self.last_entry_failure}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.exit_counts = collections.Counter(state["exit_counts"])
        self.inverse_call_counts = collections.Counter(state["inverse_call_counts"])
        self.last_exits = dict(state["last_exits"])
        self.last_entry_failure = state["last_entry_failure"]
