"""docs/architecture.md names only files and functions that exist, so the map cannot drift from the code."""
from __future__ import annotations

import re

from tests.conftest import REPOSITORY_ROOT

PAGE = REPOSITORY_ROOT / "docs" / "architecture.md"
FILE_NAME = re.compile(r"`((?:[a-z_0-9]+/)*[a-z_0-9]+\.(?:py|c|h|s|inc|md))`")
SOURCE_SUFFIXES = (".py", ".c", ".h", ".s", ".inc")
# `name` (a function or label the page says a file holds) is looked for in every source file.
CODE_NAME = re.compile(r"`([a-z][a-z_0-9]*_[a-z_0-9]+)`")


def sources_text() -> str:
    return "\n".join(path.read_text() for suffix in SOURCE_SUFFIXES
                     for part in ("emu", "hypervisors", "tools", "bench", "guests", "asm")
                     for path in (REPOSITORY_ROOT / part).rglob(f"*{suffix}"))


def resolve(name: str):
    """A file the page names: a path from the repository root, or a bare file name found anywhere."""
    direct = REPOSITORY_ROOT / name
    if direct.exists() or (REPOSITORY_ROOT / "docs" / name).exists():
        return direct
    found = [path for path in REPOSITORY_ROOT.rglob(name) if ".venv" not in path.parts]
    return found[0] if found else None


def test_every_file_the_page_names_exists():
    named = set(FILE_NAME.findall(PAGE.read_text()))
    assert named, "the page names no file: the pattern is wrong"
    assert sorted(name for name in named if resolve(name) is None) == []


def test_every_function_and_label_the_page_names_is_in_the_code():
    text = sources_text()
    named = set(CODE_NAME.findall(PAGE.read_text()))
    assert len(named) > 10, named
    missing = sorted(name for name in named if not re.search(rf"\b{re.escape(name)}\b", text))
    assert missing == []
