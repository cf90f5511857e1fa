"""What guests of hhr see of the platform and must keep seeing across a hot restart: the CPUID answers (the version leaf aside)."""
from __future__ import annotations

HV_CPUID_VENDOR = b"HHRHYPERVSR1"               # leaf 0 and leaf 0x40000000, twelve bytes
HV_CPUID_MAX_BASIC_LEAF = 1
HV_CPUID_HYPERVISOR_BASE = 0x4000_0000
HV_CPUID_MAX_HYPERVISOR_LEAF = 0x4000_0001
HV_CPUID_FAMILY_MODEL = 0x0000_0F01
# Leaf 1 (SDM Vol. 2A Tables 3-10, 3-11): SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, hypervisor present.
HV_CPUID_LEAF1_ECX = (1 << 0) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 31)
# FPU, TSC, MSR, PAE, CX8, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2.
HV_CPUID_LEAF1_EDX = ((1 << 0) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 15) | (1 << 16)
                      | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26))
HV_CPUID_APIC_ID_SHIFT = 24
HV_CPUID_VP_COUNT_SHIFT = 16


def _vendor_word(index: int) -> int:
    return int.from_bytes(HV_CPUID_VENDOR[4 * index:4 * index + 4], "little")


def constants() -> dict[str, int]:
    values = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)}
    # CPUID returns the vendor in EBX, EDX, ECX order.
    values.update(HV_CPUID_VENDOR_EBX=_vendor_word(0), HV_CPUID_VENDOR_EDX=_vendor_word(1),
                  HV_CPUID_VENDOR_ECX=_vendor_word(2))
    return values
