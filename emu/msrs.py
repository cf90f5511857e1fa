"""The model-specific registers of the machine: their indices and which ones software may read, write and load."""
from __future__ import annotations

from emu.vmx_defs import MSR_IA32_EFER

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

# MSRs Unicorn models; RDMSR and WRMSR reach them directly.
NATIVE_MSRS = frozenset({MSR_IA32_EFER, IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_FS_BASE,
                         IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_SYSENTER_CS, IA32_SYSENTER_ESP,
                         IA32_SYSENTER_EIP, IA32_PAT})

# MSRs a VM-entry MSR-load list may load on this machine. SDM Vol. 3C 27.4 forbids FS and GS base
# (the guest-state area holds them); IA32_EFER is loaded by the "load IA32_EFER" entry control.
ENTRY_LOADABLE_MSRS = NATIVE_MSRS - {IA32_FS_BASE, IA32_GS_BASE, MSR_IA32_EFER}
