"""Where a student's exercises live: a working directory with one folder per exercise, never the package."""
from __future__ import annotations

import shutil
from pathlib import Path

from tools.lab.book import Exercise

MARKER = ".hhr-lab"                  # marks a lab working directory
DEFAULT_DIRECTORY = "hhr-lab"        # made in the current directory by the first `hhr lab start`


def locate(explicit: str | None = None) -> Path:
    """The working directory: the one given, else the current directory or its parent when either
    is one (a student inside an exercise's folder), else ./hhr-lab."""
    if explicit is not None:
        return Path(explicit).resolve()
    here = Path.cwd()
    for candidate in (here, here.parent):
        if (candidate / MARKER).exists():
            return candidate
    return here / DEFAULT_DIRECTORY


def exercise_directory(exercise: Exercise, workspace: Path) -> Path:
    """The exercise's folder in the working directory; LookupError when it was never started."""
    directory = workspace / exercise.directory_name
    if not directory.is_dir():
        raise LookupError(f"exercise {exercise.number} is not started in {workspace}: "
                          f"run `hhr lab start {exercise.number}` first")
    return directory


def start(exercise: Exercise, workspace: Path) -> Path:
    """Lays the exercise out in the working directory; refuses to overwrite a student's work."""
    directory = workspace / exercise.directory_name
    if directory.exists():
        raise FileExistsError(f"{directory} exists already: your work is there (remove it to start over)")
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("hhr lab working directory\n", encoding="utf-8")
    try:
        exercise.prepare(exercise, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory
