"""What the hypervisor exercises' tests look at: the restart's report, the guests beside the reference run, and the run's events restart by restart."""
from __future__ import annotations

from hypervisors import transfer
from tools.lab.book import Expected
from tools.lab.runs import LabRun


def document(run: LabRun) -> dict:
    """The run's `hhr restart --json` document."""
    found = run.extra.get("document")
    if found is None:
        raise Expected("a hot restart that ran to the end of the guests", run.extra.get("error") or run.summary())
    return found


def restart(run: LabRun, number: int) -> dict:
    """The report of the scenario's restart `number` (-1: the last, which no fault strikes)."""
    reports = document(run)["restarts"]
    wanted = len(run.extra["scenario"].request_points())
    if len(reports) < wanted:
        raise Expected(f"{wanted} restart(s) requested, one after the other",
                       f"{len(reports)}: the machine stopped during restart {len(reports) - 1}: {run.summary()}")
    return reports[number]


def describe_ending(report: dict) -> str:
    outcome = report["outcome"]
    if report["reason"]:
        outcome += f" ({report['reason']}, detail {report['detail']})"
    return outcome


def committed(run: LabRun) -> None:
    """The last restart committed and the new hypervisor runs the machine."""
    scenario = run.extra["scenario"]
    report = restart(run, -1)
    if report["outcome"] != "committed":
        raise Expected(f"the restart {scenario.from_hypervisor} -> {scenario.to_hypervisor} to commit",
                       f"{describe_ending(report)}; the hypervisor console: {_console_tail(run)}")
    if document(run)["hypervisor"] != scenario.to_hypervisor:
        raise Expected(f"{scenario.to_hypervisor} in charge of the machine at the end",
                       document(run)["hypervisor"])


def aborted_with(run: LabRun, number: int, status: transfer.Status, detail: int, what: str) -> None:
    """Restart `number` aborted with `status` and `detail`; `what` says what that means."""
    report = restart(run, number)
    reason = status.name.lower()
    if report["outcome"] != "aborted" or report["reason"] != reason or report["detail"] != detail:
        raise Expected(f"{what}: the restart aborted with reason {reason}, detail {detail}",
                       f"{describe_ending(report)}; the hypervisor console: {_console_tail(run)}")


def guests_as_in_reference(run: LabRun, names: tuple[str, ...] | None = None) -> None:
    """The new hypervisor took the guests over, and each (of `names`, or all) printed and exited as
    under the package's own hypervisor without a restart. (After an abort the old hypervisor ran
    them all along: that says nothing of the hand-off.)"""
    report = restart(run, -1)
    if report["outcome"] != "committed":
        raise Expected("the guests handed over by a committed restart, then running on as without one",
                       f"the restart {describe_ending(report)}")
    guests = document(run)["guests"]
    for got, wanted in zip(guests, run.extra["reference"]):
        if names is not None and wanted["name"] not in names:
            continue
        if got["console"] != wanted["console"]:
            number, wanted_line, got_line = _first_difference(wanted["console"], got["console"])
            raise Expected(f"guest {wanted['name']}'s console as without a restart, line {number}: "
                           f"{_short(wanted_line)}", _short(got_line))
        if got["exit_code"] != wanted["exit_code"]:
            raise Expected(f"guest {wanted['name']} to exit with {wanted['exit_code']} as without a restart",
                           f"{got['exit_code']} ({got['state']})")


def calls_of_restart(run: LabRun, number: int) -> list[tuple[int, object]]:
    """(call, outcome) of each inverse hypercall of restart `number`, in order: the outcome is the
    result when the guest returned by VMCALL, else "exit <reason>"."""
    segments: list[list] = []
    for event in run.events:
        if event.kind == "restart-phase" and event.data["phase"] == transfer.Phase.REQUESTED:
            segments.append([])
        elif segments and event.kind in ("vmcallr", "vmcallr-return"):
            segments[-1].append(event)
    calls, pending = [], None
    if len(segments) < len(run.extra["scenario"].request_points()):
        raise Expected("every restart of the scenario requested", f"{len(segments)}: {run.summary()}")
    for event in segments[number]:
        if event.kind == "vmcallr":
            pending = event.data["call"]
        elif pending is not None:
            outcome = event.data["result"] if event.data["ok"] else f"exit {event.data['exit_reason']}"
            calls.append((pending, outcome))
            pending = None
    return calls


def _first_difference(wanted: str, got: str) -> tuple[int, str | None, str | None]:
    """The first line (from 1) where two console outputs differ, and each one's line (None: ended)."""
    wanted_lines, got_lines = wanted.splitlines(), got.splitlines()
    for number in range(max(len(wanted_lines), len(got_lines))):
        mine = wanted_lines[number] if number < len(wanted_lines) else None
        theirs = got_lines[number] if number < len(got_lines) else None
        if mine != theirs:
            return number + 1, mine, theirs
    return 0, wanted, got


def _console_tail(run: LabRun) -> str:
    lines = run.console.strip().splitlines()[-2:]
    return " | ".join(lines) if lines else "nothing"


def _short(value) -> str:
    text = "nothing more" if value is None else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
