"""Exercise 6: an inverse hypercall: the old hypervisor's VMCALLR into the service partition, the new one's service routine and its return by VMCALL, and what a refusal or a failed call does to the restart."""
from __future__ import annotations

from emu.vmx_defs import ExitReason
from hypervisors import transfer
from tools.lab import hypervisor_run, material, restart_checks
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 6
RESTART_SOURCE = "hypervisors/common/restart.inc"
SERVICE_SOURCE = "hypervisors/common/service.inc"
# The scenario's first restart fails in its INVARIANTS call (the new hypervisor crashes there: its
# panic's OUT ends the call), the second is refused in the pre-copy; the third commits.
FAILED_RESTART, REFUSED_RESTART, COMMITTED_RESTART = 0, 1, 2
FAULTS = ("invariants:crash", "precopy:refuse")
# A committed restart's calls: INVARIANTS, then STATE messages, VERIFY and COMMIT.
FIRST_CALL, LAST_CALLS = transfer.Call.INVARIANTS, (transfer.Call.VERIFY, transfer.Call.COMMIT)


def _calls_answered(run):
    calls = restart_checks.calls_of_restart(run, COMMITTED_RESTART)
    names = [f"{transfer.Call(call).name}->{outcome}" for call, outcome in calls]
    numbers = [call for call, _ in calls]
    well_formed = (len(numbers) >= 4 and numbers[0] == FIRST_CALL and tuple(numbers[-2:]) == LAST_CALLS
                   and set(numbers[1:-2]) == {transfer.Call.STATE})
    if not well_formed or any(outcome != transfer.Reply.ACCEPT for _, outcome in calls):
        raise Expected("the committed restart's inverse hypercalls to be INVARIANTS, one or more STATE, VERIFY "
                       "and COMMIT, each returned by VMCALL with ACCEPT (0) in RAX",
                       " ".join(names) or "no call")


def _refusal(run):
    restart_checks.aborted_with(run, REFUSED_RESTART, transfer.Status.REFUSED, transfer.Reply.VALUE,
                                "a pre-copy message refused with VALUE (7)")


def _failed_call(run):
    try:
        restart_checks.aborted_with(run, FAILED_RESTART, transfer.Status.CALL_FAILED, ExitReason.IO_INSTRUCTION,
                                    "an INVARIANTS call ended by a VM exit (the new hypervisor's panic does an OUT: "
                                    "reason 30) with VMfailValid(67)")
    except Expected as failure:
        if restart_checks.restart(run, FAILED_RESTART)["reason"] == transfer.Status.REFUSED.name.lower():
            raise Expected(failure.expected, failure.came + " (the failed VMCALLR was taken for a reply: RAX "
                           "still held the call; E#6-1 tests CF and ZF)") from None
        raise


EXERCISE = Exercise(
    number=NUMBER, slug="inverse-call", title="An inverse hypercall",
    summary="VMCALLR from the old hypervisor, the service routine and its VMCALL return, refusals and failed calls",
    files=(RESTART_SOURCE, SERVICE_SOURCE),
    includes=(),
    holes=(
        Hole(1, "Call the new hypervisor: VMCALLR and its outcome", "docs/machine.md 8.3, 8.6; SDM 31.2", """
The service VP's VMCS is current and its preemption timer holds the call's budget; RAX holds the
call (CALL_INVARIANTS ...). Give the guest the transfer area's address in RBX (the register
convention of docs/machine.md 8.6), keep R15 (this LP's index: every register but RSP comes back
from the guest) and execute `vmcallr`. Then, as for every VMX instruction (SDM 31.2), CF or ZF set
means it failed (VMfailInvalid, VMfailValid): `jbe call_service.failed`. Otherwise the guest
returned by VMCALL and RAX is its reply: 0 (ACCEPT) means CF = 0 and `ret`; anything else is a
refusal: `jnz call_service.refused` (it aborts the restart and keeps RDI, RSI: where)."""),
        Hole(2, "The service routine's entry and its return by VMCALL", "docs/machine.md 8.3 steps 9 and 11", """
VMCALLR enters the service partition here (INVERSE_HYPERCALL_ENTRY) with RAX = the call and the
other registers as root had them. Do the work (`call receive_call`: it leaves the reply in EAX and,
for a refusal, where in RDI and RSI) and return to the old hypervisor with `vmcall`: during an
inverse hypercall VMCALL is not a VM exit but the call's return, which copies the GPRs to root
(step 11). Anything else that would exit (an OUT, a fault, a HLT) ends the call with VMfailValid(67)
instead (step 12)."""),
        Hole(3, "The call's dispatch by number", "docs/protocol.md 3-6", """
RAX = the call (transfer.Call: CALL_INVARIANTS, CALL_STATE, CALL_VERIFY, CALL_COMMIT). Jump to its
handler: receive_invariants, receive_state, receive_verify, receive_commit. Each ends at
inverse_reply, which returns (RET) to receive_call's caller. A number that is none of these falls
through to receive_call.out_of_order (REPLY_ORDER)."""),
        Hole(4, "A call that failed: VMfailValid(67) and what ended it", "docs/machine.md 8.3 step 12, 8.4; SDM 31.4", """
Here VMCALLR failed. The root GPRs are as they were at the VMCALLR, so first R15 := 0 (LP 0 drives
the restart). The VM-instruction error field (VMCS_FIELD_VM_INSTRUCTION_ERROR, SDM 31.4) says why:
load it into RCX, the abort's detail. If it is VMCALLR_ENDED_BY_VM_EXIT (67), the call ran and was
ended by a VM-exit condition: then the detail is VMCS_FIELD_VM_EXIT_REASON instead (52 when the
preemption timer, the call's timeout, ended it). Then fall through to call_service.error, which
aborts with STATUS_CALL_FAILED and detail RCX."""),
    ),
    tests=(
        Test("committed", 15, "E#6-1", "the restart committed", restart_checks.committed),
        Test("guests", 10, "E#6-2", "guests' output as without a restart", restart_checks.guests_as_in_reference),
        Test("calls", 10, "E#6-3", "every call returned with ACCEPT", _calls_answered),
        Test("refusal", 10, "E#6-1", "a refusal aborts the restart", _refusal),
        Test("failed-call", 10, "E#6-4", "a call ended by a VM exit aborts it", _failed_call),
    ),
    mistakes=(
        Mistake("E#6-1", "jnz call_service.refused", "jnz call_service.failed", ("refusal",),
                "a refusal taken for a failed call"),
        Mistake("E#6-1", "jbe call_service.failed", "jc call_service.failed", ("failed-call",),
                "VMfailValid (ZF = 1) not seen as a failure"),
        Mistake("E#6-3", "je receive_verify\n    cmp rax, CALL_COMMIT\n    je receive_commit",
                "je receive_commit\n    cmp rax, CALL_COMMIT\n    je receive_verify", ("committed", "guests", "calls"),
                "VERIFY and COMMIT dispatched to each other's handler"),
        Mistake("E#6-4", "mov rax, VMCS_FIELD_VM_EXIT_REASON", "mov rax, VMCS_FIELD_VM_INSTRUCTION_ERROR", ("failed-call",),
                "the abort's detail left at the error number instead of the exit reason"),
    ),
    prepare=material.prepare_hypervisor,
    run=lambda exercise, directory, seed: hypervisor_run.run(
        exercise, directory, seed, hypervisor_run.seeded_scenario(seed, faults=FAULTS, required=(hypervisor_run.LONG_GUEST,))),
)
