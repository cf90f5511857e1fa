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
