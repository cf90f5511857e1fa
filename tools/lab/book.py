"""The lab book's model: an exercise, its holes with their hints, its graded tests and its planted mistakes."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tools.lab.holes import hole_name
from tools.lab.runs import LabRun

EXERCISES_PACKAGE = "labs"          # labs/exNN_slug/__init__.py each define EXERCISE
SOLUTIONS = "solutions"             # labs/solutions/NN.s: one solution per exercise


class Expected(Exception):
    """A test's check failed: what it expected and what came."""

    def __init__(self, expected: str, came: str):
        super().__init__(f"expected {expected}; came {came}")
        self.expected = expected
        self.came = came


@dataclass(frozen=True)
class Hole:
    """One hole of an exercise: E#exercise-step, what to write there, and a hint quoting the SDM."""

    step: int
    title: str
    sdm: str                      # the SDM section (or machine manual section) the step follows
    hint: str
    # A planted bug instead of a HOLE line: the code the exercise's copy holds in the region, with
    # no hint beside it (finding it is the exercise); the solution replaces it.
    planted: str | None = None

    def name(self, exercise: int) -> str:
        return hole_name(exercise, self.step)


@dataclass(frozen=True)
class Test:
    """A graded test: `check(run)` raises Expected when the run shows the step was not done right."""

    name: str
    points: int
    hole: str | None              # the hole whose code the test checks, named in a failure
    description: str
    check: Callable[[LabRun], None]


@dataclass(frozen=True)
class Mistake:
    """One deliberate mistake in a solution: `old` replaced by `new` inside the solution's block for
    `hole`; grading it must lose exactly the points of the tests in `fails`."""

    hole: str
    old: str
    new: str
    fails: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Exercise:
    """One exercise: the files a student edits (`files`, relative to the exercise's working
    directory), how `hhr lab start` lays them out (`prepare`), how a run goes (`run`), the tests
    that grade it and the mistakes the project's tests plant in its solution."""

    number: int
    slug: str
    title: str
    summary: str
    files: tuple[str, ...]
    holes: tuple[Hole, ...]
    tests: tuple[Test, ...]
    mistakes: tuple[Mistake, ...]
    prepare: Callable[["Exercise", Path], None]
    run: Callable[["Exercise", Path, int], LabRun]
    includes: tuple[str, ...] = ("support.inc",)   # files of labs/common the exercise is given
    # What a solution holds besides its blocks, made in the exercise's folder the way a student makes
    # it (the finding `hhr fuzz` saves, say): labs/solutions cannot hold it, it belongs to one build.
    solution_extra: Callable[["Exercise", Path], None] | None = None

    @property
    def directory_name(self) -> str:
        return f"{self.number:02d}-{self.slug}"

    @property
    def points(self) -> int:
        return sum(test.points for test in self.tests)

    def hole(self, name: str) -> Hole:
        for hole in self.holes:
            if hole.name(self.number) == name:
                return hole
        raise KeyError(f"exercise {self.number} has no hole {name}")

    def solution_path(self) -> Path:
        """labs/solutions/NN.s, or NN.txt for an exercise answered in Python (its blocks are no module)."""
        suffix = ".txt" if Path(self.files[0]).suffix == ".py" else ".s"
        return package_directory() / SOLUTIONS / f"{self.number:02d}{suffix}"

    def material(self) -> Path:
        """The exercise's own files in the package (labs/exNN_slug/, a slug's hyphens as underscores:
        the folder is a Python package)."""
        return package_directory() / f"ex{self.number:02d}_{self.slug.replace('-', '_')}"


def package_directory() -> Path:
    return Path(importlib.import_module(EXERCISES_PACKAGE).__file__).resolve().parent


def exercises() -> dict[int, Exercise]:
    """Every exercise of the lab book, by number."""
    package = importlib.import_module(EXERCISES_PACKAGE)
    found = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("ex") and module.ispkg:
            exercise = importlib.import_module(f"{EXERCISES_PACKAGE}.{module.name}").EXERCISE
            found[exercise.number] = exercise
    return dict(sorted(found.items()))


def exercise(number: int) -> Exercise:
    book = exercises()
    if number not in book:
        raise LookupError(f"there is no exercise {number}; the lab book has {', '.join(map(str, book))} "
                          f"(hhr lab list)")
    return book[number]
