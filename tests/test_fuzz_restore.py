"""The fuzzer's checkpoints stay true after the guests ran on under the new hypervisor: a pooled guest instance that runs another VMCS than at the checkpoint does not keep translated code described by the other address space (emu/snapshot.py)."""
from __future__ import annotations

from tools.fuzz.executor import Setup, TransferMachine
from tools.fuzz.inputs import FuzzInput


def test_an_input_after_the_guests_ran_to_their_end_under_the_new_hypervisor_commits_as_before():
    machine = TransferMachine(Setup(from_hv="hv2", to_hv="hv1"))
    unchanged = FuzzInput("messages", 2, fix_digest=True)
    first = machine.execute(unchanged)
    assert first.outcome == "committed" and first.finding is None
    assert machine.run_guests_to_end("hv1") == []
    again = machine.execute(unchanged)   # restored from the same checkpoint: the same restart
    assert again.outcome == "committed" and again.finding is None
    assert machine.run_guests_to_end("hv1") == []
