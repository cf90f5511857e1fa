"""The model-specific registers of the machine: their indices and which ones software may read, write and load."""
from __future__ import annotations

from emu.vmentry_checks import is_canonical
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES, msr_values
from emu.vmx_defs import MSR_IA32_EFER, U32_MASK, Efer

# Indices, SDM Vol. 4 Table 2-2.
IA32_TSC = 0x10
IA32_FEATURE_CONTROL = 0x3A
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_PAT = 0x277
IA32_STAR = 0xC000_0081
IA32_LSTAR = 0xC000_0082
IA32_CSTAR = 0xC000_0083
IA32_FMASK = 0xC000_0084
IA32_FS_BASE = 0xC000_0100
IA32_GS_BASE = 0xC000_0101
IA32_KERNEL_GS_BASE = 0xC000_0102
IA32_TSC_AUX = 0xC000_0103

FEATURE_CONTROL_LOCKED_VMX = 0x5      # lock bit and "VMX outside SMX" (SDM Vol. 3C 24.7)
VMX_CAPABILITY_MSRS = msr_values()     # what RDMSR of 0x480-0x491 reads (the capabilities are fixed)

# MSRs Unicorn models; RDMSR and WRMSR reach them directly.
NATIVE_MSRS = frozenset({MSR_IA32_EFER, IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_FS_BASE,
                         IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_SYSENTER_CS, IA32_SYSENTER_ESP,
                         IA32_SYSENTER_EIP, IA32_PAT, IA32_TSC_AUX})

# MSRs no VMCS field holds and no VM entry or exit switches on this machine (there are no "load
# IA32_PAT" controls): root and guest share them, as they share x87/SSE state, CR2 and DR0-DR6
# (docs/machine.md 7.4).
SHARED_MSRS = frozenset({IA32_KERNEL_GS_BASE, IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_TSC_AUX,
                         IA32_PAT})

# What WRMSR refuses with #GP(0) (SDM Vol. 4 Table 2-2; Vol. 3A 5.8.8 for the SYSCALL MSRs).
CANONICAL_ADDRESS_MSRS = frozenset({IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR,
                                    IA32_CSTAR, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP})
LOW_HALF_ONLY_MSRS = frozenset({IA32_FMASK, IA32_TSC_AUX})   # bits 63:32 reserved
LOW_HALF_MASK = U32_MASK
PAT_ENTRIES = 8
PAT_ENTRY_BITS = 8
PAT_VALID_TYPES = frozenset({0, 1, 4, 5, 6, 7})   # UC, WC, WT, WP, WB, UC- (SDM Vol. 3A 11.12.2)


def pat_is_valid(value: int) -> bool:
    """Every entry a defined memory type with its reserved bits 7:3 clear (SDM Vol. 3A 11.12.2)."""
    entries = ((value >> (PAT_ENTRY_BITS * n)) & ((1 << PAT_ENTRY_BITS) - 1) for n in range(PAT_ENTRIES))
    return all(entry in PAT_VALID_TYPES for entry in entries)


EFER_DEFINED_BITS = Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE


def efer_write(current: int, value: int) -> int | None:
    """What WRMSR to IA32_EFER loads, or None for #GP(0): reserved bits must be 0 and LME may not
    change while paging is on, as it always is here; LMA is the processor's own (SDM Vol. 3A 9.8.5)."""
    if value & ~EFER_DEFINED_BITS or (value ^ current) & Efer.LME:
        return None
    return (value & ~Efer.LMA) | (current & Efer.LMA)


def write_is_valid(index: int, value: int) -> bool:
    """Whether WRMSR of `value` to a writable MSR completes instead of raising #GP(0) (IA32_EFER
    depends on its current value too: efer_write)."""
    if index in CANONICAL_ADDRESS_MSRS:
        return is_canonical(value, MACHINE_VMX_CAPABILITIES.linear_address_width)
    if index in LOW_HALF_ONLY_MSRS:
        return value <= LOW_HALF_MASK
    if index == IA32_PAT:
        return pat_is_valid(value)
    return True

# MSRs a VM-entry MSR-load list may load on this machine. SDM Vol. 3C 27.4 forbids FS and GS base
# (the guest-state area holds them); IA32_EFER is loaded by the "load IA32_EFER" entry control.
ENTRY_LOADABLE_MSRS = NATIVE_MSRS - {IA32_FS_BASE, IA32_GS_BASE, MSR_IA32_EFER}


def list_may_load(index: int, value: int) -> bool:
    """Whether a VM-entry or VM-exit MSR-load list may load `value` into MSR `index` (SDM Vol. 3C
    27.4, 28.6): an MSR of ENTRY_LOADABLE_MSRS and a value WRMSR would take."""
    return index in ENTRY_LOADABLE_MSRS and write_is_valid(index, value)
