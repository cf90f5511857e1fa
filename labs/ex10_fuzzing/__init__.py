"""Exercise 10: a receiver bug planted in the new hypervisor, found with `hhr fuzz` and fixed."""
from __future__ import annotations

from tools.lab import fuzz_run, material
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 10
SERVICE = "hypervisors/common/service.inc"
# The bug: the digest mismatch sets the reply, and nothing refuses the state.
PLANTED = "    mov eax, REPLY_DIGEST\n"


def _result(run, key: str):
    if "setup_error" in run.extra:
        raise Expected("an unchanged hot restart to commit (the fuzzer's setup)", run.extra["setup_error"])
    return run.extra[key]


def _unchanged_restart(run):
    result = _result(run, "unchanged")
    if result.outcome != "committed" or result.finding is not None:
        raise Expected("an unchanged hot restart to commit with the guests as without one",
                       f"{result.outcome}, {result.finding.description if result.finding else 'no finding'}")


def _change_refused(run):
    result = _result(run, "changed")
    change = run.extra["change"]
    if result.finding is not None or result.outcome == "committed":
        raise Expected(f"the restart refused after {change.edits[0].field} was changed in flight "
                       f"(its digest no longer agrees)",
                       f"{result.outcome}" + (f": finding {result.finding.kind}: {result.finding.description}"
                                              if result.finding else ""))


def _finding_kept(run):
    if "finding_on_planted" not in run.extra:
        raise Expected(f"a finding of hhr fuzz kept as {fuzz_run.FINDING_FILE} in the exercise's folder "
                       f"(hhr lab run 10 prints the command)",
                       run.extra.get("finding_error", "no such file"))
    planted, kind = run.extra["finding_on_planted"]
    if planted.finding is None:
        raise Expected(f"{fuzz_run.FINDING_FILE} to be a finding on the exercise's planted build",
                       f"{planted.outcome}, no finding")


EXERCISE = Exercise(
    number=NUMBER, slug="fuzzing", title="Find a planted receiver bug with hhr fuzz",
    summary="a check of the new hypervisor's receiver is broken: fuzz the transfer, replay the finding, fix it",
    files=(SERVICE,),
    holes=(
        Hole(1, "Find the broken check with hhr fuzz, and fix it", "docs/fuzzing.md, docs/protocol.md 5", """
One check of the receiver (hypervisors/common/service.inc, the new hypervisor's side of the
transfer) is broken in this copy. Run the fuzzer against it (hhr lab run 10 prints the command:
HHR_HYPERVISOR_SOURCES=<this folder>/hypervisors hhr fuzz ...) until it reports a finding; replay
the finding (hhr fuzz --replay FILE) and read what its oracle says (docs/fuzzing.md, "Oracles");
copy the finding file to finding.json in this folder. Then find which check of docs/protocol.md
"Checks, field by field" the receiver no longer makes, and restore it.""", planted=PLANTED),
    ),
    tests=(
        Test("unchanged-restart", 10, "E#10-1", "an unchanged hot restart commits", _unchanged_restart),
        Test("change-refused", 20, "E#10-1", "a change in flight is refused", _change_refused),
        Test("finding", 10, None, "a finding of hhr fuzz kept", _finding_kept),
    ),
    mistakes=(
        Mistake("E#10-1", "jne inverse_reply", "jne receive_verify.complete", ("change-refused",),
                "a mismatch taken for a complete state"),
        Mistake("E#10-1", "jne inverse_reply", "jmp inverse_reply", ("unchanged-restart", "change-refused"),
                "every digest refused (no restart can commit, so the change cannot be tried either)"),
    ),
    prepare=material.prepare_hypervisor,
    run=fuzz_run.run,
    solution_extra=fuzz_run.write_planted_finding,
)
