"""Grades an exercise as gradelib does: one run on a seed, named tests with points, a line for each failure."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tools.lab.book import Exercise, Expected, Test
from tools.lab.runs import LabRun

SEED_BYTES = 4                       # a grading run's seed: printed, and given back with --seed


def new_seed() -> int:
    """A fresh seed for a grading run, so that no answer can be written in advance."""
    return int.from_bytes(os.urandom(SEED_BYTES), "little")


@dataclass(frozen=True)
class TestResult:
    test: Test
    earned: int
    message: str | None           # None when the test passed


@dataclass(frozen=True)
class Grade:
    exercise: Exercise
    seed: int
    run: LabRun
    results: tuple[TestResult, ...]
    seconds: float

    @property
    def score(self) -> int:
        return sum(result.earned for result in self.results)

    @property
    def full_marks(self) -> bool:
        return self.score == self.exercise.points

    def failed(self) -> set[str]:
        return {result.test.name for result in self.results if result.message is not None}


def _check(test: Test, run: LabRun) -> str | None:
    """None if `test` passes on `run`, else what it expected and what came."""
    if run.build_error is not None:
        return f"the sources to build; came {run.build_error}"
    try:
        test.check(run)
    except Expected as failure:
        return str(failure)
    except Exception as error:                                  # a check that breaks is the grader's bug
        return f"internal error of the grader in test {test.name}: {type(error).__name__}: {error}"
    return None


def grade(exercise: Exercise, directory: Path, seed: int) -> Grade:
    """Runs the exercise in `directory` once on `seed` and applies every test to that run."""
    started = time.perf_counter()
    run = exercise.run(exercise, directory, seed)
    results = []
    for test in exercise.tests:
        message = _check(test, run)
        results.append(TestResult(test, test.points if message is None else 0, message))
    return Grade(exercise, seed, run, tuple(results), time.perf_counter() - started)


def _indented(text: str, indent: str) -> list[str]:
    """`text` as report lines under a test's line; a continuation line is indented once more."""
    first, *rest = text.splitlines() or [""]
    return [indent + first] + [indent + "    " + line for line in rest]


def render(grade: Grade) -> list[str]:
    """The grader's report: a line per test, and for a failure what was expected, what came, how the
    run ended and the step to look at."""
    exercise = grade.exercise
    lines = [f"== exercise {exercise.number}: {exercise.title} (seed {grade.seed:#x}) =="]
    width = max(len(result.test.description) for result in grade.results)
    ending_shown = False
    for result in grade.results:
        test = result.test
        verdict = "OK" if result.message is None else "FAIL"
        lines.append(f"{test.description:<{width}}  {verdict:<4} ({result.earned}/{test.points})")
        if result.message is None:
            continue
        lines += _indented(result.message, "    ")
        if not ending_shown and (grade.run.ended_abnormally() or grade.run.entry_failure() is not None):
            lines += _indented(f"the run: {grade.run.summary()}", "    ")
            ending_shown = True
        if test.hole is not None:
            number = exercise.hole(test.hole).step
            lines.append(f"    look at {test.hole}: {exercise.hole(test.hole).title} "
                         f"(hhr lab hint {exercise.number} {number})")
    lines.append(f"score: {grade.score}/{exercise.points} ({grade.seconds:.1f} s)")
    return lines
