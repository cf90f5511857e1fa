"""Runs a hypervisor exercise: hhr's own hot restart with both hypervisors built from the student's copy of the sources, and the same guests under the package's own hypervisor without a restart, on a seed."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from asm import AsmError
from guests.catalog import GuestSpecError
from hypervisors import boot, build, transfer
from hypervisors.boot import BootError
from tools import restart as restart_module
from tools import run as run_module
from tools.lab import holes, material
from tools.lab.book import Exercise
from tools.lab.runs import LabRun

# Guests a seeded scenario draws from: each checks its own results and prints them.
GUEST_POOL = ("hashchain", "sieve", "cpustate", "hello,vps=2", "counter", "pingpong")
GUESTS_PER_RUN = 3
LONG_GUEST = "counter"                       # runs long enough (180 million instructions, quickly) to outlast restarts
LP_CHOICES = (1, 2)
REQUEST_WINDOW = (400_000, 1_200_000)        # the restart is requested at an instruction count in here
BUDGET = 200_000_000                         # instructions for the whole run; a hung hand-off stops here
RESTART_SPACING = 300_000                    # instructions between a scenario's successive requests
RESTART_ALLOWANCE = 20_000_000               # instructions a restart adds to the run (the image's SHA-256 ...)
# The events a run keeps for the tests (LabRun.events): few, so that recording them costs nothing.
EVENT_KINDS = frozenset({"vmxon", "vmxoff", "vmcallr", "vmcallr-return", "restart-phase"})


@dataclass(frozen=True)
class Scenario:
    """What one graded run does: these guests on these LPs, a restart from one hypervisor to the
    other at an instruction count, in a mode. With `faults` (tools/faults.py STEP:FAULT), a restart
    is requested for each, struck by it, before the last one, which none strikes; `extra_restarts`
    more come before the last for `watch`, which is given the booted machine before it runs (to
    follow its events and strike a restart its own way)."""

    guests: tuple[str, ...]
    lps: int
    request_at: int
    from_hypervisor: str = "hv1"
    to_hypervisor: str = "hv2"
    mode: str = "precopy"
    faults: tuple[str, ...] = ()
    extra_restarts: int = 0
    watch: Callable | None = field(default=None, compare=False)

    def budget(self) -> int:
        """Instructions for the run: the guests', each restart's, and a hang holds a call for its whole
        timeout."""
        hangs = sum(fault.endswith(":hang") for fault in self.faults)
        return BUDGET + len(self.request_points()) * RESTART_ALLOWANCE + hangs * transfer.SERVICE_CALL_BUDGET

    def request_points(self) -> list[int]:
        restarts = len(self.faults) + self.extra_restarts + 1
        return [self.request_at + number * RESTART_SPACING for number in range(restarts)]

    def describe(self) -> str:
        strikes = list(self.faults) + [str(getattr(self.watch, "description", "watched"))] * self.extra_restarts
        faults = f", first {' then '.join(strikes)}" if strikes else ""
        return (f"guests {' '.join(self.guests)} on {self.lps} LP(s), {self.from_hypervisor} -> "
                f"{self.to_hypervisor} ({self.mode}) requested at instruction {self.request_at}{faults}")


def seeded_scenario(seed: int, mode: str = "precopy", guests: tuple[str, ...] | None = None,
                    lps: tuple[int, ...] = LP_CHOICES, faults: tuple[str, ...] = (),
                    pool: tuple[str, ...] = GUEST_POOL, required: tuple[str, ...] = (),
                    extra_restarts: int = 0, watch: Callable | None = None) -> Scenario:
    """The scenario of a seed: `guests`, or `required` and the rest of GUESTS_PER_RUN drawn from
    `pool`; the LP count drawn from `lps`; the request point from REQUEST_WINDOW."""
    rng = random.Random(seed)
    if guests is None:
        others = [name for name in pool if name not in required]
        guests = required + tuple(rng.sample(others, max(0, GUESTS_PER_RUN - len(required))))
    return Scenario(guests, rng.choice(lps), rng.randrange(*REQUEST_WINDOW), mode=mode, faults=faults,
                    extra_restarts=extra_restarts, watch=watch)


@lru_cache(maxsize=8)
def reference(guests: tuple[str, ...], lps: int, hypervisor: str, budget: int = BUDGET) -> tuple[dict, ...]:
    """What the guests print and exit with under the package's own hypervisor, without a restart
    (given the budget of the run it is compared with)."""
    with build.sources(build.HERE):
        report = run_module.run(hypervisor, list(guests), lps=lps, max_instructions=budget)
    return tuple({key: guest[key] for key in ("name", "console", "exit_code", "state")}
                 for guest in report.document["guests"])


def run(exercise: Exercise, directory: Path, seed: int, scenario: Scenario | None = None) -> LabRun:
    """Hot-restarts the seeded scenario with the hypervisors of `directory`'s copy of the sources."""
    scenario = scenario or seeded_scenario(seed)
    lab_run = LabRun(seed=seed, values={"lps": scenario.lps, "request_at": scenario.request_at})
    lab_run.extra["scenario"] = scenario
    lab_run.extra["reference"] = reference(scenario.guests, scenario.lps, scenario.from_hypervisor, scenario.budget())
    tree = directory / material.HYPERVISOR_TREE

    def keep_events(booted) -> None:
        booted.machine.events.subscribe(lab_run.events.append, EVENT_KINDS)
    try:
        with build.sources(tree):
            images = {name: build.image(name) for name in (scenario.from_hypervisor, scenario.to_hypervisor)}
            observers = [keep_events] + ([scenario.watch] if scenario.watch else [])
            boot.BOOT_OBSERVERS.extend(observers)
            try:
                document, booted = restart_module.restart_keeping_machine(
                    scenario.from_hypervisor, scenario.to_hypervisor, list(scenario.guests), lps=scenario.lps,
                    request_at=scenario.request_points(), max_instructions=scenario.budget(), mode=scenario.mode,
                    inject=list(scenario.faults) or None)
            finally:
                for observer in observers:
                    boot.BOOT_OBSERVERS.remove(observer)
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
    lab_run.notes = [f"scenario: {scenario.describe()}", restart_module.text(document)]
    lab_run.extra["booted"] = booted            # where each hypervisor is (image_base, service_region)
    lab_run.extra["images"] = images            # the student's images: their symbols
    # A hole in the service partition comes first: its failed call may have led the old hypervisor on
    # to a hole of its own, which stopped the machine. (Once the new hypervisor runs in root mode, its
    # holes stop the machine themselves, and the mailbox names the same.)
    root_hole = holes.stopped_at(machine, machine.stop, directory, exercise.files)
    name = holes.name_of_number(mailbox)
    if not mailbox or (root_hole or "").startswith(f"{holes.NOT_IMPLEMENTED}: {name} "):
        lab_run.hole = root_hole                # (the new hypervisor's hole in root mode, once it took over)
    else:
        then = (f"then {scenario.from_hypervisor} stopped at {root_hole.split(': ', 1)[1]}" if root_hole
                else f"the restart {document['restarts'][-1]['outcome']}")
        lab_run.hole = holes.not_implemented(name, directory, exercise.files,
                                             f"in {scenario.to_hypervisor}'s service partition, whose exit ended "
                                             f"the inverse call; {then}")
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
