"""gdb's `monitor` commands: what gdb does not know about the machine (the current VMCS, EPT, machine events, the restart phase, where each image runs) and breaks on machine events."""
from __future__ import annotations

from dataclasses import dataclass

from emu import fast
from emu.vmcs_fields import FIELDS
from emu.vmx_defs import EXIT_REASON_BASIC_MASK, ExitReason
from hypervisors import transfer
from hypervisors.memory_map import GUEST_LOAD_ADDRESS

HELP = """\
monitor vmcs [lpN]          the current VMCS of the stopped LP (or LP N), every field by name
monitor ept GPA [lpN]       GPA through the EPT of that VMCS
monitor events [N]          the last N machine events (at most 32)
monitor phase               the restart phase
monitor where               where each hypervisor image runs now, for `hhr symbols`
monitor break vmexit REASON stop at the next instruction after a VM exit (a name, CPUID, or a number)
monitor break phase NAME    ... after the restart phase NAME begins (commit, blackout, resumed...)
monitor break vmcallr       ... after an inverse hypercall starts
monitor break               the event breaks set; `monitor break clear` removes them
"""
MAX_EVENTS = 32


@dataclass(frozen=True)
class EventBreak:
    """Stop the LP that published a matching event at its next instruction."""

    kind: str
    value: int | None                   # the exit reason or phase it wants; None: any
    label: str

    def matches(self, event) -> bool:
        if event.kind != self.kind:
            return False
        if self.kind == "vm-exit":
            return (event.data["reason"] & EXIT_REASON_BASIC_MASK) == self.value
        if self.kind == "restart-phase":
            return event.data["phase"] == self.value
        return True


def describe_event(event) -> str:
    data = dict(event.data)
    if event.kind == "vm-exit":
        reason = data["reason"] & EXIT_REASON_BASIC_MASK
        data["reason"] = ExitReason(reason).name if reason in ExitReason._value2member_map_ else reason
    if event.kind == "restart-phase" and data["phase"] in transfer.Phase._value2member_map_:
        data["phase"] = transfer.Phase(data["phase"]).name
    text = " ".join(f"{key}={value:#x}" if isinstance(value, int) and not isinstance(value, bool) and key in
                    ("vmcs", "rip", "qualification", "region", "eptp", "address") else f"{key}={value}"
                    for key, value in data.items())
    return f"{event.time:>12} lp{event.lp} {event.kind} {text}".rstrip()


def _number(text: str) -> int:
    return int(text, 0)


def _lp_argument(args) -> int | None:
    """An optional `lpN` among the arguments."""
    for word in args:
        if word.startswith("lp"):
            return int(word[2:])
    return None


class Monitor:
    """Answers `monitor` commands for a stub (tools/gdb/control.py): `lp()` is the selected thread's
    LP, `event_breaks` the stub's list of EventBreak."""

    def __init__(self, stub):
        self.stub = stub

    def __call__(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return HELP
        handler = getattr(self, f"_{words[0]}", None)
        if handler is None:
            return f"unknown monitor command {words[0]!r}; `monitor help` lists them\n"
        try:
            return handler(words[1:])
        except (ValueError, IndexError, KeyError) as exc:
            return f"monitor {words[0]}: {exc}\n"

    def _vmcs(self, args) -> str:
        lp = self.stub.selected_lp(_lp_argument(args))
        vmcs = lp.vmx.current
        if vmcs is None:
            return f"lp{lp.index} has no current VMCS\n"
        lines = [f"lp{lp.index} current VMCS {vmcs.address:#x}"
                 + (f" (in use by the guest {self.stub.vmcs_name(vmcs.address)})" if vmcs.context is not None else "")]
        for field in FIELDS:
            lines.append(f"  {field.name:<40} {field.encoding:#06x}  {vmcs.read(field.name):#x}")
        return "\n".join(lines) + "\n"

    def _ept(self, args) -> str:
        guest_physical = _number(args[0])
        lp = self.stub.selected_lp(_lp_argument(args[1:]))
        vmcs = lp.vmx.current
        if vmcs is None or vmcs.context is None:
            return f"lp{lp.index} has no current VMCS that has been entered\n"
        host, fault = vmcs.context.fast.ept_translate(guest_physical, fast.ACCESS_READ)
        eptp = vmcs.read("EPT_POINTER")
        if fault is not None:
            kind = {fast.FAULT_EPT_VIOLATION: "EPT violation", fast.FAULT_EPT_MISCONFIG: "EPT misconfiguration"}.get(
                fault.kind, f"fault {fault.kind}")
            return f"GPA {guest_physical:#x}: {kind} (VMCS {vmcs.address:#x}, EPTP {eptp:#x})\n"
        return f"GPA {guest_physical:#x} -> HPA {host:#x} (VMCS {vmcs.address:#x}, EPTP {eptp:#x})\n"

    def _events(self, args) -> str:
        count = min(_number(args[0]) if args else MAX_EVENTS, MAX_EVENTS)
        events = self.stub.machine.events.recent()[-count:] if count > 0 else []
        return "".join(describe_event(event) + "\n" for event in events) or "no events yet\n"

    def _phase(self, _args) -> str:
        value = self.stub.machine.io.restart_phase
        name = transfer.Phase(value).name if value in transfer.Phase._value2member_map_ else "unknown"
        in_charge = self.stub.booted.hypervisor or f"{self.stub.booted.label} (a bare machine)"
        return f"restart phase {name} ({value}); {in_charge} is in charge\n"

    def _where(self, _args) -> str:
        booted = self.stub.booted
        if booted.hypervisor is None:
            return f"{booted.label} on the bare machine at {booted.image_base:#x}: {booted.symbols_hint}\n"
        lines = [f"{booted.hypervisor} (in charge) at {booted.image_base:#x}: "
                 f"hhr symbols {booted.hypervisor} --at {booted.image_base:#x} -o {booted.hypervisor}.elf"]
        service = self.stub.service_image()
        if service is not None:
            name, address = service
            lines.append(f"{name} (service region) at {address:#x}: hhr symbols {name} --at {address:#x} -o {name}-new.elf")
        for number, guest in enumerate(booted.guests):
            lines.append(f"partition {number}: {guest.name} at {GUEST_LOAD_ADDRESS:#x} (its own address space)")
        return "\n".join(lines) + "\n"

    def _break(self, args) -> str:
        breaks = self.stub.event_breaks
        if not args:
            return "".join(f"  {entry.label}\n" for entry in breaks) or "no event breaks\n"
        if args[0] == "clear":
            breaks.clear()
            self.stub.event_breaks_changed()
            return "event breaks cleared\n"
        if args[0] == "vmexit":
            name = args[1].upper()
            reason = ExitReason[name] if name in ExitReason.__members__ else ExitReason(_number(args[1]))
            entry = EventBreak("vm-exit", int(reason), f"vmexit {reason.name}")
        elif args[0] == "phase":
            phase = transfer.Phase[args[1].upper()]
            entry = EventBreak("restart-phase", int(phase), f"phase {phase.name.lower()}")
        elif args[0] == "vmcallr":
            entry = EventBreak("vmcallr", None, "vmcallr")
        else:
            raise ValueError(f"break vmexit REASON, break phase NAME or break vmcallr, not {args[0]!r}")
        breaks.append(entry)
        self.stub.event_breaks_changed()
        return f"break on {entry.label}: the LP stops at its next instruction\n"

