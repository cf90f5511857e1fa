"""The machine's parts use narrow collaborators, not the Machine: only the machine itself, the snapshot
(the sum of the parts' states), the fuzzer's checkpoints (whole-machine snapshots) and the count of
machines alive hold one."""
from __future__ import annotations

import ast
from pathlib import Path

import emu

EMU = Path(emu.__file__).parent
# The modules that may hold the whole Machine, and why.
HOLD_THE_MACHINE = {
    "machine.py": "it is the machine",
    "snapshot.py": "a snapshot is the sum of every part's state",
    "dirty.py": "Checkpoints take and restore whole-machine snapshots",
    "lifetime.py": "it counts the machines alive (reading none of their parts) to collect dropped ones",
}


def machine_references(path: Path) -> set[str]:
    """Names and attributes called `machine`, and imports of emu.machine, in one module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "machine":
            found.add("name machine")
        elif isinstance(node, ast.Attribute) and node.attr == "machine":
            found.add("attribute .machine")
        elif isinstance(node, ast.ImportFrom) and node.module == "emu.machine":
            found.add("import of emu.machine")
        elif isinstance(node, ast.arg) and node.arg == "machine":
            found.add("argument machine")
    return found


def test_only_the_machine_snapshots_and_checkpoints_hold_the_machine():
    holders = {path.name: sorted(machine_references(path)) for path in sorted(EMU.glob("*.py"))
               if machine_references(path)}
    assert set(holders) <= set(HOLD_THE_MACHINE), holders


def test_snapshot_and_checkpoints_do_hold_it():
    """The check above looks at what it should: the modules that hold the machine are found."""
    for name in HOLD_THE_MACHINE:
        assert machine_references(EMU / name), name
