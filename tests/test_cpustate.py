"""The cpustate guest (guests/builtin/cpustate.inc): it checks every value it sets, gives each VP values
of its own, keeps them all while VPs share an LP, and reports a value that changed."""
from __future__ import annotations

import re

import pytest

from asm import assemble
from guests import catalog, cpustate_layout
from hypervisors import boot, layouts
from hypervisors.memory_map import GUEST_LOAD_ADDRESS
from tools import run as run_module

SOURCE = (catalog.BUILTIN_DIRECTORY / "cpustate.inc").read_text()
ROUNDS = int(re.search(r"%define ROUNDS (\d+)", (catalog.BUILTIN_DIRECTORY / "cpustate.s").read_text()).group(1))
CHECKED_SLOTS = re.findall(r"^\s+CHECK SLOT_(\w+),", SOURCE, re.MULTILINE)
# Each ST and XMM register is checked in two halves.
CHECKS = len(CHECKED_SLOTS) + len(re.findall(r"^\s+FX_CHECK FX_\w+,", SOURCE, re.MULTILINE)) \
    + 2 * len(re.findall(r"^\s+(?:ST|XMM)_CHECK \d+,", SOURCE, re.MULTILINE))
X87_REGISTERS, XMM_REGISTERS = 8, 16
# Values every VP holds alike: the TSS and LDT selectors, the GDT's limit, CR0 and CR4 (not set);
# EFER and CS take one of two values (odd and even VPs).
SAME_IN_EVERY_VP = {"TR", "LDTR", "GDTR_LIMIT", "CR0", "CR4"}
TWO_VALUES = {"EFER", "CS"}
LDT_SEGMENT = "ES"          # odd VPs load it from their LDT
FX_IMAGE_BYTES = 512
FX_CHECKED = [(0, 5), (24, 4)] + [(32 + 16 * register, 10) for register in range(X87_REGISTERS)] \
    + [(160 + 16 * register, 16) for register in range(XMM_REGISTERS)]     # (offset, bytes): SDM Vol. 1 Table 10-2


def summary(vp: int, changed: int = 0) -> str:
    if changed:
        return f"cpustate vp {vp}: {changed} of {CHECKS} values changed after {ROUNDS} checks\n"
    return f"cpustate vp {vp}: all {CHECKS} values intact after {ROUNDS} checks\n"


def test_every_value_slot_is_checked_once():
    assert sorted(CHECKED_SLOTS) == sorted(cpustate_layout.SLOTS)
    assert CHECKS == len(cpustate_layout.SLOTS) + 2 + 2 * (X87_REGISTERS + XMM_REGISTERS)


@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
@pytest.mark.parametrize("vps, lps", [(3, 1), (5, 2)])
def test_vps_sharing_an_lp_keep_every_value(hypervisor, vps, lps):
    document = run_module.run(hypervisor, [f"cpustate,vps={vps}"], lps=lps).document
    cpustate = document["guests"][0]
    assert cpustate["state"] == "exited", f"cpustate {cpustate['state']} by {cpustate['stop_reason']}"
    assert cpustate["console"] == "".join(summary(vp) for vp in range(vps))
    assert cpustate["exit_code"] == 0


def area(booted, vp: int, name: str, size: int) -> bytes:
    base = booted.partitions()[0]["memory"] + cpustate_layout.VP_AREAS + vp * cpustate_layout.VP_AREA_BYTES
    return booted.machine.ram.read(base + cpustate_layout.AREA_OFFSETS[name], size)


def test_every_vp_gives_each_value_a_value_of_its_own():
    vps = 4
    booted = boot.boot([catalog.parse(f"cpustate,vps={vps}")], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=4_000_000)
    assert booted.partitions()[0]["state"] == layouts.PARTITION_RUNNING, f"cpustate ended: {booted.partitions()[0]}"
    rounds = [int.from_bytes(area(booted, vp, "ROUNDS", 8), "little") for vp in range(vps)]
    assert all(rounds), f"a VP has not checked yet: {rounds}"
    slot_bytes = len(cpustate_layout.SLOTS) * cpustate_layout.SLOT_BYTES
    tables = [area(booted, vp, "EXPECTED", slot_bytes) for vp in range(vps)]
    for number, name in enumerate(cpustate_layout.SLOTS):
        values = [int.from_bytes(table[8 * number:8 * number + 8], "little") for table in tables]
        distinct = 1 if name in SAME_IN_EVERY_VP else 2 if name in TWO_VALUES else vps
        if name == LDT_SEGMENT:
            distinct = vps // 2 + 1         # the even VPs' GDT selectors, and the odd VPs' one LDT selector
        assert len(set(values)) == distinct, (name, [hex(value) for value in values])
    images = [area(booted, vp, "FX_EXPECTED", FX_IMAGE_BYTES) for vp in range(vps)]
    for offset, size in FX_CHECKED:
        assert len({image[offset:offset + size] for image in images}) == vps, f"FXSAVE image bytes at {offset}"


# Each mutation changes one value after cpustate set it: (name, text replaced, replacement, checks that see it).
MUTATIONS = [
    ("general register", "    popfq\nsled:", "    popfq\n    lea r11, [r11 + 1]\nsled:", ["r11"]),
    ("flags", "    popfq\nsled:", "    popfq\n    cmc\nsled:", ["rflags"]),
    ("control register", "    mov cr2, rax\n", "    not rax\n    mov cr2, rax\n", ["cr2"]),
    ("xmm register", "    movdqu xmm9, xmmword ptr", "    movq xmm9, qword ptr", ["xmm9 high"]),
    ("msr", "    .long IA32_FS_BASE, SLOT_FS_BASE\n", "", ["fs base", "qword at fs:0"]),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[mutation[0] for mutation in MUTATIONS])
def test_a_value_that_changed_is_reported_once_and_fails_the_guest(mutation, tmp_path):
    _, old, new, names = mutation
    assert SOURCE.count(old) == 1
    source = (catalog.BUILTIN_DIRECTORY / "cpustate.s").read_text().replace(
        '%include "cpustate.inc"', SOURCE.replace(old, new))
    image = tmp_path / "mutant.bin"
    image.write_bytes(assemble(source, GUEST_LOAD_ADDRESS, constants=catalog.builtin_constants("cpustate"),
                               filename=str(catalog.BUILTIN_DIRECTORY / "cpustate.s")).code)
    vps = 2
    document = run_module.run("hv1", [f"{image},vps={vps}"], lps=1).document
    mutant = document["guests"][0]
    assert mutant["state"] == "exited", f"the mutant {mutant['state']} by {mutant['stop_reason']}"
    lines = mutant["console"].splitlines(keepends=True)
    for vp in range(vps):
        reported = [line for line in lines if line.startswith(f"cpustate vp {vp}: ") and " expected " in line]
        assert [line.split(": ", 1)[1].split(" expected ")[0] for line in reported] == names, mutant["console"]
        assert all(re.fullmatch(r".* expected 0x[0-9a-f]{16}, found 0x[0-9a-f]{16}\n", line) for line in reported)
        assert summary(vp, len(names)) in lines
    assert (mutant["state"], mutant["exit_code"]) == ("exited", 1)
