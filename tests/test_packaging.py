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
