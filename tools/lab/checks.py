"""What the lab book's tests look at: console lines, machine events, the debug-exit value, registers and memory as the machine stopped."""
from __future__ import annotations

import re

from unicorn import x86_const as x86

from tools.lab.book import Expected
from tools.lab.runs import LabRun

_REGISTERS = {"cr0": x86.UC_X86_REG_CR0, "cr3": x86.UC_X86_REG_CR3, "cr4": x86.UC_X86_REG_CR4,
              "rip": x86.UC_X86_REG_RIP, "rsp": x86.UC_X86_REG_RSP}


def _machine(run: LabRun):
    if run.machine is None:
        raise Expected("a run of the machine", run.summary())
    return run.machine


def exit_value(run: LabRun) -> int | None:
    """The value the program wrote to the debug-exit port, or None if it stopped otherwise."""
    if run.stop is None or run.stop.reason != "debug-exit" or run.hole is not None:
        return None
    return run.stop.exit_status >> 1


def console_matches(run: LabRun, pattern: str, what: str) -> re.Match:
    """The first match of `pattern` (a regular expression, multiline) in the console output."""
    match = re.search(pattern, run.console, re.MULTILINE)
    if match is None:
        shown = run.console.strip().splitlines()[-3:] or ["nothing"]
        raise Expected(what, "the console's last lines: " + " | ".join(shown))
    return match


def ended_with(run: LabRun, value: int, what: str) -> None:
    """The program stopped through the debug-exit port with `value`."""
    if exit_value(run) != value:
        raise Expected(what, run.summary())


def root_register(run: LabRun, name: str, lp: int = 0) -> int:
    return _machine(run).lps[lp].root.reg(_REGISTERS[name])


def ram_u32(run: LabRun, address: int) -> int:
    return _machine(run).ram.read_u32(address)


def ram_u64(run: LabRun, address: int) -> int:
    return _machine(run).ram.read_u64(address)


def events(run: LabRun, kind: str, **fields) -> list:
    """The events of `kind` whose data has every field of `fields` with that value."""
    return [event for event in run.events_of(kind)
            if all(event.data.get(name) == value for name, value in fields.items())]


def vm_exits(run: LabRun, reason: int) -> list:
    return events(run, "vm-exit", reason=int(reason))


def vmcs_field(run: LabRun, vmcs: int, name: str) -> int:
    """A field of the VMCS at `vmcs` as the machine holds it when the run stopped (the VMCS must be
    active, docs/machine.md 7.3; live guest fields give the guest's current value)."""
    active = _machine(run).active_vmcs.get(vmcs)
    if active is None:
        raise Expected(f"the VMCS at {vmcs:#x} active (VMPTRLD) when the run stopped", "it is not active")
    return active.read(name)


def guest_entered(run: LabRun, vmcs: int, rip: int) -> None:
    """The first VM entry through the VMCS at `vmcs` was a VMLAUNCH that entered the guest at `rip`;
    when it failed, the failure names the check the machine reports."""
    entries = events(run, "vm-entry", vmcs=vmcs)
    if not entries:
        came = "no VM entry"
        if run.entry_failure() is not None:
            came += f"; the machine says: {run.entry_failure()}"
        else:
            errors = [event.data["error"] for event in run.events_of("vmfail")]
            if errors:
                came += f"; the VMX instructions failed with VM-instruction errors {errors}"
        raise Expected(f"a VMLAUNCH of the VMCS at {vmcs:#x} entering the guest", came)
    first = entries[0].data
    if not first["launch"] or first["rip"] != rip:
        raise Expected(f"the first entry to be a VMLAUNCH at guest RIP {rip:#x}",
                       f"{'VMLAUNCH' if first['launch'] else 'VMRESUME'} at {first['rip']:#x}")


def ram_bytes(run: LabRun, address: int, size: int) -> bytes:
    return _machine(run).ram.read(address, size)
