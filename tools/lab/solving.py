"""Fills an exercise with its solution, or with its solution and one planted mistake: what the project's tests grade to prove the grader can fail."""
from __future__ import annotations

from pathlib import Path

from tools.lab import holes, workspace
from tools.lab.book import Exercise, Mistake


def solution_blocks(exercise: Exercise) -> dict[str, str]:
    """The solution file's block for each hole of the exercise."""
    return holes.parse_solution(exercise.solution_path().read_text(encoding="utf-8"))


def with_mistake(blocks: dict[str, str], mistake: Mistake) -> dict[str, str]:
    """`blocks` with `mistake` planted in its hole's block; ValueError unless `old` occurs there once."""
    block = blocks[mistake.hole]
    if block.count(mistake.old) != 1:
        raise ValueError(f"mistake {mistake.what!r}: {mistake.old!r} occurs {block.count(mistake.old)} times "
                         f"in the solution of {mistake.hole}, not once")
    return {**blocks, mistake.hole: block.replace(mistake.old, mistake.new)}


def _fix_planted(exercise: Exercise, directory: Path, blocks: dict[str, str]) -> list[str]:
    """Replaces each planted bug's code (found once in the exercise's files) with its solution block."""
    fixed = []
    for hole in exercise.holes:
        if hole.planted is None:
            continue
        name = hole.name(exercise.number)
        for relative in exercise.files:
            path = directory / relative
            text = path.read_text(encoding="utf-8")
            if text.count(hole.planted) == 1:
                path.write_text(text.replace(hole.planted, blocks[name]), encoding="utf-8")
                fixed.append(name)
                break
        else:
            raise ValueError(f"{name}: the planted code is not in {', '.join(exercise.files)} exactly once")
    return fixed


def start_filled(exercise: Exercise, where: Path, mistake: Mistake | None = None) -> Path:
    """Starts the exercise in `where` and pastes the solution (with `mistake`, if any) into every hole."""
    directory = workspace.start(exercise, where)
    blocks = solution_blocks(exercise)
    if mistake is not None:
        blocks = with_mistake(blocks, mistake)
    filled = holes.fill(directory, exercise.files, blocks)
    filled += _fix_planted(exercise, directory, blocks)
    if exercise.solution_extra is not None:
        exercise.solution_extra(exercise, directory)
    expected = {hole.name(exercise.number) for hole in exercise.holes}
    if set(filled) != expected:
        raise ValueError(f"exercise {exercise.number}: the solution filled {sorted(filled)}, the holes are "
                         f"{sorted(expected)}")
    return directory
