"""Runs a hypervisor exercise: hhr's own hot restart with both hypervisors built from the student's copy of the sources, and the same guests under the package's own hypervisor without a restart, on a seed."""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from asm import AsmError
from guests.catalog import GuestSpecError
from hypervisors import build
from hypervisors.boot import BootError
from tools import restart as restart_module
from tools import run as run_module
from tools.lab import holes, material
from tools.lab.book import Exercise
from tools.lab.runs import LabRun

# Guests a seeded scenario draws from: each checks its own results and prints them.
GUEST_POOL = ("hashchain", "sieve", "cpustate", "hello,vps=2", "counter", "pingpong")
GUESTS_PER_RUN = 3
LP_CHOICES = (1, 2)
REQUEST_WINDOW = (400_000, 1_200_000)        # the restart is requested at an instruction count in here
BUDGET = 200_000_000                         # instructions for the whole run; a hung hand-off stops here


@dataclass(frozen=True)
class Scenario:
    """What one graded run does: these guests on these LPs, a restart from one hypervisor to the
    other at an instruction count, in a mode."""

    guests: tuple[str, ...]
    lps: int
    request_at: int
    from_hypervisor: str = "hv1"
    to_hypervisor: str = "hv2"
    mode: str = "precopy"

    def describe(self) -> str:
        return (f"guests {' '.join(self.guests)} on {self.lps} LP(s), {self.from_hypervisor} -> "
                f"{self.to_hypervisor} ({self.mode}) requested at instruction {self.request_at}")


def seeded_scenario(seed: int, mode: str = "precopy", guests: tuple[str, ...] | None = None) -> Scenario:
    rng = random.Random(seed)
    chosen = tuple(rng.sample(GUEST_POOL, GUESTS_PER_RUN)) if guests is None else guests
    return Scenario(chosen, rng.choice(LP_CHOICES), rng.randrange(*REQUEST_WINDOW), mode=mode)


@lru_cache(maxsize=8)
def reference(guests: tuple[str, ...], lps: int, hypervisor: str) -> tuple[dict, ...]:
    """What the guests print and exit with under the package's own hypervisor, without a restart."""
    with build.sources(build.HERE):
        report = run_module.run(hypervisor, list(guests), lps=lps, max_instructions=BUDGET)
    return tuple({key: guest[key] for key in ("name", "console", "exit_code", "state")}
                 for guest in report.document["guests"])


def run(exercise: Exercise, directory: Path, seed: int, scenario: Scenario | None = None) -> LabRun:
    """Hot-restarts the seeded scenario with the hypervisors of `directory`'s copy of the sources."""
    scenario = scenario or seeded_scenario(seed)
    lab_run = LabRun(seed=seed, values={"lps": scenario.lps, "request_at": scenario.request_at})
    lab_run.extra["scenario"] = scenario
    lab_run.extra["reference"] = reference(scenario.guests, scenario.lps, scenario.from_hypervisor)
    tree = directory / material.HYPERVISOR_TREE
    try:
        with build.sources(tree):
            for name in (scenario.from_hypervisor, scenario.to_hypervisor):
                build.image(name)
            document, booted = restart_module.restart_keeping_machine(
                scenario.from_hypervisor, scenario.to_hypervisor, list(scenario.guests), lps=scenario.lps,
                request_at=scenario.request_at, max_instructions=BUDGET, mode=scenario.mode)
            mailbox = _service_partition_hole(booted, scenario.to_hypervisor)
    except (AsmError, build.ContractError, FileNotFoundError) as error:
        lab_run.build_error = str(error)
        return lab_run
    except (ValueError, BootError, GuestSpecError) as error:
        lab_run.extra["error"] = str(error)
        return lab_run
    machine = booted.machine
    lab_run.machine = machine
    lab_run.stop = machine.stop
    lab_run.console = document.get("hypervisor_console", "")
    lab_run.extra["document"] = document
    lab_run.hole = holes.stopped_at(machine, machine.stop, directory, exercise.files)
    if lab_run.hole is None and mailbox:
        name = holes.name_of_number(mailbox)
        site = holes.sites(directory, exercise.files).get(name)
        lab_run.hole = (f"not yet implemented: {name} at {site or 'a hole no longer in the sources'} (in "
                        f"{scenario.to_hypervisor}'s service partition, whose exit ended the inverse call: the "
                        f"restart {document['restart']['outcome']})")
    return lab_run


def _service_partition_hole(booted, new_hypervisor: str) -> int:
    """The mailbox of the new hypervisor's image (lab.inc): a hole's number when one ran in its service
    partition, where it cannot stop the machine. The image is where the new hypervisor runs after a
    commit, else in the old one's service region."""
    image = build.image(new_hypervisor)
    if holes.MAILBOX_LABEL not in image.symbols:
        return 0
    base = booted.image_base if booted.hypervisor == new_hypervisor else booted.service_region
    return booted.machine.ram.read_u32(base + image.symbol(holes.MAILBOX_LABEL) - image.base)
