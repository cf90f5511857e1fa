"""Exercise 7: a transfer record: a VP serialized on the old side (its registers, and the state no VMCS field holds in a VP_STATE record), checked and rebuilt on the new side."""
from __future__ import annotations

import re

from hypervisors import transfer
from tools.lab import hypervisor_run, material, restart_checks
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 7
RESTART_SOURCE = "hypervisors/common/restart.inc"
SERVICE_SOURCE = "hypervisors/common/service.inc"
VP_STATE_SOURCE = "hypervisors/common/vp_state.inc"
# The oracle of a VP's processor state: two VPs that share an LP, each with values of its own in
# every register; it prints whatever changed.
ORACLE = "cpustate,vps=2"
OTHER_GUESTS = tuple(name for name in hypervisor_run.GUEST_POOL if not name.startswith("cpustate"))
MALFORMED_RESTART = 0                    # the scenario's first restart: struck by MalformedVpState
VP_RECORD, VP_STATE_RECORD = transfer.RecordType.VP.name.lower(), transfer.RecordType.VP_STATE.name.lower()


class MalformedVpState:
    """Strikes the scenario's first restart: in its first STATE message that carries a VP_STATE
    record, that record gets a reserved MXCSR bit (FXRSTOR would fault on it, SDM Vol. 1 11.6.6), as
    the message crosses. The receiver must refuse it (VALUE); the next restart commits."""

    description = "a VP_STATE record with a reserved MXCSR bit"
    RESERVED_MXCSR_BIT = 1 << 31

    def __init__(self):
        self.struck = False

    def __call__(self, booted) -> None:
        booted.machine.events.subscribe(lambda event: self._on_call(booted, event), frozenset({"vmcallr"}))

    def _on_call(self, booted, event) -> None:
        if self.struck or event.data["call"] != transfer.Call.STATE:
            return
        ram, area = booted.machine.ram, booted.transfer_area
        header = transfer.TRANSFER_HEADER.unpack(ram.read(area, transfer.TRANSFER_HEADER.size))
        cursor, end = area + transfer.TRANSFER_HEADER.size, area + min(header["bytes"], transfer.TRANSFER_AREA_SIZE)
        while cursor + transfer.RECORD_HEADER.size <= end:
            record = transfer.RECORD_HEADER.unpack(ram.read(cursor, transfer.RECORD_HEADER.size))
            body = cursor + transfer.RECORD_HEADER.size
            if record["type"] == transfer.RecordType.VP_STATE:
                where = body + transfer.VP_STATE_RECORD.offset("mxcsr")
                ram.write_u32(where, ram.read_u32(where) | self.RESERVED_MXCSR_BIT)
                self.struck = True
                return
            cursor = body + record["length"]


def _oracle_intact(run):
    restart_checks.guests_as_in_reference(run, names=("cpustate",))


def _other_guests(run):
    restart_checks.guests_as_in_reference(run, names=tuple(name.split(",")[0] for name in OTHER_GUESTS))


def _malformed_refused(run):
    report = restart_checks.restart(run, MALFORMED_RESTART)
    refused_here = re.search(rf"at record \d+ of type {int(transfer.RecordType.VP_STATE)}\b", run.console)
    if (report["outcome"], report["reason"], report["detail"]) != ("aborted", "refused", transfer.Reply.VALUE) \
            or refused_here is None:
        raise Expected(f"the VP_STATE record with a reserved MXCSR bit refused as it arrived: the first restart "
                       f"aborted, refused with VALUE ({int(transfer.Reply.VALUE)}) at a record of type VP_STATE "
                       f"({int(transfer.RecordType.VP_STATE)})",
                       f"{restart_checks.describe_ending(report)}; the hypervisor console: "
                       + (" | ".join(run.console.strip().splitlines()[:2]) or "nothing"))


def _records(run):
    sent = restart_checks.restart(run, -1)["records_sent"]
    vps, states = sent.get(VP_RECORD, 0), sent.get(VP_STATE_RECORD, 0)
    if vps == 0 or states != vps:
        raise Expected("a VP_STATE record after every VP record the old hypervisor sent",
                       f"{vps} VP record(s), {states} VP_STATE record(s)")


EXERCISE = Exercise(
    number=NUMBER, slug="vp-record", title="A transfer record",
    summary="a VP serialized by the old hypervisor (GPRs, CR2, DRs, MSRs, FXSAVE image), checked and rebuilt by the new one",
    files=(RESTART_SOURCE, SERVICE_SOURCE, VP_STATE_SOURCE),
    includes=(),
    holes=(
        Hole(1, "The sender: a VP's registers, and its VP_STATE record", "docs/protocol.md 4, 5; SDM 28.3", """
RSI = the VP's record (VP_*), RDI = the TR_VP record being filled. A VM exit saves no general
register but RSP and RIP in the VMCS (SDM 28.3): the hypervisor keeps them in the VP record, so the
fifteen GPRs must go into the TR_VP record (COPY_GPRS_TO_RECORD, defs.inc, copies VP_RAX ... VP_R15
to TR_VP_RAX ... TR_VP_R15). Then the VP's state beyond the VMCS goes in a record of its own, right
after: message_record with EAX = RECORD_VP_STATE and ECX = TR_VP_STATE_SIZE gives RDI = its zeroed
body (CF = 1: the restart was aborted, jump to send_partitions_and_vps.aborted); vp_state_to_record
fills it from RSI."""),
        Hole(2, "Serialize the state beyond the VMCS: CR2, DRs, MSRs, FXSAVE image", "SDM Vol. 1 10.5; SDM 28.3, 29.3", """
RSI = a VP record, RDI = its TR_VP_STATE body. Neither VM exit nor VM entry switches x87/SSE state,
CR2, DR0-DR3, DR6 or the MSRs of SHARED_MSRS (SDM 28.3, 29.3): the hypervisor saved them into the VP
record (save_vp_state: FXSAVE, MOV from CR2/DRn, RDMSR). Copy them into the record: the macro
COPY_VP_STATE_REGISTERS TO_RECORD does CR2 and the DRs; then the SHARED_MSR_COUNT MSRs, each
SHARED_MSR_BYTES wide, from VP_KERNEL_GS_BASE to TR_VP_STATE_KERNEL_GS_BASE; then the whole
FXSAVE_AREA_BYTES image (x87, MXCSR, XMM0-15) from VP_FX_AREA to TR_VP_STATE_FX_HEADER (REP MOVSQ;
keep RSI and RDI for the caller)."""),
        Hole(3, "The receiver: a VP's registers from its record", "docs/protocol.md 4", """
RSI = the new hypervisor's VP record (found or just made), RDI = the TR_VP body received. Its
fifteen GPRs become the VP's: COPY_GPRS_FROM_RECORD (defs.inc) is the mirror of the sender's
macro. The first VM entry under the new hypervisor loads them (load_guest_registers)."""),
        Hole(4, "Check a VP_STATE record and rebuild the VP's state from it", "SDM Vol. 1 11.6.6; SDM Vol. 4 Table 2-2", """
RDI = the TR_VP_STATE body, RSI = its VP's record (R9 = the VP's number). Never trust a value the
hardware would refuse: FXRSTOR faults on a reserved MXCSR bit (SDM Vol. 1 11.6.6), WRMSR on a
non-canonical or reserved value. check_vp_state_record (keep RSI around it) returns EAX = 0 or
REPLY_VALUE; on a refusal jump to receive_vp_state.refused. Otherwise copy the record into the VP:
COPY_VP_STATE_REGISTERS FROM_RECORD (CR2, DRs), the SHARED_MSR_COUNT MSRs, the FXSAVE image (RSI
and RDI swapped against the sender's copy), and mark it arrived: vp_state_ready[R9] = 1 (VERIFY
refuses a VP without it)."""),
    ),
    tests=(
        Test("committed", 15, "E#7-4", "the restart committed", restart_checks.committed),
        Test("cpustate", 15, "E#7-2", "cpustate: every register intact", _oracle_intact),
        Test("guests", 10, "E#7-3", "the other guests as without a restart", _other_guests),
        Test("records", 10, "E#7-1", "a VP_STATE record for every VP", _records),
        Test("malformed", 10, "E#7-4", "a malformed VP_STATE record refused", _malformed_refused),
    ),
    mistakes=(
        Mistake("E#7-1", "    COPY_GPRS_TO_RECORD\n", "", ("cpustate", "guests"),
                "the general registers left out of the VP record"),
        Mistake("E#7-2", "mov ecx, FXSAVE_AREA_BYTES / 8", "mov ecx, FXSAVE_AREA_BYTES / 16", ("cpustate",),
                "half of the FXSAVE image copied (XMM6 to XMM15 lost)"),
        Mistake("E#7-3", "    COPY_GPRS_FROM_RECORD\n", "", ("cpustate", "guests"),
                "the received registers not taken"),
        Mistake("E#7-4", "mov byte ptr [rax + r9], 1", "mov byte ptr [rax + r9], 0",
                ("committed", "cpustate", "guests"),
                "the VP_STATE never marked as arrived: VERIFY refuses"),
        Mistake("E#7-4", "    COPY_VP_STATE_REGISTERS FROM_RECORD\n", "", ("cpustate",),
                "CR2 and the debug registers not rebuilt"),
        Mistake("E#7-4", "    test eax, eax\n    jnz receive_vp_state.refused\n", "", ("malformed",),
                "the check's answer ignored"),
    ),
    prepare=material.prepare_hypervisor,
    run=lambda exercise, directory, seed: hypervisor_run.run(
        exercise, directory, seed,
        hypervisor_run.seeded_scenario(seed, pool=OTHER_GUESTS, required=(ORACLE, hypervisor_run.LONG_GUEST), extra_restarts=1,
                                       watch=MalformedVpState())),
)
