"""Turns recorded instructions and machine events into what the writers print: context names, symbols, disassembly, changed registers and named event fields."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from asm import disasm
from emu.events import Event
from emu.vmx_defs import ExitReason
from hypervisors import transfer
from tools.trace.contexts import ContextInfo

# Event fields that are addresses or bit fields: printed in hexadecimal.
HEX_FIELDS = frozenset({"vmcs", "rip", "region", "old", "new", "qualification", "eptp", "address", "error_code",
                        "port"})
EXIT_REASON_MASK = 0xFFFF               # the basic exit reason (SDM Vol. 3C 25.9.1)


@dataclass(slots=True)
class TracedInstruction:
    time: int
    lp: int
    context: ContextInfo
    phase: str
    address: int
    symbol: str | None
    code: bytes
    text: str
    changes: list[tuple[str, int]]
    writes: list[tuple[int, bytes]]
    reads: list[tuple[int, bytes]]      # empty unless the recorder records reads
    before: tuple[int, ...]
    after: tuple[int, ...]


@dataclass(slots=True)
class TracedLoad:
    """Registers of a context that changed while it did not run (a VM entry's or exit's loads, the
    hypervisor writing a guest's state), seen before its next instruction, at that time."""

    time: int
    lp: int
    context: ContextInfo
    phase: str
    changes: list[tuple[str, int]]


@dataclass(slots=True)
class TracedEvent:
    seq: int
    time: int
    lp: int
    kind: str
    phase: str
    data: dict[str, Any]                # the event's data, with names added (reason_name, call_name, ...)
    source: Event                       # the machine's event itself


def phase_name(value: int) -> str:
    try:
        return transfer.Phase(value).name.lower()
    except ValueError:
        return f"phase-{value}"


@functools.cache   # an event's names: looked up once per value, not at every event
def _enum_name(enumeration, value: int) -> str | None:
    try:
        return enumeration(value).name
    except ValueError:
        return None


class Disassembler:
    """Capstone's text for an instruction (VMCALLR too), cached by address and bytes."""

    def __init__(self):
        self._cache: dict[tuple[int, bytes], str] = {}

    def text(self, address: int, code: bytes) -> str:
        key = (address, code)
        text = self._cache.get(key)
        if text is None:
            text = next((instruction.text for instruction in disasm.decode(code, address)), "(no bytes)") \
                if code else "(not mapped)"
            self._cache[key] = text
        return text


def coalesce(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Memory accesses that continue one another (a REP STOS, a PUSH pair) as one run of bytes, in order."""
    runs: list[tuple[int, bytearray]] = []
    for address, data in writes:
        if runs and runs[-1][0] + len(runs[-1][1]) == address:
            runs[-1][1].extend(data)
        else:
            runs.append((address, bytearray(data)))
    return [(address, bytes(data)) for address, data in runs]


def event(event: Event, phase: str, describe_vmcs, vmcall_number) -> TracedEvent:
    """`describe_vmcs(vmcs)` names a VMCS's context; `vmcall_number(vmcs)` is the guest's RAX."""
    data = dict(event.data)
    kind = event.kind
    if "vmcs" in data and data["vmcs"]:
        data["who"] = describe_vmcs(data["vmcs"])
    if kind == "vm-exit":
        reason = data["reason"] & EXIT_REASON_MASK
        data["reason_name"] = _enum_name(ExitReason, reason) or f"reason-{reason}"
        if reason == ExitReason.VMCALL:
            data["call"] = vmcall_number(data["vmcs"])
    elif kind == "vmcallr":
        data["call_name"] = (_enum_name(transfer.Call, data["call"]) or f"call-{data['call']}").lower()
    elif kind == "vmcallr-return" and data.get("exit_reason") is not None:
        data["exit_reason_name"] = _enum_name(ExitReason, data["exit_reason"] & EXIT_REASON_MASK)
    elif kind == "restart-phase":
        data["phase_name"] = phase_name(data["phase"])
    return TracedEvent(event.seq, event.time, event.lp, kind, phase, data, event)


def field_text(name: str, value: Any) -> str:
    """An event field as `name=value`: addresses in hex, names as they are."""
    if isinstance(value, bool) or value is None:
        return f"{name}={value}"
    if isinstance(value, int) and name in HEX_FIELDS:
        return f"{name}={value:#x}"
    return f"{name}={value}"
