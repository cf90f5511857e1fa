"""Runs a monitor exercise: the student's root-mode program alone on the bare machine, with the guests and memory its exercise gives, chosen from a seed."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import asm
from asm.layout import Struct
from emu import msrs
from emu.machine import Machine
from emu.memory import MIB, PAGE_SIZE
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import MemoryType, make_eptp
from hypervisors import bare_monitor, boot, build, segments
from tools.gdb import elf_symbols
from tools.lab import holes
from tools.lab.book import Exercise
from tools.lab.runs import LabRun

# What the program finds at RSI when every LP starts (docs/labs/README.md "The lab machine").
LAB_INFO = Struct("lab_info", [
    ("seed", 8),                                   # this run's seed
    ("vmxon_region", 8), ("vmcs_region", 8),       # pages for VMXON and the VMCS (a canary in them)
    ("second_vmcs_region", 8),                     # a second VMCS page (two VPs)
    ("ept_pointer", 8),                            # an EPTP mapping the guest's RAM, 0 when you build it
    ("table_pool", 8), ("table_pool_size", 8),     # zeroed pages for your own tables
    ("guest_ram", 8), ("guest_ram_size", 8),       # host-physical base and size of the guest's RAM
    ("guest_entry", 8), ("guest_stack", 8),        # guest-physical RIP and RSP of the guest
    ("second_guest_entry", 8), ("second_guest_stack", 8),
    ("challenge", 8),                              # a value the guest and the checks use
])
# Where a monitor exercise keeps a guest's general registers between a VM exit and the next entry
# (they are the guest's at the exit and must be the guest's at the entry: docs/machine.md 7.7.2, 7.9.1).
GUEST_REGISTERS = Struct("guest_registers", [
    (name, 8) for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
                           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")])
LAB_INFO_ADDRESS = 0x9000                  # below 1 MiB, above the firmware page tables
LAB_CODE = bare_monitor.MONITOR_CODE       # where the program is loaded and started
STACK_TOP = bare_monitor.MONITOR_STACK_TOP
EXIT_STACK_TOP = bare_monitor.EXIT_STACK_TOP
REGION_POOL = (0x200000, 0x300000)         # the VMXON and VMCS pages are chosen from here
HARNESS_EPT = bare_monitor.EPT_ROOT        # the EPT the harness builds when the exercise does not
TABLE_POOL_RANGE = (0x400000, 0x800000)    # the table pool starts somewhere in here
TABLE_POOL_PAGES = 64
SECOND_GUEST_CODE = 0x20000                # guest-physical, the first guest's is bare_monitor.GUEST_CODE
SECOND_GUEST_STACK_TOP = 0xF000
RAM_SIZE = 64 * MIB
DEFAULT_BUDGET = 20_000_000                # instructions; a program that runs longer is stopped
DONE_VALUE = 0                             # `out DEBUG_EXIT_PORT, al` values of labs/common/support.inc
FAILED_VALUE = 1
SOURCE_FILE = "monitor.s"
SYMBOLS_FILE = "monitor.elf"               # written beside it for gdb when `hhr lab run --gdb` listens
PROGRAM_LABEL = "monitor"                  # how gdb's thread names call root mode
# A canary the harness writes where the program must write something, so that leaving it does not pass.
UNWRITTEN = 0x5EED_5EED


def constants() -> dict[str, int]:
    """Every name a monitor exercise may use: the hypervisors' (VMCS fields, VMX bits, MSRs, ports)
    and the lab machine's."""
    return asm.merge_constants(
        build.constants("hv1"),
        LAB_INFO.constants(),
        GUEST_REGISTERS.constants(),
        {name: getattr(msrs, name) for name in ("IA32_KERNEL_GS_BASE", "IA32_STAR", "IA32_LSTAR", "IA32_FMASK")},
        {"LAB_INFO_ADDRESS": LAB_INFO_ADDRESS, "LAB_EXIT_STACK_TOP": EXIT_STACK_TOP,
         "LAB_DONE": DONE_VALUE, "LAB_FAILED": FAILED_VALUE,
         "LAB_GUEST_CR0": int(bare_monitor.GUEST_CR0), "LAB_GUEST_CR4": int(bare_monitor.GUEST_CR4),
         "LAB_GUEST_EFER": int(bare_monitor.GUEST_EFER), "LAB_GUEST_CR3": bare_monitor.GUEST_PML4,
         "LAB_GUEST_GDT": bare_monitor.GUEST_GDT, "LAB_GUEST_TSS": bare_monitor.GUEST_TSS,
         "LAB_GUEST_IDT": bare_monitor.GUEST_IDT, "LAB_GUEST_IDT_LIMIT": bare_monitor.IDT_LIMIT,
         "LAB_EPT_MEMORY_TYPE": int(MemoryType.WB)},
        {"SEGMENT_" + name: value for name, value in segments.constants().items()
         if name.endswith(("ACCESS_RIGHTS", "LIMIT"))},
    )


@dataclass(frozen=True)
class MonitorSetup:
    """What a monitor exercise's machine holds besides the program: guests (assembly, guest-physical
    GUEST_CODE and SECOND_GUEST_CODE), whether the harness maps the guest's RAM with its own EPT,
    the instruction budget, and the exercise's own assembler constants (its guests' layout, which
    the program and the guests both use)."""

    guest: str | None = None
    second_guest: str | None = None
    harness_ept: bool = True
    budget: int = DEFAULT_BUDGET
    constants: dict[str, int] = field(default_factory=dict)
    # Writes the exercise's own seeded state into the machine; returns values the tests compare with.
    prepare: Callable[[Machine, random.Random, dict[str, int]], dict[str, int]] | None = None


def _distinct_pages(rng: random.Random, count: int) -> list[int]:
    first, end = REGION_POOL
    return [first + page * PAGE_SIZE for page in rng.sample(range((end - first) // PAGE_SIZE), count)]


def seeded_values(seed: int, setup: MonitorSetup) -> dict[str, int]:
    """The lab info block's values for `seed`."""
    rng = random.Random(seed)
    vmxon, vmcs, second_vmcs = _distinct_pages(rng, 3)
    pool_first, pool_end = TABLE_POOL_RANGE
    pool_pages = (pool_end - pool_first) // PAGE_SIZE - TABLE_POOL_PAGES
    return {
        "seed": seed, "vmxon_region": vmxon, "vmcs_region": vmcs, "second_vmcs_region": second_vmcs,
        "ept_pointer": make_eptp(HARNESS_EPT, MemoryType.WB) if setup.harness_ept else 0,
        "table_pool": pool_first + rng.randrange(pool_pages) * PAGE_SIZE,
        "table_pool_size": TABLE_POOL_PAGES * PAGE_SIZE,
        "guest_ram": bare_monitor.GUEST_HOST_BASE, "guest_ram_size": bare_monitor.GUEST_RAM,
        "guest_entry": bare_monitor.GUEST_CODE, "guest_stack": bare_monitor.GUEST_STACK_TOP,
        "second_guest_entry": SECOND_GUEST_CODE, "second_guest_stack": SECOND_GUEST_STACK_TOP,
        "challenge": rng.getrandbits(32) | 1,
    }


def run(exercise: Exercise, directory: Path, seed: int, setup: MonitorSetup) -> LabRun:
    """Assembles the exercise's monitor.s from `directory`, runs it on one LP and returns the run."""
    values = seeded_values(seed, setup)
    lab_run = LabRun(seed=seed, values=values)
    try:
        names = asm.merge_constants(constants(), setup.constants)
        image = asm.assemble_file(directory / SOURCE_FILE, LAB_CODE, constants=names, include_dirs=[directory])
        guest = asm.assemble(setup.guest, bare_monitor.GUEST_CODE, constants=names) if setup.guest else None
        second = (asm.assemble(setup.second_guest, SECOND_GUEST_CODE, constants=names)
                  if setup.second_guest else None)
    except (asm.AsmError, OSError) as error:
        lab_run.build_error = str(error)
        return lab_run
    machine = Machine(ram_size=RAM_SIZE, lps=1, record_events=True, seed=seed)
    machine.ram.write(LAB_INFO_ADDRESS, LAB_INFO.pack(**values))
    for region in ("vmxon_region", "vmcs_region", "second_vmcs_region"):
        machine.ram.write_u32(values[region], UNWRITTEN)
    if setup.harness_ept:
        bare_monitor.write_guest_ept(machine, HARNESS_EPT)
    bare_monitor.write_guest_tables(machine)
    if guest is not None:
        machine.load(bare_monitor.GUEST_HOST_BASE + guest.base, guest.code)
    if second is not None:
        machine.load(bare_monitor.GUEST_HOST_BASE + second.base, second.code)
    if setup.prepare is not None:
        values.update(setup.prepare(machine, random.Random(seed ^ CAPS.vmcs_revision_id), values))
    machine.load(LAB_CODE, image.code)
    machine.start(LAB_CODE, [STACK_TOP], argument=LAB_INFO_ADDRESS)
    if boot.observed():                       # a debugger listens: give it the program's symbols
        symbols = directory / SYMBOLS_FILE
        symbols.write_bytes(elf_symbols.elf(image, LAB_CODE))
        boot.announce(boot.BareBooted(machine, PROGRAM_LABEL, LAB_CODE, f"add-symbol-file {symbols}"))
    result = machine.run(max_instructions=setup.budget)
    lab_run.stop = result.stop
    lab_run.console = machine.io.console.text()
    lab_run.events = list(machine.events.events)
    lab_run.machine = machine
    lab_run.extra["image"] = image
    if guest is not None:
        lab_run.extra["guest_image"] = guest
    if second is not None:
        lab_run.extra["second_guest_image"] = second
    lab_run.hole = holes.stopped_at(machine, result.stop, directory, exercise.files, image.symbolize)
    return lab_run
