"""Snapshots of the whole machine: RAM, every processor context, the VMCS cache, devices and counters.

A snapshot is taken between runs (`Machine.run` has returned). Restoring it puts the machine back
exactly: running on from a restored snapshot gives the same events, console and statistics as
running on from the moment it was taken. A snapshot may leave RAM out (`with_ram=False`): emu/dirty.py
keeps RAM itself, page by page, for the fuzzer's many restores. The Unicorn instances are kept and their registers
restored; translated code and cached translations are dropped, so nothing from the abandoned future
survives. Contexts created after the snapshot go back to the guest pool.
"""
from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emu import fast
from emu.vmcs import ActiveVmcs

if TYPE_CHECKING:
    from emu.machine import Machine

# The C per-context fields that are machine state (the rest is scratch of a single run).
_CONTEXT_FIELDS = ("retired", "mode", "eptp")
# The C per-VMCS flags (emu/fastpath.h, hhr_vmcs).
_VMCS_FLAGS = ("launched", "entry_verified", "inverse_call", "halted", "checked_field_written", "live_written")


@dataclass
class ContextState:
    registers: Any
    fields: dict[str, int]
    exit_points: frozenset[int]
    name: str
    shared_lp: int | None = None          # the LP whose shared state it takes part in
    held: tuple[int, ...] = ()            # the generation of each shared class its copy holds


@dataclass
class VmcsState:
    address: int
    values: bytes
    flags: dict[str, int]
    inverse_call_saved: tuple[int, int, int] | None
    context_id: int | None
    lp_index: int | None


@dataclass
class LpState:
    time: int
    instructions: int
    pending_vectors: list[int]
    halted: bool
    preemption_deadline: int | None
    guest: int | None
    timer: tuple[int, int, int | None]
    transitions_in_c: int
    vmx: tuple[bool, int, int | None]
    cr2_history: list[int]
    shared: tuple = ()                    # per class: the holder's python id and the generation


@dataclass
class MachineSnapshot:
    """Everything `restore` needs; it holds copies, so the machine may run on freely."""

    ram: bytes
    contexts: dict[int, ContextState]
    guest_pool: list[int]
    vmcs: list[VmcsState]
    lps: list[LpState]
    machine: dict[str, Any]
    devices: dict[str, Any]
    events: dict[str, Any] = field(default_factory=dict)


def _shared_lp(machine: "Machine", context) -> int | None:
    shared = context.fast.ctx.shared
    return next((lp.index for lp in machine.lps if lp.shared == shared), None)


def _shared_classes(machine: "Machine", lp) -> tuple:
    by_ctx = {context.fast.ctx: python_id for python_id, context in machine.context_by_id.items()}
    shared = lp.shared
    return tuple((by_ctx[fast.ffi.cast("hhr_ctx *", shared.holder[cls])], shared.generation[cls])
                 for cls in range(fast.lib.HHR_SHARED_CLASSES))


def take(machine: "Machine", with_ram: bool = True) -> MachineSnapshot:
    contexts = {
        python_id: ContextState(context.uc.context_save(),
                                {name: getattr(context.fast.ctx, name) for name in _CONTEXT_FIELDS},
                                frozenset(context.exit_points), context.name, _shared_lp(machine, context),
                                tuple(context.fast.ctx.held))
        for python_id, context in machine.context_by_id.items()}
    vmcs_states = [
        VmcsState(vmcs.address, bytes(fast.ffi.buffer(vmcs.values)),
                  {name: getattr(vmcs.fast, name) for name in _VMCS_FLAGS}, vmcs.inverse_call_saved,
                  vmcs.context.fast.python_id if vmcs.context is not None else None, vmcs.lp_index)
        for vmcs in machine.active_vmcs.values()]
    lps = [LpState(lp._time, lp.instructions, list(lp.pending_vectors), lp.halted, lp.preemption_deadline,
                   lp.guest.address if lp.guest is not None else None,
                   (lp.timer.vector, lp.timer.period, lp.timer.deadline), lp.transitions_in_c,
                   (lp.vmx.on, lp.vmx.vmxon_region, lp.vmx.current.address if lp.vmx.current is not None else None),
                   list(lp.cr2_history), _shared_classes(machine, lp))
           for lp in machine.lps]
    io = machine.io
    return MachineSnapshot(
        ram=machine.ram.read(0, machine.ram.size) if with_ram else b"",
        contexts=contexts,
        guest_pool=[context.fast.python_id for context in machine._guest_pool],
        vmcs=vmcs_states,
        lps=lps,
        machine={"retired": machine.retired, "exit_counts": collections.Counter(machine.exit_counts),
                 "inverse_call_counts": collections.Counter(machine.inverse_call_counts),
                 "stop": copy.copy(machine.stop), "prng": machine._prng, "round": machine.round,
                 "last_entry_failure": machine.last_entry_failure, "last_exits": dict(machine.last_exits)},
        devices={"channels": {channel: bytes(data) for channel, data in io.console.channels.items()},
                 "channel": io.console.channel,
                 "doorbell": ([list(message) for message in io.doorbell.messages], io.doorbell.vector,
                              io.doorbell.acknowledged),
                 "clock_latch": dict(io._clock_high_latch),
                 "restart_phase": io.restart_phase,
                 "disk": _disk_state(io.disk)},
        events={"seq": machine.events._seq, "recorded": len(machine.events.events),
                "recent": list(machine.events._recent)},
    )


def restore(machine: "Machine", snapshot: MachineSnapshot, with_ram: bool = True,
            flush_code: bool | frozenset[int] = True) -> None:
    """`flush_code` may name the contexts (python ids) whose translated code, block counts and trap
    points go; the others keep theirs: only for a caller that knows no byte of code they ran
    differs between now and the snapshot (emu/dirty.py)."""
    if with_ram:
        machine.ram.write(0, snapshot.ram)
    for python_id, context in machine.context_by_id.items():
        state = snapshot.contexts.get(python_id)
        if state is not None:
            context.uc.context_restore(state.registers)
            for name, value in state.fields.items():
                setattr(context.fast.ctx, name, value)
            context.name = state.name
            _restore_shared_membership(machine, context, state.shared_lp, state.held)
        else:   # born after the snapshot: back to the pool as new
            context.fast.ctx.retired = 0
            context.fast.set_mode(fast.MODE_ROOT)
            _restore_shared_membership(machine, context, None, ())
        context.flush_translations()
        if flush_code is not True and python_id not in flush_code and state is not None:
            continue
        context.flush_code()
        if state is not None and state.exit_points:
            context.exit_points.update(state.exit_points)
            context.apply_exit_points()
    machine._guest_pool = [machine.context_by_id[python_id] for python_id in snapshot.guest_pool] + [
        context for python_id, context in machine.context_by_id.items()
        if python_id not in snapshot.contexts]
    machine.active_vmcs = {}
    for state in snapshot.vmcs:
        vmcs = _rebuild_vmcs(machine, state)
        machine.active_vmcs[state.address] = vmcs
    for lp, state in zip(machine.lps, snapshot.lps):
        lp._time, lp.instructions = state.time, state.instructions
        lp.pending_vectors = list(state.pending_vectors)
        lp.halted, lp.preemption_deadline = state.halted, state.preemption_deadline
        lp.guest = machine.active_vmcs[state.guest] if state.guest is not None else None
        lp.timer.vector, lp.timer.period, lp.timer.deadline = state.timer
        lp.transitions_in_c = state.transitions_in_c
        on, region, current = state.vmx
        lp.vmx.on, lp.vmx.vmxon_region = on, region
        lp.vmx.current = machine.active_vmcs[current] if current is not None else None
        lp.cr2_history = list(state.cr2_history)
        for cls, (holder, generation) in enumerate(state.shared):
            holder_ctx = machine.context_by_id[holder].fast.ctx
            lp.shared.holder[cls] = holder_ctx
            lp.shared.generation[cls] = generation
            holder_ctx.holds |= 1 << cls
    m = snapshot.machine
    machine.retired = m["retired"]
    machine.exit_counts = collections.Counter(m["exit_counts"])
    machine.inverse_call_counts = collections.Counter(m["inverse_call_counts"])
    machine.stop = copy.copy(m["stop"])
    machine._prng = m["prng"]
    machine.round = m["round"]
    machine.last_entry_failure = m["last_entry_failure"]
    machine.last_exits = dict(m["last_exits"])
    io = machine.io
    io.console.channels = {channel: bytearray(data) for channel, data in snapshot.devices["channels"].items()}
    io.console.channel = snapshot.devices["channel"]
    messages, vector, acknowledged = snapshot.devices["doorbell"]
    io.doorbell.messages = collections.deque(list(message) for message in messages)
    io.doorbell.vector, io.doorbell.acknowledged = vector, acknowledged
    io._clock_high_latch = dict(snapshot.devices["clock_latch"])
    io.restart_phase = snapshot.devices["restart_phase"]
    _restore_disk(io.disk, snapshot.devices["disk"])
    events = machine.events
    events._seq = snapshot.events["seq"]
    del events.events[snapshot.events["recorded"]:]
    events._recent.clear()
    events._recent.extend(snapshot.events["recent"])


def _restore_shared_membership(machine: "Machine", context, lp_index: int | None, held: tuple) -> None:
    """Puts a context back into its LP's shared state as it was (the holders follow per LP)."""
    ctx = context.fast.ctx
    ctx.shared = machine.lps[lp_index].shared if lp_index is not None else fast.ffi.NULL
    ctx.holds = 0                         # set again from each LP's holders
    for cls in range(fast.lib.HHR_SHARED_CLASSES):
        ctx.held[cls] = held[cls] if held else 0


def _rebuild_vmcs(machine: "Machine", state: VmcsState) -> ActiveVmcs:
    """An active VMCS as it was: its slots, flags and the guest instance that held its live state."""
    values = fast.ffi.from_buffer("uint64_t[]", bytearray(state.values))
    vmcs = ActiveVmcs(state.address, list(values), bool(state.flags["launched"]))
    for name, value in state.flags.items():
        setattr(vmcs.fast, name, value)
    vmcs.inverse_call_saved = state.inverse_call_saved
    vmcs.lp_index = state.lp_index
    if state.context_id is not None:
        vmcs.attach(machine.context_by_id[state.context_id])
    return vmcs


_DISK_FIELDS = ("block", "address", "count", "vector", "status", "completion", "issuer", "commands",
                "bytes_read", "bytes_written", "busy_ticks")


def _disk_state(disk) -> dict:
    """The disk's registers, counters and contents (copied: the disk outlives the snapshot)."""
    return {"fields": {name: getattr(disk, name) for name in _DISK_FIELDS},
            "chunks": {index: bytes(chunk) for index, chunk in disk.chunks.items()}}


def _restore_disk(disk, state: dict) -> None:
    for name, value in state["fields"].items():
        setattr(disk, name, value)
    disk.chunks = {index: bytearray(chunk) for index, chunk in state["chunks"].items()}
