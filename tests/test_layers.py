"""The module graph is layered (docs/architecture.md): each module imports only from its own layer or those
below it, so nothing imports the CLI and the CLI may import everything."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("asm", "emu", "hypervisors", "guests", "tools", "bench")

# Lowest first. A module belongs to the layer of the longest prefix naming it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("toolchain", ("asm",)),
    ("machine", ("emu",)),
    ("hypervisors and the restart protocol", ("hypervisors",)),
    ("guests", ("guests",)),
    ("measuring parts", ("tools.run", "tools.faults", "tools.host_clock", "tools.phase_meter", "tools.blackout",
                         "tools.digest_check", "tools.harness")),
    ("the restart operator", ("tools.restart",)),
    ("trace and fuzz", ("tools.trace", "tools.trace_chrome", "tools.fuzz")),
    ("benchmarks", ("bench",)),
    ("command line", ("tools.cli",)),
)


def layer_of(module: str) -> int:
    best, found = -1, None
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), number
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return found


def modules() -> dict[str, Path]:
    """Every module of the packages, but a package's `__init__` that holds no code (tools, bench): it
    is in no layer, and importing a module through it (`from tools import restart`) is that module's."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if name in PACKAGES and not ast.parse(path.read_text(encoding="utf-8")).body:
                continue
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_every_module_imports_only_its_own_layer_or_below():
    known = modules()
    wrong = []
    for name, path in known.items():
        own = layer_of(name)
        for imported in sorted(imports(path, known)):
            if layer_of(imported) > own:
                wrong.append(f"{name} ({LAYERS[own][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_command_line():
    known = modules()
    importers = [name for name, path in known.items() if name != "tools.cli" and "tools.cli" in imports(path, known)]
    assert importers == []


def test_the_check_sees_a_wrong_import():
    """The check itself: an import from a higher layer is caught."""
    assert layer_of("tools.restart") > layer_of("tools.blackout") > layer_of("hypervisors.timeline")
    assert layer_of("bench.restart_scenarios") < layer_of("tools.cli")
    assert layer_of("tools.trace.session") > layer_of("tools.restart")
