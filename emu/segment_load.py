"""Loading a guest's FS or GS selector into its instance: what Unicorn reads, checked before it reads it.

In 64-bit mode Unicorn loads the CS, SS, DS and ES selectors without reading memory, but FS and GS
as MOV to FS/GS does (SDM Vol. 3A 3.4.3, 5.4.1): it reads the selector's 8-byte descriptor from the
GDT (the LDT when the TI bit is 1), refuses a descriptor that instruction would refuse, and sets the
descriptor's accessed bit. A translation that fails there fails outside emu_start, where Unicorn
cannot deliver the fault and the process dies. So the machine makes every such read and write
itself first, through the instance's own paging and EPT (the same walker Unicorn's TLB fill uses),
and refuses the selector instead: the VM entry fails with a machine-specific check
(docs/machine.md 7.7.4 and 10.2; the SDM loads the hidden part of a segment register from the
VMCS and reads no descriptor).
"""
from __future__ import annotations

from unicorn import x86_const as x86

from emu import fast
from emu.vmentry_checks import (
    GUEST_FS_GS_DESCRIPTOR_LOADABLE, GUEST_FS_GS_DESCRIPTOR_TRANSLATES, EntryCheckFailure, guest_state_message,
    is_canonical, make_failure,
)
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import (
    AR_DPL_MASK, AR_DPL_SHIFT, AR_P, AR_S, PAGE_SIZE, SEGMENT_TYPE_ACCESSED, SEGMENT_TYPE_CODE,
    SEGMENT_TYPE_CONFORMING_OR_EXPAND_DOWN, SEGMENT_TYPE_READABLE_OR_WRITABLE, SELECTOR_RPL_MASK,
    SELECTOR_TI, U64_MASK as U64, Cr0, Rflags,
)

# Segment registers whose selector Unicorn loads through the descriptor tables (its reg_write of
# UC_X86_REG_FS/GS in UC_MODE_64), by name.
DESCRIPTOR_LOADED_SEGMENTS = {x86.UC_X86_REG_FS: "FS", x86.UC_X86_REG_GS: "GS"}
SELECTOR_NULL_MASK = 0xFFFC            # selectors 0-3 are null (SDM Vol. 3A 3.4.2); Unicorn tests these bits
SELECTOR_OFFSET_MASK = 0xFFF8          # index * 8: the descriptor's offset in its table
DESCRIPTOR_SIZE = 8
DESCRIPTOR_HIGH_DWORD = 4              # offset of the dword with type, S, DPL and P (SDM Vol. 3A Figure 3-8)
DWORD = 4
DESCRIPTOR_ACCESS_RIGHTS_SHIFT = 8     # bits 15:8 of that dword: the access-rights byte of a VMCS AR field
ACCESS_RIGHTS_BYTE = 0xFF
MACHINE_CPL = 0                        # all code runs at CPL 0 on this machine (docs/machine.md 10.1)

_FAULT_NAMES = {
    fast.FAULT_PAGE_FAULT: "a page fault", fast.FAULT_EPT_VIOLATION: "an EPT violation",
    fast.FAULT_EPT_MISCONFIG: "an EPT misconfiguration", fast.FAULT_NONEXISTENT_MEMORY: "no memory there",
}


def load_refusal(context, register: int, selector: int) -> EntryCheckFailure | None:
    """None when Unicorn can load `selector` into `register` of `context` (its instance, with the
    guest's control registers, descriptor tables and EPT already in place) without a memory access
    that fails; otherwise the VM-entry failure that refuses it."""
    if register not in DESCRIPTOR_LOADED_SEGMENTS or not selector & SELECTOR_NULL_MASK:
        return None
    regs = context.regs
    if not regs.read(x86.UC_X86_REG_CR0) & Cr0.PE or regs.read(x86.UC_X86_REG_RFLAGS) & Rflags.VM:
        return None     # real and virtual-8086 mode load a selector without a descriptor
    name = DESCRIPTOR_LOADED_SEGMENTS[register]
    table_name, table = ("LDT", x86.UC_X86_REG_LDTR) if selector & SELECTOR_TI else ("GDT", x86.UC_X86_REG_GDTR)
    base, limit = regs.read_table(table)
    offset = selector & SELECTOR_OFFSET_MASK
    what = f"{name} selector {selector:#x}"
    if offset + DESCRIPTOR_SIZE - 1 > limit:
        return _failure(GUEST_FS_GS_DESCRIPTOR_LOADABLE,
                        f"{what} (its descriptor is beyond the {table_name} limit {limit:#x})")
    address = (base + offset) & U64
    descriptor, problem = _access(context, address, DESCRIPTOR_SIZE, fast.ACCESS_READ)
    if problem is not None:
        return _failure(GUEST_FS_GS_DESCRIPTOR_TRANSLATES,
                        f"{what} (its descriptor at {table_name} linear {address:#x} cannot be read: {problem})")
    high = int.from_bytes(descriptor[DESCRIPTOR_HIGH_DWORD:], "little")
    access_rights = (high >> DESCRIPTOR_ACCESS_RIGHTS_SHIFT) & ACCESS_RIGHTS_BYTE
    refused = _refused_by_mov(access_rights, selector)
    if refused is not None:
        return _failure(GUEST_FS_GS_DESCRIPTOR_LOADABLE,
                        f"{what} (descriptor access rights {access_rights:#x}: {refused})")
    if not access_rights & SEGMENT_TYPE_ACCESSED:
        _data, problem = _access(context, (address + DESCRIPTOR_HIGH_DWORD) & U64, DWORD, fast.ACCESS_WRITE)
        if problem is not None:
            return _failure(GUEST_FS_GS_DESCRIPTOR_TRANSLATES,
                            f"{what} (its accessed bit is 0 and the descriptor at {table_name} linear "
                            f"{address:#x} cannot be written to set it: {problem})")
    return None


def emulator_refusal(register: int, selector: int, error: int) -> EntryCheckFailure:
    """The failure when Unicorn refused a selector `load_refusal` let through (a CPL other than 0)."""
    return _failure(GUEST_FS_GS_DESCRIPTOR_LOADABLE,
                    f"{DESCRIPTOR_LOADED_SEGMENTS.get(register, register)} selector {selector:#x} "
                    f"(refused by the emulator, Unicorn error {error})")


def _failure(check: str, detail: str) -> EntryCheckFailure:
    return make_failure(check, guest_state_message(detail))


def _refused_by_mov(access_rights: int, selector: int) -> str | None:
    """Why MOV to FS/GS at CPL 0 would refuse the descriptor with #GP or #NP (SDM Vol. 3A 5.4.1,
    Vol. 2B MOV), or None."""
    if not access_rights & AR_S:
        return "a system descriptor (S = 0)"
    code = access_rights & SEGMENT_TYPE_CODE
    if code and not access_rights & SEGMENT_TYPE_READABLE_OR_WRITABLE:
        return "an execute-only code segment"
    dpl = (access_rights & AR_DPL_MASK) >> AR_DPL_SHIFT
    conforming = code and access_rights & SEGMENT_TYPE_CONFORMING_OR_EXPAND_DOWN
    if not conforming and (dpl < MACHINE_CPL or dpl < selector & SELECTOR_RPL_MASK):
        return f"DPL {dpl} is below the selector's RPL {selector & SELECTOR_RPL_MASK}"
    if not access_rights & AR_P:
        return "not present (P = 0)"
    return None


def _access(context, address: int, length: int, access: int) -> tuple[bytes | None, str | None]:
    """The bytes at a linear address as Unicorn would access them (addresses wrap at 2^64), or why
    a page of them does not translate."""
    data = bytearray()
    while length > 0:
        if not is_canonical(address, CAPS.linear_address_width):
            return None, f"{address:#x} is not canonical"
        physical, fault = context.translate(address, access)
        if fault is not None:
            where = f"linear {address:#x}"
            if fault.kind != fast.FAULT_PAGE_FAULT:
                where += f", guest-physical {fault.guest_physical:#x}"
            return None, f"{_FAULT_NAMES.get(fault.kind, 'a fault')} at {where}"
        chunk = min(length, PAGE_SIZE - address % PAGE_SIZE)
        data += context.ram.read(physical, chunk)
        address = (address + chunk) & U64
        length -= chunk
    return bytes(data), None
