"""The smallest VMX monitor: one guest on the bare machine, no boot protocol; `hhr selftest` and `hhr bench --machine` run it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import asm
from emu import vmcs_fields as vf
from emu.ports import COM1_BASE, DEBUG_EXIT_PORT
from emu.machine import PTE_LARGE_PAGE, PTE_PRESENT_WRITABLE, Machine, RunResult
from emu.memory import MIB, PAGE_SIZE
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import (
    AR_UNUSABLE, EPT_LARGE_PAGE, EPT_MEMORY_TYPE_SHIFT, EPT_RWX_MASK, VMCS_LINK_POINTER_NONE, Cr0, Cr4, Efer,
    EntryControls, ExitControls, ExitReason, MemoryType, PrimaryProcessorControls, Rflags,
    SecondaryProcessorControls, make_eptp,
)
from hypervisors import memory_map, segments

# Host-physical layout of the monitor (all below the guest's RAM).
MONITOR_CODE = 0x100000
MONITOR_STACK_TOP = 0x80000
EXIT_STACK_TOP = 0x70000
VMXON_REGION = 0x200000
VMCS_REGION = 0x201000
EPT_ROOT = 0x300000
EPT_PD = EPT_ROOT + 2 * PAGE_SIZE          # write_guest_ept's page directory (PML4, PDPT, PD in a row)
GUEST_HOST_BASE = 16 * MIB           # guest-physical 0 is host-physical 16 MiB
GUEST_RAM = 4 * MIB

# Guest-physical layout: page tables, GDT and TSS where the hypervisors put them (docs/guests.md),
# then the IDT, the stack and the code.
GUEST_PML4 = memory_map.GUEST_PML4
GUEST_PDPT = memory_map.GUEST_PDPT
GUEST_GDT = memory_map.GUEST_GDT
GUEST_TSS = memory_map.GUEST_TSS
CODE_SELECTOR = memory_map.GUEST_CODE_SELECTOR   # the guest's selectors; the monitor's own are the same
DATA_SELECTOR = memory_map.GUEST_DATA_SELECTOR
TSS_SELECTOR = memory_map.GUEST_TSS_SELECTOR
GUEST_IDT = 0x5000
GUEST_STACK_TOP = 0x8000
GUEST_CODE = 0x10000

LARGE_PAGE_SIZE = memory_map.LARGE_PAGE_SIZE
EPT_RWX = EPT_RWX_MASK

# 64-bit code, flat data and a busy 64-bit TSS: the GDT the hypervisors give their guests.
GDT_ENTRIES = tuple(descriptor for _, descriptor in sorted(segments.GUEST_GDT_ENTRIES.items()))
IDT_LIMIT = 0xFFF
GUEST_CR0 = Cr0.PE | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG
GUEST_CR4 = Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.VMXE
GUEST_EFER = Efer.LME | Efer.LMA | Efer.NXE
# Exit codes the monitor gives the debug-exit port when VMLAUNCH or VMRESUME falls through.
VMLAUNCH_FAILED = 0xFE
VMRESUME_FAILED = 0xFD

ENCODING = {field.name: field.encoding for field in vf.FIELDS}
# Written from the monitor's own control registers, in this order.
HOST_CONTROL_REGISTERS = ("cr3", "cr0", "cr4")


def assemble(source: str, base: int) -> bytes:
    """The machine code of `source` assembled by the toolkit for load address `base`."""
    return asm.assemble(source, base).code


def guest_fields(primary: int = 0, pin: int = 0) -> dict[str, int]:
    """A valid 64-bit guest and host-state VMCS for the monitor's layout (SDM 26.2, 26.3)."""
    return {
        "PIN_BASED_VM_EXEC_CONTROL": CAPS.pin_based.adjust(pin),
        "CPU_BASED_VM_EXEC_CONTROL": CAPS.primary_processor.adjust(
            PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS | PrimaryProcessorControls.HLT_EXITING
            | PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING | primary),
        "SECONDARY_VM_EXEC_CONTROL": CAPS.secondary_processor.adjust(SecondaryProcessorControls.ENABLE_EPT),
        "VM_EXIT_CONTROLS": CAPS.exit.adjust(ExitControls.HOST_ADDRESS_SPACE_SIZE
                                             | ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT),
        "VM_ENTRY_CONTROLS": CAPS.entry.adjust(EntryControls.IA32E_MODE_GUEST),
        "EPT_POINTER": make_eptp(EPT_ROOT, MemoryType.WB),
        "VMCS_LINK_POINTER": VMCS_LINK_POINTER_NONE,
        "GUEST_CR0": int(GUEST_CR0), "GUEST_CR3": GUEST_PML4, "GUEST_CR4": int(GUEST_CR4),
        "GUEST_IA32_EFER": int(GUEST_EFER),
        "GUEST_CS_SELECTOR": CODE_SELECTOR, "GUEST_CS_AR_BYTES": segments.CODE64_ACCESS_RIGHTS,
        "GUEST_CS_LIMIT": segments.FLAT_LIMIT,
        "GUEST_SS_SELECTOR": DATA_SELECTOR, "GUEST_SS_AR_BYTES": segments.DATA_ACCESS_RIGHTS,
        "GUEST_SS_LIMIT": segments.FLAT_LIMIT,
        "GUEST_DS_AR_BYTES": AR_UNUSABLE, "GUEST_ES_AR_BYTES": AR_UNUSABLE,
        "GUEST_FS_AR_BYTES": AR_UNUSABLE, "GUEST_GS_AR_BYTES": AR_UNUSABLE,
        "GUEST_LDTR_AR_BYTES": AR_UNUSABLE,
        "GUEST_TR_SELECTOR": TSS_SELECTOR, "GUEST_TR_AR_BYTES": segments.TSS64_BUSY_ACCESS_RIGHTS,
        "GUEST_TR_LIMIT": segments.TSS64_LIMIT, "GUEST_TR_BASE": GUEST_TSS,
        "GUEST_GDTR_BASE": GUEST_GDT, "GUEST_GDTR_LIMIT": segments.GUEST_GDT_LIMIT,
        "GUEST_IDTR_BASE": GUEST_IDT, "GUEST_IDTR_LIMIT": IDT_LIMIT,
        "GUEST_RFLAGS": Rflags.FIXED1, "GUEST_RSP": GUEST_STACK_TOP, "GUEST_RIP": GUEST_CODE,
        "GUEST_DR7": segments.DR7_INIT,
        "HOST_CS_SELECTOR": CODE_SELECTOR, "HOST_SS_SELECTOR": DATA_SELECTOR, "HOST_TR_SELECTOR": TSS_SELECTOR,
        "HOST_RSP": EXIT_STACK_TOP,
    }


def write_guest_memory(machine: Machine, guest_code: bytes) -> None:
    """The guest's EPT, page tables, GDT and code, at GUEST_HOST_BASE."""
    write_guest_ept(machine)
    write_guest_tables(machine)
    machine.load(GUEST_HOST_BASE + GUEST_CODE, guest_code)


def write_guest_ept(machine: Machine, root: int = EPT_ROOT) -> None:
    """An EPT at `root` (PML4, PDPT, PD in three pages) mapping the guest's RAM with 2 MiB pages to
    GUEST_HOST_BASE (SDM 29.3.2)."""
    ram = machine.ram
    pdpt, pd = root + PAGE_SIZE, root + (EPT_PD - EPT_ROOT)
    ram.write_u64(root, pdpt | EPT_RWX)
    ram.write_u64(pdpt, pd | EPT_RWX)
    for index in range(GUEST_RAM // LARGE_PAGE_SIZE):
        ram.write_u64(pd + 8 * index,
                      (GUEST_HOST_BASE + index * LARGE_PAGE_SIZE) | EPT_RWX
                      | (MemoryType.WB << EPT_MEMORY_TYPE_SHIFT) | EPT_LARGE_PAGE)


def write_guest_tables(machine: Machine) -> None:
    """The guest's own page tables (one 1 GiB identity page) and GDT, in its RAM at GUEST_HOST_BASE."""
    ram = machine.ram
    ram.write_u64(GUEST_HOST_BASE + GUEST_PML4, GUEST_PDPT | PTE_PRESENT_WRITABLE)
    ram.write_u64(GUEST_HOST_BASE + GUEST_PDPT, 0 | PTE_PRESENT_WRITABLE | PTE_LARGE_PAGE)
    for index, descriptor in enumerate(GDT_ENTRIES):
        ram.write_u64(GUEST_HOST_BASE + GUEST_GDT + segments.DESCRIPTOR_BYTES * index, descriptor)


def _vmwrite(name: str, value: str) -> str:
    """Monitor code that VMWRITEs `value` (an immediate or a register) to the VMCS field `name`."""
    return f"  mov rax, {ENCODING[name]:#x}\n  mov rbx, {value}\n  vmwrite rax, rbx"


def monitor_source(fields: dict[str, int], on_exit: str = "") -> str:
    """VMXON, a VMCS written field by field, VMLAUNCH; the exit handler runs `on_exit` first (code
    that must keep RAX and R12-R14), emulates COM1 output, skips CPUID and VMCALL, and ends the run
    with the guest's exit code on HLT."""
    writes = "\n".join(_vmwrite(name, f"{value:#x}") for name, value in fields.items())
    host_registers = "\n".join(_vmwrite(f"HOST_{register.upper()}", register) for register in HOST_CONTROL_REGISTERS)
    e = ENCODING
    return f"""
      mov rax, cr4
      or rax, {Cr4.VMXE:#x}
      mov cr4, rax
      mov rax, {VMXON_REGION:#x}
      push rax
      vmxon [rsp]
      mov qword ptr [rsp], {VMCS_REGION:#x}
      vmclear [rsp]
      vmptrld [rsp]
      pop rax
    {writes}
    {host_registers}
      mov rax, {e['HOST_RIP']:#x}
      lea rbx, [rip + exit_handler]
      vmwrite rax, rbx
      vmlaunch
      mov al, {VMLAUNCH_FAILED:#x}
      out {DEBUG_EXIT_PORT:#x}, al
    exit_handler:
    {on_exit}
      mov r14, {e['VM_EXIT_REASON']:#x}
      vmread r13, r14
      cmp r13, {int(ExitReason.HLT)}
      je guest_done
      cmp r13, {int(ExitReason.IO_INSTRUCTION)}
      jne skip_instruction
      mov dx, {COM1_BASE:#x}
      out dx, al
    skip_instruction:
      mov r14, {e['GUEST_RIP']:#x}
      vmread r13, r14
      mov r14, {e['VM_EXIT_INSTRUCTION_LEN']:#x}
      vmread r12, r14
      add r13, r12
      mov r14, {e['GUEST_RIP']:#x}
      vmwrite r14, r13
      vmresume
      mov al, {VMRESUME_FAILED:#x}
      out {DEBUG_EXIT_PORT:#x}, al
    guest_done:
      out {DEBUG_EXIT_PORT:#x}, al
    """


@dataclass
class MonitorRun:
    """What a run of one guest under the monitor gave: the machine's result, host time and COM1 output."""

    result: RunResult
    seconds: float
    console: str
    machine: Machine


def run_guest(guest_source: str, *, primary: int = 0, max_instructions: int = 10 ** 10,
              ram_size: int = 64 * MIB, record_events: bool = False,
              prepare: Callable[[Machine], None] | None = None, fast_transitions: bool = True,
              monitor_on_exit: str = "") -> MonitorRun:
    """Runs `guest_source` (assembled at GUEST_CODE) under the monitor; the guest ends with HLT and
    its AL is the exit code; bytes it OUTs to any port are printed on COM1 by the monitor."""
    machine = Machine(ram_size=ram_size, lps=1, record_events=record_events, fast_transitions=fast_transitions)
    machine.ram.write_u32(VMXON_REGION, CAPS.vmcs_revision_id)
    machine.ram.write_u32(VMCS_REGION, CAPS.vmcs_revision_id)
    write_guest_memory(machine, assemble(guest_source, GUEST_CODE))
    machine.load(MONITOR_CODE, assemble(monitor_source(guest_fields(primary), monitor_on_exit), MONITOR_CODE))
    if prepare is not None:
        prepare(machine)
    machine.start(MONITOR_CODE, [MONITOR_STACK_TOP])
    started = time.perf_counter()
    result = machine.run(max_instructions=max_instructions)
    return MonitorRun(result, time.perf_counter() - started, machine.io.console.text(), machine)
