"""Runs a reading exercise: traces a seeded hand-off with `hhr trace`, renders its JSON Lines, and asks the student's answer functions about it."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hypervisors import build
from tools.lab import hypervisor_run
from tools.lab.book import Exercise
from tools.lab.holes import HoleReached, not_implemented
from tools.lab.runs import LabRun
from tools.trace import render
from tools.trace import session as trace_session
from tools.trace.filters import Filters

ANSWERS_FILE = "answers.py"
# What an answer function is given: the hand-off's events only, or every record of the blackout.
EVENTS, BLACKOUT = "events", "blackout"
_RENDERINGS = {EVENTS: Filters(events_only=True), BLACKOUT: Filters(phases=frozenset({"blackout"}))}


ANSWER_SECONDS = 30                   # an answer function that takes longer is stopped


class AnswerTookTooLong(Exception):
    """An answer function ran past ANSWER_SECONDS."""


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Interrupts the block after `seconds` of host time (a student's loop must not hang the grader);
    only the main thread can be interrupted so, elsewhere the block runs unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signal, _frame):
        raise AnswerTookTooLong()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Question:
    """One question: step E#n-step is the function `function` of answers.py, given the records of
    `records` (EVENTS or BLACKOUT)."""

    step: int
    function: str
    records: str


@dataclass(frozen=True)
class Answer:
    value: Any = None
    error: str | None = None          # what went wrong instead, if anything


def trace_commands(scenario: hypervisor_run.Scenario) -> list[str]:
    """The `hhr trace` commands that record and render the scenario as the grader does."""
    machine = " ".join([f"--lps {scenario.lps}", *(f"--guest {guest}" for guest in scenario.guests),
                        f"--at {scenario.request_at}"])
    return [f"hhr trace {machine} --format hhrt -o handoff.hhrt",
            "hhr trace --input handoff.hhrt --events-only --format jsonl -o events.jsonl",
            "hhr trace --input handoff.hhrt --phase blackout --format jsonl -o blackout.jsonl"]


@lru_cache(maxsize=4)
def _rendered(scenario: hypervisor_run.Scenario) -> dict[str, tuple[str, ...]]:
    """Traces the scenario's hand-off (the package's own hypervisors) and keeps each rendering's
    JSON Lines; one trace serves every grading of the same seed in a process."""
    with tempfile.TemporaryDirectory(prefix="hhr-lab-trace-") as folder:
        trace_file = Path(folder) / "handoff.hhrt"
        trace_session.trace(trace_session.TraceOptions(
            guests=list(scenario.guests), lps=scenario.lps, request_at=[scenario.request_at], format="hhrt",
            output=str(trace_file)))
        lines = {}
        for name, filters in _RENDERINGS.items():
            output = Path(folder) / f"{name}.jsonl"
            render.render(str(trace_file), "jsonl", str(output), filters)
            lines[name] = tuple(output.read_text(encoding="utf-8").splitlines())
    return lines


def record(scenario: hypervisor_run.Scenario) -> dict[str, list[dict]]:
    """The records of each rendering of the scenario's hand-off, fresh for each caller."""
    return {name: [json.loads(line) for line in lines] for name, lines in _rendered(scenario).items()}


def _load_answers(path: Path):
    name = f"hhr_lab_answers_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _student_error(error: BaseException, path: Path) -> str:
    """The exception and the last line of the student's file it went through."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    where = f" at {path.name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def run(exercise: Exercise, directory: Path, seed: int, questions: tuple[Question, ...]) -> LabRun:
    scenario = hypervisor_run.seeded_scenario(seed)
    lab_run = LabRun(seed=seed, values={"lps": scenario.lps, "request_at": scenario.request_at})
    lab_run.extra["scenario"] = scenario
    path = (directory / ANSWERS_FILE).resolve()
    try:
        module = _load_answers(path)
    except Exception as error:                       # the student's file does not even load
        lab_run.build_error = _student_error(error, path) if not isinstance(error, SyntaxError) else \
            f"{path.name}:{error.lineno}: {error.msg}"
        return lab_run
    with build.sources(build.HERE):
        records = record(scenario)
    lab_run.extra["records"] = records
    answers = {}
    for question in questions:
        function = getattr(module, question.function, None)
        if function is None:
            answers[question.function] = Answer(error=f"{ANSWERS_FILE} has no function {question.function}")
            continue
        try:
            with _time_limit(ANSWER_SECONDS):
                answers[question.function] = Answer(function(records[question.records]))
        except HoleReached as hole:
            answers[question.function] = Answer(error=str(hole))
            if lab_run.hole is None:
                lab_run.hole = not_implemented(hole.name, directory, exercise.files)
        except AnswerTookTooLong:
            answers[question.function] = Answer(error=f"no answer within {ANSWER_SECONDS} s (a loop that never ends?)")
        except (Exception, SystemExit) as error:          # a student's bug, or exit(), ends only that answer
            answers[question.function] = Answer(error=_student_error(error, path))
    lab_run.extra["answers"] = answers
    lab_run.ending = f"every answer function asked ({scenario.describe()})"
    lab_run.notes = ["the same records, to look at: " + trace_commands(scenario)[0],
                     *(f"    then: {command}" for command in trace_commands(scenario)[1:]),
                     *(f"{name}() -> {answer.error or repr(answer.value)}" for name, answer in answers.items())]
    sys.modules.pop(module.__name__, None)
    return lab_run
