"""Snapshots of the whole machine: the sum of what each of its parts saves of itself, and RAM.

A snapshot is taken between runs (`Machine.run` has returned). Restoring it puts the machine back
exactly: running on from a restored snapshot gives the same events, console and statistics as
running on from the moment it was taken. A snapshot may leave RAM out (`with_ram=False`): emu/dirty.py
keeps RAM itself, page by page, for the fuzzer's many restores. The Unicorn instances are kept and their registers
restored; translated code and cached translations are dropped, so nothing from the abandoned future
survives. Contexts created after the snapshot go back to the guest pool.

Each part has `save_state()` and `restore_state(state)` and decides itself what it keeps: the
execution contexts (emu/context.py), the VMCS cache and guest pool (emu/vmcs_cache.py), the LPs
(emu/lp.py, with their VMX units and timers), the transition counters (emu/vmx_counters.py), the
PRNG (emu/prng.py), the I/O bus and its devices (emu/devices.py, emu/disk.py), the event stream
(emu/events.py) and the machine's scheduler (emu/machine.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emu.context import ContextState
    from emu.machine import Machine


@dataclass
class MachineSnapshot:
    """Everything `restore` needs; it holds copies, so the machine may run on freely."""

    ram: bytes
    contexts: dict[int, "ContextState"]   # by python id
    vmcs_cache: Any
    lps: list[Any]
    run: Any
    counters: Any
    prng: Any
    io: Any
    events: Any


def take(machine: "Machine", with_ram: bool = True) -> MachineSnapshot:
    return MachineSnapshot(
        ram=machine.ram.read(0, machine.ram.size) if with_ram else b"",
        contexts={python_id: context.save_state() for python_id, context in machine.context_by_id.items()},
        vmcs_cache=machine.vmcs_cache.save_state(),
        lps=[lp.save_state() for lp in machine.lps],
        run=machine.save_run_state(),
        counters=machine.counters.save_state(),
        prng=machine.prng.save_state(),
        io=machine.io.save_state(),
        events=machine.events.save_state(),
    )


def restore(machine: "Machine", snapshot: MachineSnapshot, with_ram: bool = True,
            flush_code: bool | frozenset[int] = True) -> None:
    """`flush_code` may name the contexts (python ids) whose translated code, block counts and trap
    points go; the others keep theirs: only for a caller that knows no byte of code they ran
    differs between now and the snapshot (emu/dirty.py)."""
    if with_ram:
        machine.ram.write(0, snapshot.ram)
    context_by_id = machine.context_by_id
    for python_id, context in context_by_id.items():
        saved = snapshot.contexts.get(python_id)
        # A pooled guest instance that runs another VMCS than at the snapshot (its name says which,
        # emu/vmcs_cache.py) ran another address space since: its block counts and trap points,
        # kept by linear address, describe that one, so its code goes whatever the caller knows.
        rebound = saved is not None and saved.name != context.name
        keep_code = flush_code is not True and python_id not in flush_code and not rebound
        context.restore_state(saved, keep_code=keep_code)
    born_after = [context for python_id, context in context_by_id.items() if python_id not in snapshot.contexts]
    machine.vmcs_cache.restore_state(snapshot.vmcs_cache, context_by_id, born_after)
    for lp, state in zip(machine.lps, snapshot.lps):
        lp.restore_state(state, machine.vmcs_cache.active, context_by_id)
    machine.restore_run_state(snapshot.run)
    machine.counters.restore_state(snapshot.counters)
    machine.prng.restore_state(snapshot.prng)
    machine.io.restore_state(snapshot.io)
    machine.events.restore_state(snapshot.events)
