"""Whole-machine snapshots: pausing at an instruction limit and going on changes nothing, and a restored
snapshot runs on exactly as the machine did when it was taken (two LPs, timers, IPIs, a guest)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from emu import snapshot as snapshot_module
from emu.machine import Machine
from tests.machine_programs import (
    QUANTUM, cpuid_guest_with_interrupts, event_tuples, guest_and_timer_program, root_timers_program, run_root,
)

PAUSE_FRACTIONS = (0.03, 0.5, 0.97)    # where in the reference run the machine pauses
PROGRAMS = {
    "root timers and IPIs": lambda machine: root_timers_program(),
    "guest with interrupt exits": guest_and_timer_program,
    "guest with C transitions": cpuid_guest_with_interrupts,
}


def observed(machine: Machine, result) -> tuple:
    return event_tuples(machine), dict(machine.io.console.channels), result, machine.statistics()


def new_machine() -> Machine:
    return Machine(lps=2, quantum=QUANTUM, record_events=True)


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("fraction", PAUSE_FRACTIONS)
def test_pause_and_restore_give_the_uninterrupted_run(name, fraction):
    reference = new_machine()
    reference_result = run_root(reference, PROGRAMS[name](reference))
    expected = observed(reference, reference_result)

    machine = new_machine()
    paused = run_root(machine, PROGRAMS[name](machine), max_instructions=int(reference_result.instructions * fraction))
    assert paused.stop.reason == "instruction-limit"
    snapshot = machine.snapshot()
    assert observed(machine, machine.run()) == expected           # going on after a pause

    machine.restore(snapshot)
    assert observed(machine, machine.run()) == expected           # going on from the snapshot


def test_restore_after_guest_instances_were_created():
    """A snapshot from before the first VMLAUNCH: the guest instance made later goes back to the pool
    and the run from the snapshot is the same again."""
    machine = new_machine()
    run_root(machine, guest_and_timer_program(machine), max_instructions=50)
    snapshot = machine.snapshot()
    assert all(vmcs.context is None for vmcs in machine.active_vmcs.values())
    first = observed(machine, machine.run())
    assert any(vmcs.context is not None for vmcs in machine.active_vmcs.values())
    machine.restore(snapshot)
    assert all(vmcs.context is None for vmcs in machine.active_vmcs.values())
    assert observed(machine, machine.run()) == first


def test_a_snapshot_reads_no_private_field_of_the_parts():
    """emu/snapshot.py is the sum of what each part saves of itself (save_state/restore_state): it
    reads no private field of any part, so a new piece of state is saved by the part that holds it."""
    tree = ast.parse(Path(snapshot_module.__file__).read_text())
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")})
    assert private == []
