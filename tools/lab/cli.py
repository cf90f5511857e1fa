"""`hhr lab list | start | run | hint | grade`: the lab book from the command line."""
from __future__ import annotations

import argparse
import os
import sys

from tools.lab import book, grading, workspace

USAGE_ERROR = 2
BELOW_FULL_MARKS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lab = parser.add_subparsers(dest="lab_command", required=True)
    lab.add_parser("list", help="the exercises, and which are started in the working directory")
    start = lab.add_parser("start", help="copy exercise N into the working directory (never into the package)")
    start.add_argument("number", type=int)
    start.add_argument("directory", nargs="?", help="the working directory (default ./hhr-lab)")
    run = lab.add_parser("run", help="run your exercise N once and show what the machine did")
    hint = lab.add_parser("hint", help="the hints of exercise N (or of step M only)")
    hint.add_argument("number", type=int)
    hint.add_argument("step", type=int, nargs="?")
    grade = lab.add_parser("grade", help="grade exercise N, or every started exercise; exit status 1 below "
                                         "full marks")
    for sub, number in ((run, "number"), (grade, "number")):
        sub.add_argument(number, type=int, nargs="?" if sub is grade else None)
        sub.add_argument("--dir", help="the working directory (default: the current one if it is one, or its "
                                       "parent, else ./hhr-lab)")
        sub.add_argument("--seed", type=lambda text: int(text, 0),
                         help="the seed of the values the grader chooses (default: a new one, printed)")
    run.add_argument("--gdb", metavar="[HOST:]PORT",
                     help="serve gdb while it runs (docs/gdb.md); a monitor exercise writes monitor.elf with "
                          "its labels beside monitor.s: add-symbol-file it")
    list_parser = lab._name_parser_map["list"]
    list_parser.add_argument("--dir", help="the working directory")


def run_command(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.lab_command](args)
    except (LookupError, FileExistsError, FileNotFoundError) as error:
        print(f"hhr lab {args.lab_command}: {error.args[0] if error.args else error}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:             # `hhr lab grade | head`: the reader has gone before the report ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # and Python's flush at exit with it
        return BELOW_FULL_MARKS


def _list(args: argparse.Namespace) -> int:
    where = workspace.locate(args.dir)
    print(f"working directory: {where}")
    for exercise in book.exercises().values():
        started = "started" if (where / exercise.directory_name).is_dir() else ""
        print(f"{exercise.number:>3}  {exercise.title:<44} {exercise.points:>3} points  {started}")
        print(f"     {exercise.summary}")
    return 0


def _start(args: argparse.Namespace) -> int:
    exercise = book.exercise(args.number)
    directory = workspace.start(exercise, workspace.locate(args.directory))
    print(f"exercise {exercise.number}, {exercise.title}: {directory}")
    planted = all(hole.planted is not None for hole in exercise.holes)
    print(f"edit: {', '.join(exercise.files)}" + (" (a bug is planted in it: hhr lab hint "
                                                  f"{exercise.number})" if planted else
                                                  f" (the HOLE lines, E#{exercise.number}-1 first)"))
    print(f"read: docs/labs/{exercise.directory_name}.md")
    print(f"then: hhr lab run {exercise.number}   and   hhr lab grade {exercise.number}")
    return 0


def _hint(args: argparse.Namespace) -> int:
    exercise = book.exercise(args.number)
    chosen = [hole for hole in exercise.holes if args.step in (None, hole.step)]
    if not chosen:
        raise LookupError(f"exercise {exercise.number} has no step {args.step}")
    for hole in chosen:
        print(f"{hole.name(exercise.number)}  {hole.title} ({hole.sdm})")
        print("\n".join(f"    {line}" for line in hole.hint.strip().splitlines()))
        print()
    return 0


def _run(args: argparse.Namespace) -> int:
    exercise = book.exercise(args.number)
    directory = workspace.exercise_directory(exercise, workspace.locate(args.dir))
    seed = args.seed if args.seed is not None else grading.new_seed()
    print(f"exercise {exercise.number} in {directory} (seed {seed:#x})")
    lab_run = exercise.run(exercise, directory, seed)
    if lab_run.console:
        print("--- console ---")
        sys.stdout.write(lab_run.console if lab_run.console.endswith("\n") else lab_run.console + "\n")
        print("---------------")
    for line in lab_run.notes:
        print(line)
    print(lab_run.summary())
    return 0 if lab_run.build_error is None and lab_run.hole is None else BELOW_FULL_MARKS


def _grade(args: argparse.Namespace) -> int:
    where = workspace.locate(args.dir)
    chosen = [book.exercise(args.number)] if args.number is not None else list(book.exercises().values())
    seed = args.seed if args.seed is not None else grading.new_seed()
    total = earned = 0
    for exercise in chosen:
        total += exercise.points
        directory = where / exercise.directory_name
        if not directory.is_dir():
            print(f"== exercise {exercise.number}: {exercise.title}: not started (hhr lab start "
                  f"{exercise.number}) 0/{exercise.points}")
            continue
        result = grading.grade(exercise, directory, seed)
        print("\n".join(grading.render(result)))
        earned += result.score
    if len(chosen) > 1:
        print(f"total: {earned}/{total}")
    return 0 if earned == total else BELOW_FULL_MARKS


_COMMANDS = {"list": _list, "start": _start, "hint": _hint, "run": _run, "grade": _grade}
