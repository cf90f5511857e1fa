"""The installed package carries every source file the tools read at run time: hypervisor assembly,
built-in guests, the C fast path (pyproject.toml's package data matches each of them)."""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_SOURCE_SUFFIXES = (".s", ".inc", ".c", ".h")


def test_package_data_covers_every_runtime_source():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]
    missing = []
    for package in setuptools["packages"]:
        for path in sorted((ROOT / package).rglob("*")):
            if path.suffix not in RUNTIME_SOURCE_SUFFIXES:
                continue
            relative = path.relative_to(ROOT / package).as_posix()
            wanted = patterns.get(package, []) + patterns.get("*", [])
            if not any(fnmatch(relative, pattern) and pattern.count("/") == relative.count("/") for pattern in wanted):
                missing.append(f"{package}/{relative}")
    assert not missing, f"not in pyproject.toml's package data: {missing}"


def test_every_python_package_of_the_tree_is_installed():
    """A folder of modules under a listed package is a package `pip install .` must list too (an
    editable install and the tests, run from the tree, would not notice it missing)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for package in listed:
        for init in (ROOT / package.replace(".", "/")).rglob("__init__.py"):
            found.add(init.parent.relative_to(ROOT).as_posix().replace("/", "."))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
