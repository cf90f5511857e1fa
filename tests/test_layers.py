"""The parts of hhr import only downwards (docs/architecture.md, "The parts and what each may use").

Layers, lowest first: asm (the toolchain) < emu (the machine) < hypervisors (images, boot, the
transfer protocol's layouts) < guests < tools (the libraries behind each command) < labs (the lab
book's exercises) < bench < tools.cli (the command line, which nothing imports). A module may import its own layer and those
below; tests import anything.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY_ROOT

LAYERS = ("asm", "emu", "hypervisors", "guests", "tools", "labs", "bench", "tools.cli")


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name, None for modules outside hhr's parts (stdlib, unicorn, tests)."""
    best = None
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = index          # later, longer prefixes (tools.cli) win over their package (tools)
    return best


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in {layer.split(".")[0] for layer in LAYERS}:
        for path in (REPOSITORY_ROOT / package).rglob("*.py"):
            modules[".".join(path.relative_to(REPOSITORY_ROOT).with_suffix("").parts)] = path
    return modules


def imported_modules(path: Path) -> set[str]:
    """Every absolute import in a file, as the dotted names it may mean (`from a import b`: a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_against(order, describe) -> list[str]:
    """Every import from a module to a module `order` ranks higher (`order`: a name's rank, or None
    for names it does not rank), each as `describe(module, own rank, name, its rank)` says."""
    found = []
    for module, path in sorted(product_modules().items()):
        own = order(module)
        for name in sorted(imported_modules(path)):
            target = order(name)
            if target is not None and own is not None and target > own:
                found.append(describe(module, own, name, target))
    return found


def upward_imports() -> list[str]:
    return imports_against(layer_of, lambda module, own, name, target:
                           f"{module} ({LAYERS[own]}) imports {name} ({LAYERS[target]})")


def test_every_part_imports_only_its_own_layer_and_those_below():
    assert upward_imports() == []


@pytest.mark.parametrize("module, layer", [("emu.machine", "emu"), ("tools.cli", "tools.cli"),
                                           ("tools.restart", "tools"), ("bench", "bench"), ("unicorn", None)])
def test_layers_are_read_by_the_longest_prefix(module, layer):
    assert layer_of(module) == (LAYERS.index(layer) if layer else None)


def test_an_upward_import_is_found(tmp_path, monkeypatch):
    offending = tmp_path / "emu" / "offender.py"
    offending.parent.mkdir()
    offending.write_text("from tools import restart\n")
    monkeypatch.setattr(sys.modules[__name__], "product_modules", lambda: {"emu.offender": offending})
    assert upward_imports() == ["emu.offender (emu) imports tools (tools)",
                                "emu.offender (emu) imports tools.restart (tools)"]


# Inside tools, lowest first: the libraries and the restart report's parts, the restart operator that
# composes them, the commands that drive a restart and follow it (trace and fuzz), the GDB stub,
# which names contexts as traces do, and the lab book's runners and grader, which use them all. A module of
# tools in none of these (tools.cli, tools.fingerprint) is ordered by LAYERS alone.
TOOLS_LAYERS = (
    ("tools.run", "tools.faults", "tools.host_clock", "tools.phase_meter", "tools.blackout", "tools.digest_check"),
    ("tools.restart",),
    ("tools.trace", "tools.trace_chrome", "tools.fuzz"),
    ("tools.gdb",),
    ("tools.lab",),
)


def tools_layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(TOOLS_LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def upward_imports_inside_tools() -> list[str]:
    return imports_against(tools_layer_of, lambda module, own, name, target: f"{module} imports {name}")


def test_inside_tools_the_parts_are_below_the_operator_and_the_operator_below_trace_and_fuzz():
    assert upward_imports_inside_tools() == []
    assert tools_layer_of("tools.blackout") < tools_layer_of("tools.restart") < tools_layer_of("tools.trace.session")
    assert tools_layer_of("tools.cli") is None


def test_an_upward_import_inside_tools_is_found(tmp_path, monkeypatch):
    offending = tmp_path / "tools" / "blackout.py"
    offending.parent.mkdir()
    offending.write_text("from tools import restart\n")
    monkeypatch.setattr(sys.modules[__name__], "product_modules", lambda: {"tools.blackout": offending})
    assert upward_imports_inside_tools() == ["tools.blackout imports tools.restart"]
