"""Shared test helpers: assemble root-mode and guest programs, lay out a valid guest with EPT, read results back.

A test program is real x86-64 assembly run on the machine. It reports what it observes by storing
values into the result slots (host-physical RESULTS, eight bytes each) and stops the machine through
the debug-exit port; VM exits can be logged by the standard exit handler into EXIT_LOG. Everything a
test asserts comes from those slots, the console, the run result or the machine's event stream.

Memory map used by these programs (host-physical; root code runs on the firmware's identity map):

    0x001000-0x003000  firmware page tables (emu.machine)
    0x040000-0x080000  root stacks, ROOT_STACK_SIZE per LP, LP 0 at the top
    0x090000-0x098000  root IDTs, one page per LP (ROOT_IDT + lp * PAGE_SIZE)
    0x0A0000           result slots; 0x0A1000 exit count; 0x0A2000 exit log; 0x0A8000 scratch
    0x100000           root code
    0x200000           VMXON region, then VMCS regions
    0x300000-0x400000  EPT paging structures
    0x1000000          guest RAM (GPA 0 maps here by default, 2 MiB EPT pages)
"""
from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from emu import vmcs_fields as vf
from emu.ports import (  # noqa: F401  (the ports test programs use, re-exported)
    CLOCK_HIGH_PORT, CLOCK_LOW_PORT, COM1_BASE as COM1, DEBUG_EXIT_PORT, IPI_DESTINATION_SHIFT, IPI_PORT,
    TIMER_ARM_PORT, TIMER_PERIOD_PORT, TIMER_VECTOR_PORT,
)
from emu.interrupts import IDT_GATE_SIZE
from emu.machine import PTE_LARGE_PAGE, PTE_PRESENT_WRITABLE, Machine, RunResult
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import (
    AR_DB, AR_G, AR_L, AR_P, AR_S, AR_UNUSABLE, EPT_LARGE_PAGE, EPT_MEMORY_TYPE_SHIFT, EPT_READ,
    EPT_RWX_MASK, SEGMENT_TYPE_ACCESSED, SEGMENT_TYPE_CODE, SEGMENT_TYPE_READABLE_OR_WRITABLE,
    SYSTEM_TYPE_BUSY_TSS, VMCS_LINK_POINTER_NONE, Cr0, Cr4, Efer, EntryControls, ExceptionVector, ExitControls,
    ExitReason, MemoryType, PinBasedControls, PrimaryProcessorControls, Rflags, SecondaryProcessorControls,
    make_eptp,
)
from hypervisors import segments

PAGE_SIZE = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30
MIB = 1 << 20
QWORD = 8
U64 = 0xFFFF_FFFF_FFFF_FFFF
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000   # bits 51:12 of a paging-structure entry

# --- root-mode memory map (host-physical) -------------------------------------------------------
ROOT_STACK_TOP = 0x80000
ROOT_STACK_SIZE = 0x8000
ROOT_IDT = 0x90000
ROOT_IDT_LIMIT = PAGE_SIZE - 1
RESULTS = 0xA0000
RESULT_SLOTS = PAGE_SIZE // QWORD
EXIT_COUNT = 0xA1000
EXIT_LOG = 0xA2000
EXIT_LOG_ENTRY_SHIFT = 7                # 128 bytes per logged exit
EXIT_LOG_CAPACITY = 48
SCRATCH = 0xA8000
ROOT_CODE = 0x100000
VMXON_REGION = 0x200000
VMCS_REGION = 0x201000
SECOND_VMCS_REGION = 0x202000
EPT_TABLES = 0x300000
EPT_TABLES_END = 0x400000
GUEST_RAM_BASE = 0x1000000
GUEST_RAM_SIZE = 4 * MIB

# --- guest memory map (guest-physical = guest-linear: 1 GiB identity pages) ----------------------
GUEST_PML4 = 0x1000
GUEST_PDPT = 0x2000
GUEST_IDENTITY_GIBS = 4
GUEST_GDT = 0x3000
GUEST_TSS = 0x4000
GUEST_IDT = 0x5000
GUEST_IDT_LIMIT = PAGE_SIZE - 1
GUEST_STACK_TOP = 0x9000
GUEST_CODE = 0x10000
GUEST_INVERSE_HANDLER = 0x18000
GUEST_INVERSE_STACK_TOP = 0x1C000
GUEST_SHARED = 0x20000
GUEST_DATA = 0x30000

# --- segments: the same flat GDT layout for root and guests --------------------------------------
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18
# The flat segments of hypervisors/segments.py, under the names the tests use.
TSS_LIMIT = segments.TSS64_LIMIT
GDT_CODE64 = segments.GUEST_CODE_DESCRIPTOR
GDT_DATA = segments.GUEST_DATA_DESCRIPTOR
GDT_ENTRIES = 5                         # null, code, data, and a 16-byte TSS descriptor
GDT_LIMIT = GDT_ENTRIES * QWORD - 1
FLAT_LIMIT = segments.FLAT_LIMIT
CODE64_ACCESS_RIGHTS = segments.CODE64_ACCESS_RIGHTS
DATA_ACCESS_RIGHTS = segments.DATA_ACCESS_RIGHTS
BUSY_TSS_ACCESS_RIGHTS = segments.TSS64_BUSY_ACCESS_RIGHTS
DR7_RESET_VALUE = segments.DR7_INIT

# IDT gates (SDM Vol. 3A 6.14.1).
INTERRUPT_GATE_ATTRIBUTES = 0x8E00      # present, DPL 0, 64-bit interrupt gate


# Debug-exit codes our programs use (the run's exit status is code * 2 + 1).
EXIT_OK = 0x10
EXIT_FAULT = 0x11
EXIT_LAUNCH_FAILED = 0x12
EXIT_RESUME_FAILED = 0x13
EXIT_STOPPED_ON_EXIT = 0x14
EXIT_LOG_FULL = 0x15

# Result slots the standard pieces fill in.
SLOT_LAUNCH_FLAGS = 500
SLOT_LAUNCH_ERROR = 501
SLOT_RESUME_FLAGS = 502
SLOT_RESUME_ERROR = 503
SLOT_FAULT_VECTOR = 504
SLOT_FAULT_RIP = 505
SLOT_FAULT_ERROR_CODE = 506
SLOT_FAULT_CR2 = 507

RFLAGS_CF = int(Rflags.CF)
RFLAGS_ZF = int(Rflags.ZF)

ENCODING = {f.name: f.encoding for f in vf.FIELDS}

_assembler = Ks(KS_ARCH_X86, KS_MODE_64)


def assemble(source: str, base: int) -> bytes:
    """Assembles Intel-syntax x86-64 at `base` (labels resolve to absolute addresses)."""
    try:
        encoding, _count = _assembler.asm(source, base)
    except KsError as error:
        numbered = "\n".join(f"{n + 1:4} {line}" for n, line in enumerate(source.splitlines()))
        raise ValueError(f"keystone could not assemble ({error}):\n{numbered}") from None
    return bytes(encoding or b"")


def exit_status(code: int) -> int:
    """The run's exit status when the program writes `code` to the debug-exit port."""
    return code << 1 | 1


# --- assembly snippets ------------------------------------------------------------------------------
def lines(*parts: str) -> str:
    return "\n".join(part for part in parts if part)


def save(slot: int, register: str = "rax") -> str:
    """Stores a 64-bit register into result slot `slot`; changes no register or flag."""
    assert 0 <= slot < RESULT_SLOTS
    address = RESULTS + slot * QWORD
    if register == "rax":
        return f"movabs [{address:#x}], rax"
    return lines("push rax", f"mov rax, {register}", f"movabs [{address:#x}], rax", "pop rax")


def save_flags(slot: int) -> str:
    """Stores RFLAGS into a result slot; changes no register or flag."""
    return lines("push rax", "pushfq", "pop rax", save(slot), "pop rax")


def vmread(register: str, name: str) -> str:
    """VMREAD of field `name` into a register other than rax (rax holds the encoding)."""
    assert register != "rax"
    return lines(f"mov rax, {ENCODING[name]:#x}", f"vmread {register}, rax")


def vmwrite(name: str, value: int | str) -> str:
    """VMWRITE of an immediate or a register (not rax or rbx) to field `name`; clobbers rax, rbx."""
    source = f"mov rbx, {value:#x}" if isinstance(value, int) else f"mov rbx, {value}"
    return lines(f"mov rax, {ENCODING[name]:#x}", source, "vmwrite rax, rbx")


def vmx_pointer_instruction(mnemonic: str, address: int) -> str:
    """VMXON / VMCLEAR / VMPTRLD with a 64-bit memory operand on the stack holding `address`."""
    return lines(f"mov rax, {address:#x}", "push rax", f"{mnemonic} [rsp]", "pop rax")


def debug_exit(code: int) -> str:
    """Stops the machine with `code`. The HLT after the OUT ends the translated block: the machine
    stops at a block's end, so without it the bytes after the OUT would still run."""
    return lines(f"mov al, {code:#x}", f"out {DEBUG_EXIT_PORT:#x}, al", "hlt")


def putc(character: str) -> str:
    return lines(f"mov dx, {COM1:#x}", f"mov al, {ord(character):#x}", "out dx, al")


def arm_timer(vector: int, ticks: int, *, periodic: bool = False) -> str:
    """Sets this LP's timer vector and arms it `ticks` ahead (with `periodic`, every `ticks`); clobbers rax, rdx."""
    return lines(f"mov dx, {TIMER_VECTOR_PORT:#x}", f"mov eax, {vector:#x}", "out dx, eax",
                 lines(f"mov dx, {TIMER_PERIOD_PORT:#x}", f"mov eax, {ticks}", "out dx, eax") if periodic else "",
                 f"mov dx, {TIMER_ARM_PORT:#x}", f"mov eax, {ticks}", "out dx, eax")


def send_ipi(vector: int, destination: int = 0) -> str:
    """Sends interrupt `vector` to LP `destination`; clobbers rax, rdx."""
    return lines(f"mov dx, {IPI_PORT:#x}", f"mov eax, {destination << IPI_DESTINATION_SHIFT | vector:#x}",
                 "out dx, eax")


def set_interrupt_gate(idt_base: int | str, vector: int, handler_label: str) -> str:
    """Writes a 64-bit interrupt gate to `handler_label` (selector CODE_SELECTOR); clobbers rax, rbx.

    Gate layout (SDM Vol. 3A Figure 6-8): offset 15:0, selector, attributes, offset 31:16, offset 63:32.
    """
    base = f"{idt_base:#x}" if isinstance(idt_base, int) else idt_base
    return lines(
        f"mov rbx, {base}", f"add rbx, {vector * IDT_GATE_SIZE:#x}",
        f"lea rax, [rip + {handler_label}]",
        "mov word ptr [rbx], ax", f"mov word ptr [rbx + 2], {CODE_SELECTOR:#x}",
        f"mov word ptr [rbx + 4], {INTERRUPT_GATE_ATTRIBUTES:#x}",
        "shr rax, 16", "mov word ptr [rbx + 6], ax", "shr rax, 16",
        "mov dword ptr [rbx + 8], eax", "mov dword ptr [rbx + 12], 0")


# A 64-bit TSS descriptor (SDM Vol. 3A Figure 8-4): the low quadword as segments.descriptor builds it,
# then base 63:32.
DESCRIPTOR_BASE_HIGH_SHIFT = 32


def gdt_quads(tss_base: int) -> list[int]:
    """The flat GDT: null, 64-bit code, data, and a busy 64-bit TSS descriptor (two quadwords)."""
    tss_low = segments.descriptor(tss_base, TSS_LIMIT, BUSY_TSS_ACCESS_RIGHTS)
    return [0, GDT_CODE64, GDT_DATA, tss_low, tss_base >> DESCRIPTOR_BASE_HIGH_SHIFT]


ROOT_TSS = SCRATCH + PAGE_SIZE


def root_preamble() -> str:
    """Loads a flat GDT and the shared root IDT and reloads CS/SS/DS/ES, then jumps to `root_main`.

    The firmware leaves GDTR, IDTR and the selectors zero; interrupt delivery and IRETQ need real ones.
    """
    gdt = ", ".join(f"{q:#x}" for q in gdt_quads(ROOT_TSS))
    return lines(
        "root_entry:",
        "lgdt [rip + root_gdtr]",
        f"mov ax, {DATA_SELECTOR:#x}", "mov ss, ax", "mov ds, ax", "mov es, ax",
        f"push {CODE_SELECTOR:#x}", "lea rax, [rip + root_reload_cs]", "push rax", "retfq",
        "root_reload_cs:",
        "lidt [rip + root_idtr]",
        "jmp root_main",
        "root_gdt:", f".quad {gdt}",
        "root_gdtr:", f".word {GDT_LIMIT:#x}", ".quad root_gdt",
        "root_idtr:", f".word {ROOT_IDT_LIMIT:#x}", f".quad {ROOT_IDT:#x}",
        "root_main:")


def fault_recorder(vector: int, has_error_code: bool, label: str | None = None) -> str:
    """A root IDT handler: records vector, faulting RIP, error code and CR2, then exits EXIT_FAULT."""
    label = label or f"fault_{vector}"
    rip_offset = QWORD if has_error_code else 0
    return lines(
        f"{label}:",
        f"mov rax, {vector}", save(SLOT_FAULT_VECTOR),
        f"mov rax, [rsp + {rip_offset}]", save(SLOT_FAULT_RIP),
        "mov rax, [rsp]" if has_error_code else "mov rax, -1", save(SLOT_FAULT_ERROR_CODE),
        "mov rax, cr2", save(SLOT_FAULT_CR2),
        debug_exit(EXIT_FAULT))


def enable_vmx() -> str:
    """Sets CR4.VMXE and executes VMXON on VMXON_REGION (its revision id is written by the test)."""
    return lines("mov rax, cr4", f"or rax, {int(Cr4.VMXE):#x}", "mov cr4, rax",
                 vmx_pointer_instruction("vmxon", VMXON_REGION))


def make_current(vmcs: int = VMCS_REGION) -> str:
    return lines(vmx_pointer_instruction("vmclear", vmcs), vmx_pointer_instruction("vmptrld", vmcs))


def write_revision(address: int, revision: int = CAPS.vmcs_revision_id) -> str:
    """Writes a VMX region's revision id from the root program; clobbers rax."""
    return lines(f"mov rax, {address:#x}", f"mov dword ptr [rax], {revision:#x}")


def vmx_on_with_current_vmcs() -> str:
    """Writes the revision ids, enters VMX operation and makes VMCS_REGION current."""
    return lines(write_revision(VMXON_REGION), write_revision(VMCS_REGION), enable_vmx(), make_current())


def write_fields(fields: dict[str, int]) -> str:
    return lines(*(vmwrite(name, value) for name, value in fields.items()))


def write_host_state(exit_label: str) -> str:
    """Host state from the running root: control registers, RSP, GDT/IDT bases, RIP = `exit_label`."""
    return lines(
        "mov rcx, cr0", vmwrite("HOST_CR0", "rcx"),
        "mov rcx, cr3", vmwrite("HOST_CR3", "rcx"),
        "mov rcx, cr4", vmwrite("HOST_CR4", "rcx"),
        "lea rcx, [rip + root_gdt]", vmwrite("HOST_GDTR_BASE", "rcx"),
        vmwrite("HOST_IDTR_BASE", ROOT_IDT),
        vmwrite("HOST_CS_SELECTOR", CODE_SELECTOR),
        vmwrite("HOST_SS_SELECTOR", DATA_SELECTOR),
        vmwrite("HOST_DS_SELECTOR", DATA_SELECTOR),
        vmwrite("HOST_ES_SELECTOR", DATA_SELECTOR),
        vmwrite("HOST_TR_SELECTOR", TSS_SELECTOR),
        vmwrite("HOST_TR_BASE", ROOT_TSS),
        f"lea rcx, [rip + {exit_label}]", vmwrite("HOST_RIP", "rcx"),
        "mov rcx, rsp", vmwrite("HOST_RSP", "rcx"))


def record_failure(flags_slot: int, error_slot: int, code: int) -> str:
    """After a VMX instruction that should not return: record RFLAGS and VM_INSTRUCTION_ERROR, exit."""
    return lines(save_flags(flags_slot), vmread("rcx", "VM_INSTRUCTION_ERROR"), save(error_slot, "rcx"),
                 debug_exit(code))


# Offsets of the fields of one EXIT_LOG entry.
LOGGED_FIELDS = ("VM_EXIT_REASON", "EXIT_QUALIFICATION", "GUEST_RIP", "VM_EXIT_INSTRUCTION_LEN",
                 "VM_EXIT_INTR_INFO", "VM_EXIT_INTR_ERROR_CODE", "IDT_VECTORING_INFO_FIELD",
                 "GUEST_PHYSICAL_ADDRESS", "GUEST_LINEAR_ADDRESS", "GUEST_RSP")
LOG_GUEST_RAX_OFFSET = len(LOGGED_FIELDS) * QWORD


@dataclass(frozen=True)
class ExitRecord:
    """One logged VM exit: the VMCS exit-information fields and the guest's RAX at the exit."""

    reason: int
    qualification: int
    guest_rip: int
    instruction_length: int
    interruption_info: int
    interruption_error: int
    idt_vectoring_info: int
    guest_physical: int
    guest_linear: int
    guest_rsp: int
    guest_rax: int


def exit_logger(stop_reasons: tuple[int, ...] = (), *, resume: bool = True, label: str = "vm_exit",
                on_exit: str = "") -> str:
    """The standard VM-exit handler: logs the exit, stops on `stop_reasons`, else skips the exiting
    instruction (GUEST_RIP += VM_EXIT_INSTRUCTION_LEN) and resumes. Guest registers are preserved.

    `on_exit` runs after logging with the guest's registers saved on the host stack and the exit
    count (1 for the first exit) in rcx; it may jump to `{label}_stop`, `{label}_resume` (skip the
    stop checks) or `{label}_continue` (go on to them, as falling through does).
    """
    log = [f"mov rbx, {ENCODING[name]:#x}\nvmread rax, rbx\nmov [rdx + {i * QWORD}], rax"
           for i, name in enumerate(LOGGED_FIELDS)]
    stops = [f"cmp rax, {reason}\nje {label}_stop" for reason in stop_reasons]
    return lines(
        f"{label}:",
        "push rax", "push rbx", "push rcx", "push rdx",
        f"movabs rax, [{EXIT_COUNT:#x}]",
        "mov rdx, rax", f"shl rdx, {EXIT_LOG_ENTRY_SHIFT}", f"mov rcx, {EXIT_LOG:#x}", "add rdx, rcx",
        "inc rax", f"movabs [{EXIT_COUNT:#x}], rax",
        *log,
        "mov rax, [rsp + 24]", f"mov [rdx + {LOG_GUEST_RAX_OFFSET}], rax",
        f"movabs rax, [{EXIT_COUNT:#x}]", "mov rcx, rax",
        f"cmp rax, {EXIT_LOG_CAPACITY}", f"jae {label}_full",
        on_exit,
        f"{label}_continue:",
        vmread("rbx", "VM_EXIT_REASON"), "mov rax, rbx",
        *stops,
        "" if resume else f"jmp {label}_stop",
        f"{label}_resume:",
        vmread("rcx", "GUEST_RIP"), vmread("rdx", "VM_EXIT_INSTRUCTION_LEN"), "add rcx, rdx",
        vmwrite("GUEST_RIP", "rcx"),
        "pop rdx", "pop rcx", "pop rbx", "pop rax",
        "vmresume",
        record_failure(SLOT_RESUME_FLAGS, SLOT_RESUME_ERROR, EXIT_RESUME_FAILED),
        f"{label}_full:", debug_exit(EXIT_LOG_FULL),
        f"{label}_stop:", debug_exit(EXIT_STOPPED_ON_EXIT))


# --- reading back ---------------------------------------------------------------------------------
def result(machine: Machine, slot: int) -> int:
    return machine.ram.read_u64(RESULTS + slot * QWORD)


def results(machine: Machine, count: int, first: int = 0) -> list[int]:
    return [result(machine, first + i) for i in range(count)]


def exit_log(machine: Machine) -> list[ExitRecord]:
    count = min(machine.ram.read_u64(EXIT_COUNT), EXIT_LOG_CAPACITY)
    records = []
    for index in range(count):
        entry = machine.ram.read(EXIT_LOG + (index << EXIT_LOG_ENTRY_SHIFT), LOG_GUEST_RAX_OFFSET + QWORD)
        records.append(ExitRecord(*struct.unpack(f"<{len(LOGGED_FIELDS) + 1}Q", entry)))
    return records


def event_kinds(machine: Machine) -> list[str]:
    return [event.kind for event in machine.events.events]


def event_tuples(machine: Machine) -> list[tuple]:
    """The machine's recorded events as comparable tuples."""
    return [event.as_tuple() for event in machine.events.events]


def events_of(machine: Machine, kind: str) -> list:
    return [event for event in machine.events.events if event.kind == kind]


# --- running --------------------------------------------------------------------------------------
DEFAULT_INSTRUCTION_LIMIT = 2_000_000


def run_root(machine: Machine, body: str, max_instructions: int = DEFAULT_INSTRUCTION_LIMIT,
             argument: int = 0) -> RunResult:
    """Assembles `root_preamble() + body` at ROOT_CODE, starts every LP there and runs."""
    machine.load(ROOT_CODE, assemble(lines(root_preamble(), body), ROOT_CODE))
    stacks = [ROOT_STACK_TOP - lp * ROOT_STACK_SIZE for lp in range(len(machine.lps))]
    machine.start(ROOT_CODE, stacks, argument)
    return machine.run(max_instructions=max_instructions)


def label_address(source: str, label: str, base: int = ROOT_CODE, *, root_program: bool = True) -> int:
    """The address of `label` in `source` as run_root (or, with root_program=False, a plain load at
    `base`) assembles it: appends `mov rax, label` and reads back its 32-bit immediate."""
    text = lines(root_preamble(), source) if root_program else source
    code = assemble(lines(text, f"mov rax, {label}"), base)
    return struct.unpack_from("<I", code, len(code) - 4)[0]


def expect_invalid_opcode(machine: Machine, body_before: str, instruction: str) -> None:
    """Runs `instruction` after `body_before` and checks it raised #UD at its own address."""
    body = lines(set_interrupt_gate(ROOT_IDT, ExceptionVector.UD, "fault_6"), body_before,
                 "faulting:", instruction, debug_exit(EXIT_OK), fault_recorder(ExceptionVector.UD, False))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_FAULT), "the instruction did not fault"
    assert result(machine, SLOT_FAULT_VECTOR) == ExceptionVector.UD
    assert result(machine, SLOT_FAULT_RIP) == label_address(body, "faulting")


@contextmanager
def timeout(seconds: int) -> Iterator[None]:
    """Raises TimeoutError in the body if it runs longer than `seconds` (SIGALRM; main thread only)."""
    def expire(_signal, _frame):
        raise TimeoutError(f"the machine did not stop within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- EPT --------------------------------------------------------------------------------------------
EPT_LEVELS = 4
EPT_PML4_LEVEL = 4
EPT_LEAF_LEVEL = {PAGE_SIZE: 1, PAGE_2M: 2, PAGE_1G: 3}
LEVEL_INDEX_BITS = 9
LEVEL_INDEX_MASK = (1 << LEVEL_INDEX_BITS) - 1
PAGE_SHIFT = 12
EPT_WB = int(MemoryType.WB) << EPT_MEMORY_TYPE_SHIFT


def level_shift(level: int) -> int:
    return PAGE_SHIFT + LEVEL_INDEX_BITS * (level - 1)


class Ept:
    """Builds EPT paging structures in the machine's RAM (SDM Vol. 3C 29.3.2) and walks them."""

    def __init__(self, machine: Machine, tables: int = EPT_TABLES, tables_end: int = EPT_TABLES_END):
        self.ram = machine.ram
        self._next_table = tables
        self._tables_end = tables_end
        self.pml4 = self._new_table()

    @property
    def eptp(self) -> int:
        return make_eptp(self.pml4)

    def _new_table(self) -> int:
        table = self._next_table
        if table + PAGE_SIZE > self._tables_end:
            raise ValueError("out of EPT table space")
        self._next_table += PAGE_SIZE
        self.ram.write(table, bytes(PAGE_SIZE))
        return table

    def entry_address(self, gpa: int, level: int, create: bool = True) -> int:
        """Host-physical address of the entry at `level` (4 = PML4E ... 1 = PTE) translating `gpa`."""
        table = self.pml4
        for current in range(EPT_PML4_LEVEL, level, -1):
            slot = table + ((gpa >> level_shift(current)) & LEVEL_INDEX_MASK) * QWORD
            entry = self.ram.read_u64(slot)
            if not entry & EPT_RWX_MASK:
                if not create:
                    raise KeyError(f"no EPT table for {gpa:#x} at level {current}")
                entry = self._new_table() | EPT_RWX_MASK
                self.ram.write_u64(slot, entry)
            elif entry & EPT_LARGE_PAGE:
                raise ValueError(f"{gpa:#x} is already mapped by a large page at level {current}")
            table = entry & ADDRESS_MASK
        return table + ((gpa >> level_shift(level)) & LEVEL_INDEX_MASK) * QWORD

    def map(self, gpa: int, hpa: int, size: int = PAGE_SIZE, permissions: int = EPT_RWX_MASK,
            memory_type_bits: int = EPT_WB) -> int:
        """Maps one page of `size` (4 KiB, 2 MiB or 1 GiB); returns the leaf entry's address."""
        assert gpa % size == 0 and hpa % size == 0
        level = EPT_LEAF_LEVEL[size]
        address = self.entry_address(gpa, level)
        self.ram.write_u64(address, hpa | permissions | memory_type_bits | (EPT_LARGE_PAGE if level > 1 else 0))
        return address

    def map_range(self, gpa: int, hpa: int, length: int, size: int = PAGE_2M,
                  permissions: int = EPT_RWX_MASK) -> None:
        for offset in range(0, length, size):
            self.map(gpa + offset, hpa + offset, size, permissions)

    def translate(self, gpa: int) -> int | None:
        """Host-physical address for `gpa` by walking the structures in RAM; None if not readable."""
        table = self.pml4
        for level in range(EPT_PML4_LEVEL, 0, -1):
            entry = self.ram.read_u64(table + ((gpa >> level_shift(level)) & LEVEL_INDEX_MASK) * QWORD)
            if not entry & EPT_READ:
                return None
            if level == 1 or entry & EPT_LARGE_PAGE:
                mask = (1 << level_shift(level)) - 1
                return (entry & ADDRESS_MASK & ~mask) | (gpa & mask)
            table = entry & ADDRESS_MASK
        return None


# --- a guest ------------------------------------------------------------------------------------------
def default_controls(*, primary: int = PrimaryProcessorControls.HLT_EXITING, pin: int = 0,
                     exit: int = 0, entry: int = 0, secondary: int = SecondaryProcessorControls.ENABLE_EPT
                     ) -> dict[str, int]:
    """VMX controls adjusted to the capability MSRs (allowed-0 bits set, unsupported bits cleared)."""
    return {
        "PIN_BASED_VM_EXEC_CONTROL": CAPS.pin_based.adjust(int(pin)),
        "CPU_BASED_VM_EXEC_CONTROL": CAPS.primary_processor.adjust(
            int(primary | PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS)),
        "SECONDARY_VM_EXEC_CONTROL": CAPS.secondary_processor.adjust(int(secondary)),
        "VM_EXIT_CONTROLS": CAPS.exit.adjust(int(exit | ExitControls.HOST_ADDRESS_SPACE_SIZE)),
        "VM_ENTRY_CONTROLS": CAPS.entry.adjust(int(entry | EntryControls.IA32E_MODE_GUEST)),
    }


def guest_state_fields(rip: int = GUEST_CODE) -> dict[str, int]:
    """A 64-bit guest at CPL 0 with flat segments, the GDT/TSS/IDT of this map and paging on."""
    unusable = int(AR_UNUSABLE)
    return {
        "GUEST_CR0": int(Cr0.PE | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG),
        "GUEST_CR3": GUEST_PML4,
        "GUEST_CR4": int(Cr4.PAE | Cr4.VMXE | Cr4.OSFXSR | Cr4.OSXMMEXCPT),
        "GUEST_IA32_EFER": int(Efer.LME | Efer.LMA | Efer.NXE),
        "GUEST_CS_SELECTOR": CODE_SELECTOR, "GUEST_CS_AR_BYTES": CODE64_ACCESS_RIGHTS,
        "GUEST_CS_LIMIT": FLAT_LIMIT,
        "GUEST_SS_SELECTOR": DATA_SELECTOR, "GUEST_SS_AR_BYTES": DATA_ACCESS_RIGHTS,
        "GUEST_SS_LIMIT": FLAT_LIMIT,
        "GUEST_DS_AR_BYTES": unusable, "GUEST_ES_AR_BYTES": unusable, "GUEST_FS_AR_BYTES": unusable,
        "GUEST_GS_AR_BYTES": unusable, "GUEST_LDTR_AR_BYTES": unusable,
        "GUEST_TR_SELECTOR": TSS_SELECTOR, "GUEST_TR_AR_BYTES": BUSY_TSS_ACCESS_RIGHTS,
        "GUEST_TR_LIMIT": TSS_LIMIT, "GUEST_TR_BASE": GUEST_TSS,
        "GUEST_GDTR_BASE": GUEST_GDT, "GUEST_GDTR_LIMIT": GDT_LIMIT,
        "GUEST_IDTR_BASE": GUEST_IDT, "GUEST_IDTR_LIMIT": GUEST_IDT_LIMIT,
        "GUEST_RFLAGS": int(Rflags.FIXED1), "GUEST_RSP": GUEST_STACK_TOP, "GUEST_RIP": rip,
        "GUEST_DR7": DR7_RESET_VALUE,
        "VMCS_LINK_POINTER": VMCS_LINK_POINTER_NONE,
    }


@dataclass
class Guest:
    """A guest laid out in RAM: its EPT, its memory (written through the EPT) and its VMCS fields."""

    machine: Machine
    ept: Ept
    fields: dict[str, int] = field(default_factory=dict)

    def hpa(self, gpa: int) -> int:
        address = self.ept.translate(gpa)
        if address is None:
            raise KeyError(f"guest-physical {gpa:#x} is not mapped")
        return address

    def write(self, gpa: int, data: bytes) -> None:
        """Writes guest memory page by page through the guest's EPT (as a loader would)."""
        offset = 0
        while offset < len(data):
            chunk = min(len(data) - offset, PAGE_SIZE - (gpa + offset) % PAGE_SIZE)
            self.machine.ram.write(self.hpa(gpa + offset), data[offset:offset + chunk])
            offset += chunk

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.machine.ram.read(self.hpa(gpa + i), 1) for i in range(length))

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, QWORD))[0]

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value & U64))

    def load_code(self, gpa: int, source: str) -> None:
        self.write(gpa, assemble(source, gpa))


def build_guest(machine: Machine, code: str, *, extra_code: dict[int, str] | None = None,
                ept: Ept | None = None, map_default_ram: bool = True, controls: dict[str, int] | None = None,
                fields: dict[str, int] | None = None) -> Guest:
    """Lays out a guest: EPT (GPA 0..GUEST_RAM_SIZE -> GUEST_RAM_BASE in 2 MiB pages), guest page
    tables (identity, 1 GiB pages), GDT and TSS, code at GUEST_CODE and any `extra_code` blobs, and
    the VMX regions' revision ids. Returns the guest with the VMCS fields a root program writes."""
    ram = machine.ram
    ept = ept or Ept(machine)
    if map_default_ram:
        ept.map_range(0, GUEST_RAM_BASE, GUEST_RAM_SIZE, PAGE_2M)
    guest = Guest(machine, ept)
    guest.write(GUEST_PML4, struct.pack("<Q", GUEST_PDPT | PTE_PRESENT_WRITABLE))
    guest.write(GUEST_PDPT, b"".join(struct.pack("<Q", gib * PAGE_1G | PTE_PRESENT_WRITABLE | PTE_LARGE_PAGE)
                                     for gib in range(GUEST_IDENTITY_GIBS)))
    guest.write(GUEST_GDT, b"".join(struct.pack("<Q", q) for q in gdt_quads(GUEST_TSS)))
    guest.load_code(GUEST_CODE, code)
    for gpa, source in (extra_code or {}).items():
        guest.load_code(gpa, source)
    for region in (VMXON_REGION, VMCS_REGION, SECOND_VMCS_REGION):
        ram.write_u32(region, CAPS.vmcs_revision_id)
    guest.fields = {**(controls or default_controls()), "EPT_POINTER": ept.eptp, **guest_state_fields()}
    guest.fields.update(fields or {})
    return guest


def prepare_vmcs(guest: Guest, vmcs: int = VMCS_REGION, exit_label: str = "vm_exit") -> str:
    """VMCLEAR and VMPTRLD `vmcs`, then write the guest's fields and the host state."""
    return lines(make_current(vmcs), write_fields(guest.fields), write_host_state(exit_label))


def vmx_program(guest: Guest, exit_handler: str, *, before_launch: str = "", after_exit_code: str = "",
                vmcs: int = VMCS_REGION) -> str:
    """Root program: VMXON, make `vmcs` current, write the guest's fields and host state, VMLAUNCH.

    A failed VMLAUNCH records RFLAGS and VM_INSTRUCTION_ERROR and exits EXIT_LAUNCH_FAILED;
    VM exits go to `exit_handler`, which must define the label `vm_exit`.
    """
    return lines(
        enable_vmx(),
        prepare_vmcs(guest, vmcs),
        before_launch,
        "vmlaunch",
        record_failure(SLOT_LAUNCH_FLAGS, SLOT_LAUNCH_ERROR, EXIT_LAUNCH_FAILED),
        exit_handler,
        after_exit_code)


def run_guest(machine: Machine, guest_code: str, *, stop_reasons: tuple[int, ...] = (),
              resume: bool = True, before_launch: str = "", on_exit: str = "",
              max_instructions: int = DEFAULT_INSTRUCTION_LIMIT, **guest_options) -> tuple[RunResult, Guest]:
    """Builds a guest, launches it from a root program with the standard exit logger, and runs."""
    guest = build_guest(machine, guest_code, **guest_options)
    program = vmx_program(guest, exit_logger(stop_reasons, resume=resume, on_exit=on_exit),
                          before_launch=before_launch)
    return run_root(machine, program, max_instructions), guest


# --- two LPs with timer ticks and IPIs ---------------------------------------------------------------
QUANTUM = 400                            # ticks per LP turn: small, so the two LPs interleave finely
LP0_TICK, LP1_TICK, IPI_VECTOR = 0x41, 0x42, 0x43
LP0_PERIOD, LP1_PERIOD = 700, 1100
TICKS_BEFORE_STOP = 20
GUEST_CALL_EVERY = 300                   # guest loop iterations between VMCALLs
CPUIDS = 20                              # 2 exits each: fewer than the exit log holds, the run ends at HLT
CPUID_LOOP = lines(f"mov r9, {CPUIDS}", "again:", "mov eax, r9d", "cpuid", "vmcall", "dec r9", "jnz again", "hlt")


def root_timers_program() -> str:
    """LP 0 counts its own ticks and stops the machine; LP 1 ticks and sends LP 0 an IPI each tick."""
    return lines(
        set_interrupt_gate(ROOT_IDT, LP0_TICK, "lp0_tick"), set_interrupt_gate(ROOT_IDT, LP1_TICK, "lp1_tick"),
        set_interrupt_gate(ROOT_IDT, IPI_VECTOR, "lp0_ipi"),
        "xor r13, r13", "xor r14, r14",
        "test rdi, rdi", "jnz lp1",
        arm_timer(LP0_TICK, LP0_PERIOD, periodic=True), "sti",
        "lp0_work:", "inc r14", "imul r15, r14, 7", f"cmp r13, {TICKS_BEFORE_STOP}", "jb lp0_work",
        debug_exit(EXIT_OK),
        "lp1:", arm_timer(LP1_TICK, LP1_PERIOD, periodic=True), "sti",
        "lp1_work:", "inc r14", "jmp lp1_work",
        "lp0_tick:", "push rax", "push rdx", putc("a"), "inc r13", "pop rdx", "pop rax", "iretq",
        "lp0_ipi:", "push rax", "push rdx", putc("i"), "pop rdx", "pop rax", "iretq",
        "lp1_tick:", "push rax", "push rdx", putc("b"), send_ipi(IPI_VECTOR), "pop rdx", "pop rax", "iretq")


def guest_with_ipi_ticker(machine: Machine, guest_code: str, stop_reasons: tuple[int, ...] = ()) -> str:
    """LP 0 runs `guest_code` as a guest that exits on each external interrupt, logged by the standard
    exit logger (stopping on `stop_reasons`); LP 1 sends LP 0 an IPI on each of its timer ticks."""
    guest = build_guest(machine, guest_code,
                        controls=default_controls(pin=PinBasedControls.EXTERNAL_INTERRUPT_EXITING,
                                                  exit=ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT))
    lp1 = lines("lp1:", set_interrupt_gate(ROOT_IDT, LP1_TICK, "lp1_tick"),
                arm_timer(LP1_TICK, LP1_PERIOD, periodic=True),
                "sti", "lp1_work:", "pause", "jmp lp1_work",
                "lp1_tick:", putc("b"), send_ipi(IPI_VECTOR), "iretq")
    return lines("test rdi, rdi", "jnz lp1", vmx_program(guest, exit_logger(stop_reasons)), lp1)


def guest_and_timer_program(machine: Machine) -> str:
    """A guest that exits on LP 1's IPIs and now and then with VMCALL; the run ends when its exit log is full."""
    guest_code = lines("xor ebx, ebx", "work:", "inc rbx", "mov rax, rbx", "xor edx, edx",
                       f"mov ecx, {GUEST_CALL_EVERY}", "div rcx", "test rdx, rdx", "jnz work", "vmcall", "jmp work")
    return guest_with_ipi_ticker(machine, guest_code)


def cpuid_guest_with_interrupts(machine: Machine) -> str:
    """A guest running CPUIDs (exits in C) and taking external-interrupt exits (in Python) from LP 1's
    IPIs; the exit logger stops at the guest's HLT or when its log is full."""
    return guest_with_ipi_ticker(machine, CPUID_LOOP, (ExitReason.HLT,))
