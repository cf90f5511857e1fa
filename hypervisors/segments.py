"""The flat 64-bit segments hhr's monitors use and give their guests: access rights, limits and GDT descriptors."""
from __future__ import annotations

from emu import vmx_defs as arch
from hypervisors import memory_map

# Access rights in the VMCS format (SDM Vol. 3C 25.4.1): bits 7:0 are the descriptor's type, S, DPL
# and P; bits 15:12 its AVL, L, D/B and G. Every segment is present at DPL 0.
CODE64_ACCESS_RIGHTS = (arch.SEGMENT_TYPE_CODE | arch.SEGMENT_TYPE_READABLE_OR_WRITABLE | arch.SEGMENT_TYPE_ACCESSED
                        | arch.AR_S | arch.AR_P | arch.AR_L | arch.AR_G)      # execute/read, accessed, 64-bit
DATA_ACCESS_RIGHTS = (arch.SEGMENT_TYPE_READABLE_OR_WRITABLE | arch.SEGMENT_TYPE_ACCESSED
                      | arch.AR_S | arch.AR_P | arch.AR_DB | arch.AR_G)       # read/write, accessed
TSS64_BUSY_ACCESS_RIGHTS = arch.SYSTEM_TYPE_BUSY_TSS | arch.AR_P
SYSTEM_TYPE_AVAILABLE_TSS = 9                                      # 64-bit TSS, available (SDM Vol. 3A 3.5)
TSS64_AVAILABLE_ACCESS_RIGHTS = SYSTEM_TYPE_AVAILABLE_TSS | arch.AR_P

FLAT_LIMIT = 0xFFFF_FFFF                  # a segment's limit in bytes: 4 GiB, with G = 1
FLAT_LIMIT_PAGES = 0xF_FFFF               # the same in the descriptor's 20-bit field, in 4 KiB units
TSS64_BYTES = 0x68                        # a 64-bit TSS (SDM Vol. 3A 8.7)
TSS64_LIMIT = TSS64_BYTES - 1
DESCRIPTOR_BYTES = 8
TSS64_DESCRIPTOR_BYTES = 16               # a 64-bit TSS descriptor takes two GDT slots (SDM Vol. 3A 8.2.3)
DR7_INIT = 0x400                          # DR7 after reset: bit 10 reads as 1 (SDM Vol. 3B 18.2.4)
IDTR_LIMIT_AT_RESET = arch.DESCRIPTOR_TABLE_LIMIT_MAX   # a VP starts with IDTR as after reset (SDM Vol. 3A Table 10-1)

# An 8-byte descriptor's fields (SDM Vol. 3A 3.4.5): limit 15:0, base 23:0, the access byte, limit
# 19:16 with the flags (AVL, L, D/B, G), base 31:24.
_LIMIT_LOW_BITS = 16
_BASE_LOW_SHIFT, _BASE_LOW_BITS = 16, 24
_ACCESS_BYTE_SHIFT = 40
_LIMIT_HIGH_SHIFT = 48
_FLAGS_SHIFT = 52
_BASE_HIGH_SHIFT = 56
_BYTE_MASK = 0xFF
_FLAGS_OF_ACCESS_RIGHTS = 12


def descriptor(base: int, limit: int, access_rights: int) -> int:
    """The low 8 bytes of a GDT descriptor with this base, limit (as the descriptor holds it: in pages
    when G = 1) and access rights in the VMCS format. Bits 63:32 of a TSS's base go in the next 8."""
    low_mask = (1 << _BASE_LOW_BITS) - 1
    return ((limit & ((1 << _LIMIT_LOW_BITS) - 1))
            | (base & low_mask) << _BASE_LOW_SHIFT
            | (access_rights & _BYTE_MASK) << _ACCESS_BYTE_SHIFT
            | (limit >> _LIMIT_LOW_BITS) << _LIMIT_HIGH_SHIFT
            | (access_rights >> _FLAGS_OF_ACCESS_RIGHTS) << _FLAGS_SHIFT
            | (base >> _BASE_LOW_BITS & _BYTE_MASK) << _BASE_HIGH_SHIFT)


# A guest's GDT (docs/guests.md): null, code, data, and its busy TSS at GUEST_TSS.
GUEST_CODE_DESCRIPTOR = descriptor(0, FLAT_LIMIT_PAGES, CODE64_ACCESS_RIGHTS)
GUEST_DATA_DESCRIPTOR = descriptor(0, FLAT_LIMIT_PAGES, DATA_ACCESS_RIGHTS)
GUEST_TSS_DESCRIPTOR = descriptor(memory_map.GUEST_TSS, TSS64_LIMIT, TSS64_BUSY_ACCESS_RIGHTS)
GUEST_GDT_LIMIT = memory_map.GUEST_TSS_SELECTOR + TSS64_DESCRIPTOR_BYTES - 1
GUEST_GDT_ENTRIES = {                     # selector: the descriptor's low 8 bytes
    0: 0,
    memory_map.GUEST_CODE_SELECTOR: GUEST_CODE_DESCRIPTOR,
    memory_map.GUEST_DATA_SELECTOR: GUEST_DATA_DESCRIPTOR,
    memory_map.GUEST_TSS_SELECTOR: GUEST_TSS_DESCRIPTOR,
    memory_map.GUEST_TSS_SELECTOR + DESCRIPTOR_BYTES: 0,   # the TSS's base 63:32
}

# The hypervisor's own GDT (common/data.inc): the same segments, not yet accessed, and an available
# TSS whose base build_tables fills in at run time.
HV_CODE_DESCRIPTOR = descriptor(0, FLAT_LIMIT_PAGES, CODE64_ACCESS_RIGHTS & ~arch.SEGMENT_TYPE_ACCESSED)
HV_DATA_DESCRIPTOR = descriptor(0, FLAT_LIMIT_PAGES, DATA_ACCESS_RIGHTS & ~arch.SEGMENT_TYPE_ACCESSED)
HV_TSS_DESCRIPTOR_NO_BASE = descriptor(0, TSS64_LIMIT, TSS64_AVAILABLE_ACCESS_RIGHTS)


def constants() -> dict[str, int]:
    """Every value above, for assembly sources."""
    return {name: value for name, value in globals().items()
            if name.isupper() and not name.startswith("_") and isinstance(value, int)}
