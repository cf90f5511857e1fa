"""Faults injected at a named step of a hot restart (`hhr restart --inject STEP:FAULT`), and into a
suspend's image on the disk (`--mode suspend --inject resume:corrupt`): each must abort it cleanly."""
from __future__ import annotations

from dataclasses import dataclass

from emu.events import Event, EventKind
from hypervisors import build, transfer
from hypervisors.boot import Booted
from hypervisors.timeline import RestartTimeline

ABORT_STEPS = ("request", "boot", "invariants", "precopy", "blackout", "verify", "commit")   # a fault aborts
POSTCOPY_STEP = "postcopy"                          # after a post-copy's commit: nothing aborts (below)
STEPS = (*ABORT_STEPS, POSTCOPY_STEP)
FAULTS = ("hang", "crash", "refuse", "corrupt")
JUMP_TO_ITSELF = b"\xeb\xfe"                        # jmp $
UNDEFINED_INSTRUCTION = b"\x0f\x0b"                 # ud2
MOV_EAX_IMMEDIATE = b"\xb8"
JUMP_RELATIVE = b"\xe9"
JUMP_RELATIVE_LENGTH = 5
MOV_EAX_LENGTH = 5

# The inverse hypercall each step's fault strikes, and the new hypervisor's handler for it.
CALL_OF_STEP = {"invariants": transfer.Call.INVARIANTS, "precopy": transfer.Call.STATE,
                "blackout": transfer.Call.STATE, "verify": transfer.Call.VERIFY, "commit": transfer.Call.COMMIT}
HANDLER_OF_CALL = {transfer.Call.INVARIANTS: "receive_invariants", transfer.Call.STATE: "receive_state",
                   transfer.Call.VERIFY: "receive_verify", transfer.Call.COMMIT: "receive_commit"}
PHASE_OF_STEP = {"precopy": transfer.Phase.PRECOPY, "blackout": transfer.Phase.BLACKOUT}
# After a post-copy's commit the fault strikes the old hypervisor's code at the first fetch the new
# one makes: its handler of the drain calls hangs, crashes or refuses, or the fetched message is
# changed before the new hypervisor reads it. Nothing aborts any more: the partitions whose windows
# had not come whole stop, the others run on (docs/protocol.md, Post-copy).
POSTCOPY_CALLS = (transfer.Call.FETCH_NEXT, transfer.Call.FETCH_TABLE)
POSTCOPY_HANDLER = "drain_call_dispatch"
RETURN = b"\xc3"


class FaultSpecError(ValueError):
    """An --inject argument that names no step or fault; the message lists them."""


@dataclass
class Fault:
    """STEP:FAULT. `request` and `boot` faults change what the operator stages; the others strike the
    new hypervisor when the old one calls it for that step: its handler hangs (`jmp $`), crashes
    (`ud2`) or refuses, patched into its code in the service region; or the message is changed in
    flight (`corrupt`)."""

    step: str
    fault: str
    struck: bool = False

    @classmethod
    def parse(cls, text: str) -> "Fault | None":
        if text in ("", "none"):
            return None
        step, _, fault = text.partition(":")
        if step not in STEPS or fault not in FAULTS:
            raise FaultSpecError(f"bad --inject {text!r}: use STEP:FAULT with STEP one of {', '.join(STEPS)} "
                                 f"and FAULT one of {', '.join(FAULTS)}")
        return cls(step, fault)

    def stage(self, code: bytearray, symbols: dict[str, int], base: int) -> tuple[bool, bytes | None]:
        """Changes to the operator's request: (send a malformed request, digest to send instead)."""
        if self.step == "request":
            if self.fault == "corrupt":
                return False, bytes(transfer.DIGEST_BYTES)
            return True, None                         # hang, crash, refuse: a request it cannot take
        if self.step == "boot":
            target = "service_entry.stay" if self.fault == "hang" else "panic"
            if self.fault in ("refuse", "corrupt"):
                target = "panic"
            symbols["service_entry"] = symbols[target]
        return False, None

    def on_event(self, event: Event, machine, phase: transfer.Phase, area: int, region: int, hypervisor: str) -> None:
        """Strikes at the first inverse hypercall of the step."""
        if self.struck or self.step in ("request", "boot", "postcopy") or event.kind != "vmcallr":
            return
        call = transfer.Call(event.data["call"])
        if call != CALL_OF_STEP[self.step] or (self.step in PHASE_OF_STEP and phase != PHASE_OF_STEP[self.step]):
            return
        self.struck = True
        if self.fault == "corrupt" and call != transfer.Call.COMMIT:
            header = transfer.TRANSFER_HEADER.unpack(machine.ram.read(area, transfer.TRANSFER_HEADER.size))
            last = area + min(header["bytes"], transfer.TRANSFER_AREA_SIZE) - 1
            machine.ram.write(last, bytes([machine.ram.read(last, 1)[0] ^ 0xFF]))
            return
        image = build.image(hypervisor)
        handler = region + image.symbol(HANDLER_OF_CALL[call]) - image.base
        machine.ram.write(handler, self._patch(handler, region + image.symbol("inverse_reply") - image.base))
        for vmcs in machine.active_vmcs.values():     # guest code translated before must go (not root's,
            if vmcs.context is not None:              # which is running this hook)
                vmcs.context.flush_code()

    def on_drain_event(self, event: Event, machine, area: int, old_hypervisor: str, old_base: int) -> None:
        """A post-copy step: strikes the old hypervisor's drain code at the first fetch (or, for
        `corrupt`, the message that fetch returns)."""
        if self.struck or self.step != "postcopy":
            return
        if event.kind == EventKind.VMCALLR and event.data["call"] in POSTCOPY_CALLS and self.fault != "corrupt":
            self.struck = True
            image = build.image(old_hypervisor)
            handler = old_base + image.symbol(POSTCOPY_HANDLER) - image.base
            patch = {"hang": JUMP_TO_ITSELF, "crash": UNDEFINED_INSTRUCTION}.get(
                self.fault, MOV_EAX_IMMEDIATE + int(transfer.Reply.VALUE).to_bytes(4, "little") + RETURN)
            machine.ram.write(handler, patch)
            for vmcs in machine.active_vmcs.values():
                if vmcs.context is not None:
                    vmcs.context.flush_code()
        elif event.kind == EventKind.VMCALLR_RETURN and self.fault == "corrupt" and event.data["ok"]:
            header = transfer.TRANSFER_HEADER.unpack(machine.ram.read(area, transfer.TRANSFER_HEADER.size))
            if header["record_count"] == 0:
                return                                # a table with nothing mapped: wait for one with records
            self.struck = True
            last = area + min(header["bytes"], transfer.TRANSFER_AREA_SIZE) - 1
            machine.ram.write(last, bytes([machine.ram.read(last, 1)[0] ^ 0xFF]))

    def _patch(self, handler: int, reply: int) -> bytes:
        if self.fault == "hang":
            return JUMP_TO_ITSELF
        if self.fault == "crash":
            return UNDEFINED_INSTRUCTION
        jump_from = handler + MOV_EAX_LENGTH + JUMP_RELATIVE_LENGTH       # refuse (or corrupt at commit)
        return (MOV_EAX_IMMEDIATE + int(transfer.Reply.VALUE).to_bytes(4, "little")
                + JUMP_RELATIVE + (reply - jump_from).to_bytes(4, "little", signed=True))


@dataclass
class FaultHook:
    """Hands a restart's inverse hypercalls to a `Fault`, with the timeline's current phase and where
    the new hypervisor is staged. Subscribe `on_event` to the machine's events (EVENT_KINDS), after
    anything that must read the message as the old hypervisor sent it."""

    EVENT_KINDS = frozenset({EventKind.VMCALLR.value, EventKind.VMCALLR_RETURN.value})

    fault: Fault
    booted: Booted
    timeline: RestartTimeline
    to_hypervisor: str

    def __post_init__(self) -> None:
        self.from_hypervisor, self.from_base = self.booted.hypervisor, self.booted.image_base   # at the request

    def on_event(self, event: Event) -> None:
        booted = self.booted
        if self.timeline.phase == transfer.Phase.POSTCOPY:
            self.fault.on_drain_event(event, booted.machine, booted.transfer_area, self.from_hypervisor,
                                      self.from_base)
            return
        if event.kind == EventKind.VMCALLR:
            self.fault.on_event(event, booted.machine, self.timeline.phase, booted.transfer_area,
                                booted.service_region, self.to_hypervisor)


SUSPEND_INJECTIONS = ("resume:corrupt",)          # the faults a suspend takes (--mode suspend)


def corrupt_suspend_image(disk) -> None:
    """A bit of the first VP record's RBX flipped in the suspend image on `disk`, before the resume:
    a value any VP may hold, so only the digest chain can tell (docs/protocol.md, Suspend and resume)."""
    from emu.disk import DISK_BLOCK_SIZE
    header = transfer.SUSPEND_HEADER.unpack(disk.read(transfer.SUSPEND_HEADER_BLOCK * DISK_BLOCK_SIZE,
                                                      transfer.SUSPEND_HEADER.size))
    block = header["state_block"]
    for _ in range(header["messages"]):
        start = block * DISK_BLOCK_SIZE
        message_bytes = transfer.TRANSFER_HEADER.unpack(disk.read(start, transfer.TRANSFER_HEADER.size))["bytes"]
        message = disk.read(start, min(message_bytes, transfer.TRANSFER_AREA_SIZE))
        cursor = transfer.TRANSFER_HEADER.size
        while cursor + transfer.RECORD_HEADER.size <= len(message):
            record = transfer.RECORD_HEADER.unpack(message[cursor:cursor + transfer.RECORD_HEADER.size])
            if record["type"] == transfer.RecordType.VP:
                where = start + cursor + transfer.RECORD_HEADER.size + transfer.VP_RECORD.offset("rbx")
                disk.write(where, bytes([disk.read(where, 1)[0] ^ 1]))
                return
            cursor += transfer.RECORD_HEADER.size + record["length"]
        block += max(1, -(-message_bytes // DISK_BLOCK_SIZE))
