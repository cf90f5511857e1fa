"""The machine's CPUID table: fixed, documented values, the same on every host (SDM Vol. 2A CPUID)."""
from __future__ import annotations

from emu.vmx_caps import MACHINE_LINEAR_ADDRESS_WIDTH, MACHINE_MAXPHYADDR

VENDOR = b"HHRMachine64"          # twelve bytes, returned in EBX, EDX, ECX
MAX_BASIC_LEAF = 0x7
MAX_EXTENDED_LEAF = 0x8000_0008
EXTENDED_BASE = 0x8000_0000
FAMILY_MODEL_STEPPING = 0x0000_0F01   # family 15, model 0, stepping 1
APIC_ID_SHIFT = 24
LOGICAL_COUNT_SHIFT = 16
CLFLUSH_LINE_SIZE_IN_QWORDS = 8 << 8  # EBX bits 15:8: 64-byte lines
LINEAR_WIDTH_SHIFT = 8

# Leaf 1 feature bits (SDM Vol. 2A Table 3-10 and 3-11).
LEAF1_ECX = (1 << 0) | (1 << 5) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23)
"""SSE3, VMX, SSSE3, CMPXCHG16B, SSE4.1, SSE4.2, POPCNT."""
LEAF1_EDX = ((1 << 0) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 11)
             | (1 << 13) | (1 << 15) | (1 << 16) | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26))
"""FPU, PSE, TSC, MSR, PAE, CX8, SEP, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2."""
EXT1_EDX = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)
"""SYSCALL, NX, 1-GiB pages, RDTSCP, Intel 64."""
EXT1_ECX = 1 << 0
"""LAHF/SAHF in 64-bit mode."""


def _vendor_registers() -> tuple[int, int, int]:
    ebx, edx, ecx = (int.from_bytes(VENDOR[i:i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def cpuid(leaf: int, subleaf: int, lp_index: int, lp_count: int) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX for one leaf; unknown leaves return zeros (as leaves above the maximum do
    on Intel processors, which return the highest basic leaf instead; we keep zeros, documented)."""
    ebx, ecx, edx = _vendor_registers()
    if leaf == 0:
        return MAX_BASIC_LEAF, ebx, ecx, edx
    if leaf == 1:
        return (FAMILY_MODEL_STEPPING,
                (lp_index << APIC_ID_SHIFT) | (lp_count << LOGICAL_COUNT_SHIFT) | CLFLUSH_LINE_SIZE_IN_QWORDS,
                LEAF1_ECX, LEAF1_EDX)
    if leaf == EXTENDED_BASE:
        return MAX_EXTENDED_LEAF, ebx, ecx, edx
    if leaf == EXTENDED_BASE + 1:
        return 0, 0, EXT1_ECX, EXT1_EDX
    if leaf == MAX_EXTENDED_LEAF:
        return MACHINE_MAXPHYADDR | (MACHINE_LINEAR_ADDRESS_WIDTH << LINEAR_WIDTH_SHIFT), 0, 0, 0
    return 0, 0, 0, 0
