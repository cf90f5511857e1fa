"""Runs the fuzzing exercise: the student's receiver against a seeded change in flight that only the digest can catch, an unchanged restart, and the finding the student kept from `hhr fuzz`, replayed against the planted build and theirs."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

from asm import AsmError
from hypervisors import build, transfer
from tools.fuzz import campaign, corpus, executor, fields
from tools.fuzz.inputs import Edit, FuzzInput
from tools.lab import material
from tools.lab.book import Exercise
from tools.lab.runs import LabRun

FINDING_FILE = "finding.json"          # where the student keeps a finding of `hhr fuzz`
FINDINGS_FOLDER = "fuzz-findings"      # where the suggested `hhr fuzz` command saves them
CORPUS_FOLDER = "fuzz-corpus"
BITS_PER_BYTE = 8


def fuzz_command(directory: Path) -> str:
    """The campaign a student runs against the exercise's copy of the hypervisors."""
    return (f"HHR_HYPERVISOR_SOURCES={directory / material.HYPERVISOR_TREE} hhr fuzz --seconds 120 "
            f"--corpus {directory / CORPUS_FOLDER} --findings {directory / FINDINGS_FOLDER}")


def in_flight_change(machine: executor.TransferMachine, seed: int) -> FuzzInput:
    """One bit of one trusted field of the last STATE message flipped in flight, chosen from the
    seed: only the digest can tell (the receiver has nothing else to compare such a field with)."""
    number = max(number for number, call in enumerate(machine.calls, 1) if call == transfer.Call.STATE)
    trusted = [field for field in fields.message_fields(machine.messages[number - 1])
               if not field.checkable and not field.name.split(".")[-1].startswith("_")]
    rng = random.Random(seed)
    chosen = rng.choice(trusted)
    return FuzzInput("messages", number, (Edit("xor", chosen.offset + rng.randrange(chosen.width),
                                                   value=1 << rng.randrange(BITS_PER_BYTE), field=chosen.name),))


def write_planted_finding(exercise: Exercise, directory: Path) -> Path:
    """finding.json as a campaign on the planted build would save it: the in-flight change of seed 0,
    which only the broken check lets through (what `hhr fuzz` finds within a minute)."""
    with tempfile.TemporaryDirectory(prefix="hhr-lab-planted-") as folder:
        material.prepare_hypervisor(exercise, Path(folder) / "planted")
        with build.sources(Path(folder) / "planted" / material.HYPERVISOR_TREE):
            machine = executor.TransferMachine(executor.Setup())
            change = in_flight_change(machine, 0)
            result = machine.execute(change, deep=True)
    if result.finding is None:
        raise ValueError(f"the planted build let no change in flight through ({result.outcome})")
    saved = corpus.save_finding(directory, result.finding.kind, result.finding.description,
                                machine.setup.as_json(), change)
    return saved.rename(directory / FINDING_FILE)


def _replay(path: Path, machine: executor.TransferMachine | None = None) -> tuple[executor.Result, str | None]:
    result, kind, _ = campaign.replay(path, None, machine)
    return result, kind


def run(exercise: Exercise, directory: Path, seed: int) -> LabRun:
    lab_run = LabRun(seed=seed)
    lab_run.notes = [f"find the bug: {fuzz_command(directory)}",
                     f"then replay a finding: HHR_HYPERVISOR_SOURCES=... hhr fuzz --replay FILE, and keep it "
                     f"as {directory / FINDING_FILE}"]
    finding = directory / FINDING_FILE
    try:
        with build.sources(directory / material.HYPERVISOR_TREE):
            for name in build.HYPERVISORS:
                build.image(name)
            machine = executor.TransferMachine(executor.Setup())
            lab_run.extra["unchanged"] = machine.execute(FuzzInput("messages", 2, fix_digest=True), deep=True)
            change = in_flight_change(machine, seed)
            lab_run.extra["change"] = change
            lab_run.extra["changed"] = machine.execute(change, deep=True)
            if finding.is_file():
                lab_run.extra["finding_on_yours"] = _replay(finding, machine)
    except AsmError as error:
        lab_run.build_error = str(error)
        return lab_run
    except (executor.SetupError, ValueError) as error:
        lab_run.extra["setup_error"] = str(error)
    if finding.is_file():
        with tempfile.TemporaryDirectory(prefix="hhr-lab-planted-") as folder:
            material.prepare_hypervisor(exercise, Path(folder) / "planted")
            with build.sources(Path(folder) / "planted" / material.HYPERVISOR_TREE):
                try:
                    lab_run.extra["finding_on_planted"] = _replay(finding)
                except (ValueError, KeyError, OSError) as error:
                    lab_run.extra["finding_error"] = f"{FINDING_FILE} does not replay: {error}"
    lab_run.ending = "the receiver tried with an unchanged restart and a change in flight"
    for key, what in (("unchanged", "an unchanged restart"), ("changed", "a change in flight"),
                      ("finding_on_planted", f"{FINDING_FILE} on the planted build"),
                      ("finding_on_yours", f"{FINDING_FILE} on yours")):
        result = lab_run.extra.get(key)
        if isinstance(result, tuple):
            result = result[0]
        if result is not None:
            verdict = f"finding {result.finding.kind}" if result.finding else "no finding"
            lab_run.notes.append(f"{what}: {result.outcome}, {verdict}")
    return lab_run
