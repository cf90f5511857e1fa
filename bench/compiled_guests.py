"""gcc-built guests (guests/examples) under hv1 on the machine against the same ELF on bare Unicorn.

The bare side is one Unicorn instance in 64-bit mode with the guest's memory mapped flat, its
segments at their addresses, the registers of docs/guests.md "Processor state at entry" that the
code reads (RSP, RDI, RSI; SSE enabled), and one hook: OUT, for the console and the exit port. The
machine side is `hhr run --guest NAME.elf` without its boot: hv1, EPT, the preemption timer, virtual
time. Both print the same console text, which is checked, so the two ran the same work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as x86

from guests import c_examples, elf
from emu.ports import COM1_BASE as CONSOLE_PORT
from hypervisors.guest_abi import EXIT_PORT
from hypervisors.memory_map import DEFAULT_GUEST_MEMORY, GUEST_LOAD_ADDRESS
from tools import run as run_module

GUESTS = ("sha256", "numeric", "memwalk")
CR0_MP = 1 << 1                     # SDM Vol. 3A 2.5: x87/SSE as in the guest's entry state
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
INSTRUCTION_LIMIT = 2_000_000_000


@dataclass
class GuestTiming:
    name: str
    machine_seconds: float           # machine.run() of the booted machine, guest and hv1 together
    bare_seconds: float
    console: str

    @property
    def ratio(self) -> float:
        """The machine's speed as a fraction of bare Unicorn's on the same work."""
        return self.bare_seconds / self.machine_seconds


def machine_seconds(path: str) -> tuple[float, str]:
    """Host seconds hv1 and the guest take to run the guest to its end (`hhr run`'s own measure of
    machine.run), and the guest's console."""
    report = run_module.run("hv1", [path], max_instructions=INSTRUCTION_LIMIT)
    stop = report.document["machine_stop"]
    if stop["reason"] != "debug-exit":
        raise RuntimeError(f"{path} did not finish under hv1: {stop['reason']} {stop['report']}")
    return report.host_seconds, report.document["guests"][0]["console"]


def bare_seconds(path: str) -> tuple[float, str]:
    """Host seconds bare Unicorn takes to run the guest to its exit port, and its console."""
    with open(path, "rb") as image_file:
        flat = elf.flatten(image_file.read())
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, DEFAULT_GUEST_MEMORY, UC_PROT_ALL)
    uc.mem_write(GUEST_LOAD_ADDRESS, flat.image)
    uc.reg_write(x86.UC_X86_REG_RSP, DEFAULT_GUEST_MEMORY)
    uc.reg_write(x86.UC_X86_REG_RDI, 0)
    uc.reg_write(x86.UC_X86_REG_RSI, 1)
    uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) | CR0_MP)
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | CR4_OSFXSR | CR4_OSXMMEXCPT)
    console = bytearray()

    def on_out(engine, port, size, value, _user):
        if port == CONSOLE_PORT:
            console.append(value & 0xFF)
        elif port == EXIT_PORT:
            engine.emu_stop()

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
    started = time.perf_counter()
    uc.emu_start(flat.entry, 0)
    return time.perf_counter() - started, console.decode(errors="replace")


def measure(name: str) -> GuestTiming:
    path = str(c_examples.build(name))
    machine_time, machine_console = machine_seconds(path)
    bare_time, bare_console = bare_seconds(path)
    if machine_console != bare_console:
        raise RuntimeError(f"{name}: the machine printed {machine_console!r}, bare Unicorn {bare_console!r}")
    return GuestTiming(name, machine_time, bare_time, machine_console)


def measure_all() -> list[GuestTiming] | None:
    """Each C guest's timing, or None where gcc is missing (the guests cannot be built)."""
    if c_examples.compiler() is None:
        return None
    return [measure(name) for name in GUESTS]
