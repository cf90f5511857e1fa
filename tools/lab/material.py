"""Lays an exercise out for a student: its files with every hole's hint written above it, lab.inc, and for the hypervisor exercises a copy of the hypervisors' sources with the exercise's regions cut out."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from hypervisors import build
from tools.lab import holes
from tools.lab.book import Exercise, package_directory

COMMON_MATERIAL = "common"           # labs/common: includes every monitor exercise gets
HYPERVISOR_TREE = "hypervisors"      # where a hypervisor exercise's copy of the sources goes
# A region of the hypervisors' sources an exercise cuts out: from `;@lab E#n-m` to `;@lab end`.
_REGION = re.compile(r"^([ \t]*);@lab (E#\d+-\d+)[^\n]*\n(.*?)^[ \t]*;@lab end[^\n]*\n", re.MULTILINE | re.DOTALL)
_INCLUDE_LINE = f'%include "{holes.MACRO_INCLUDE}"\n'
_MAILBOX_LINE = "\n; where an unfilled hole leaves its number (lab.inc)\n    HOLE_MAILBOX\n"


_COMMENT = {".py": "#"}                  # the comment mark of a file, by suffix; assembly's otherwise


def hint_comment(exercise: Exercise, name: str, indent: str, suffix: str = ".s") -> str:
    """The comment written above a hole: its name, title, SDM section and hint."""
    hole = exercise.hole(name)
    mark = _COMMENT.get(suffix, ";")
    lines = [f"{name}  {hole.title} ({hole.sdm})"]
    lines += [f"  {line}" if line else "" for line in hole.hint.strip().splitlines()]
    return "".join(f"{indent}{mark} {line}".rstrip() + "\n" for line in lines)


def annotate(exercise: Exercise, path: Path) -> None:
    """Writes each hole's hint comment above its HOLE line in `path`."""
    text = path.read_text(encoding="utf-8")

    def with_hint(match: re.Match) -> str:
        name = holes.hole_name(int(match.group(2)), int(match.group(3)))
        return hint_comment(exercise, name, match.group(1), path.suffix) + match.group(0)
    path.write_text(holes.HOLE_LINE.sub(with_hint, text), encoding="utf-8")


def prepare_monitor(exercise: Exercise, directory: Path) -> None:
    """A monitor exercise: its files and the includes of labs/common it is given, lab.inc, hints
    above the holes."""
    directory.mkdir(parents=True)
    for name in exercise.includes:
        shutil.copy(package_directory() / COMMON_MATERIAL / name, directory / name)
    for relative in exercise.files:
        shutil.copy(exercise.material() / relative, directory / relative)
        annotate(exercise, directory / relative)
    (directory / holes.MACRO_INCLUDE).write_text(holes.macro_source(), encoding="utf-8")


def cut_regions(text: str, exercise: Exercise) -> tuple[str, list[str]]:
    """`text` with this exercise's marked regions replaced by their holes (hint and HOLE line), and
    every other exercise's markers dropped with their code kept; the names of the holes cut."""
    cut = []

    def replace(match: re.Match) -> str:
        indent, name, body = match.group(1), match.group(2), match.group(3)
        number, step = holes.parse_name(name)
        if number != exercise.number:
            return body
        cut.append(name)
        planted = exercise.hole(name).planted
        if planted is not None:
            return planted
        return hint_comment(exercise, name, indent) + f"{indent}HOLE {number}, {step}\n"
    return _REGION.sub(replace, text), cut


def region_texts(exercise: Exercise) -> dict[str, str]:
    """The code of each of the exercise's regions in the package's hypervisor sources: its solution."""
    found = {}
    for path in sorted(build.HERE.rglob("*")):
        if path.suffix in (".inc", ".s"):
            for match in _REGION.finditer(path.read_text(encoding="utf-8")):
                if holes.parse_name(match.group(2))[0] == exercise.number:
                    found[match.group(2)] = match.group(3)
    return found


def prepare_hypervisor(exercise: Exercise, directory: Path) -> None:
    """A hypervisor exercise: a copy of hypervisors/ (sources only) whose regions for this exercise
    are holes, with lab.inc included by both top sources."""
    tree = directory / HYPERVISOR_TREE
    shutil.copytree(build.HERE, tree, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    expected = {hole.name(exercise.number) for hole in exercise.holes}
    found = []
    for path in sorted(tree.rglob("*")):
        if path.suffix in (".inc", ".s"):
            text, cut = cut_regions(path.read_text(encoding="utf-8"), exercise)
            path.write_text(text, encoding="utf-8")
            found += cut
    if set(found) != expected:
        raise RuntimeError(f"exercise {exercise.number}: the hypervisor sources mark {sorted(found)}, "
                           f"the exercise defines {sorted(expected)}")
    (tree / build.COMMON_SOURCES.name / holes.MACRO_INCLUDE).write_text(holes.macro_source(), encoding="utf-8")
    for name in build.HYPERVISORS:
        top = tree / name / f"{name}.s"
        top.write_text(_INCLUDE_LINE + top.read_text(encoding="utf-8") + _MAILBOX_LINE, encoding="utf-8")


def prepare_answers(exercise: Exercise, directory: Path) -> None:
    """A reading exercise: its answer file, hints above the holes."""
    directory.mkdir(parents=True)
    for relative in exercise.files:
        shutil.copy(exercise.material() / relative, directory / relative)
        annotate(exercise, directory / relative)
