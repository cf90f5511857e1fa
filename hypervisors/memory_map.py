"""Where the firmware step puts things in host memory, and the guest-physical layout every guest gets (docs/boot.md)."""
from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30
PAGE_SIZE = 4096
LARGE_PAGE_SIZE = 2 * MIB

# Page geometry of the paging structures and EPT (SDM Vol. 3A 4.5, Vol. 3C 29.3.2).
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
GIB_SHIFT = GIB.bit_length() - 1
TABLE_ENTRY_BYTES = 8
ENTRIES_PER_TABLE = PAGE_SIZE // TABLE_ENTRY_BYTES
# The page-ownership database counts memory in frames of one large page (docs/hv1.md).
FRAME_SHIFT = LARGE_PAGE_SIZE.bit_length() - 1
PAGES_PER_FRAME = LARGE_PAGE_SIZE // PAGE_SIZE

# Host-physical.
BOOT_INFO_ADDRESS = 0x9000            # below 1 MiB, above the firmware page tables (0x1000-0x2FFF)
HYPERVISOR_BASE = 2 * MIB             # the hypervisor image (at most HYPERVISOR_MAX_SIZE)
HYPERVISOR_MAX_SIZE = 2 * MIB
GUEST_STAGING_BASE = 4 * MIB          # guest images as the firmware hands them over
GUEST_STAGING_END = 16 * MIB
HEAP_BASE = 16 * MIB                  # the hypervisor's own data
HEAP_SIZE = 16 * MIB
FREE_BASE = HEAP_BASE + HEAP_SIZE     # partitions' memory, up to the end of RAM
LP_STACK_SIZE = 64 * 1024
MAX_LPS = 64
MAX_VPS = 256
MAX_PARTITIONS = 64

# Guest-physical (the guest ABI, docs/guests.md).
GUEST_PML4 = 0x1000
GUEST_PDPT = 0x2000
GUEST_GDT = 0x3000
GUEST_TSS = 0x4000
GUEST_LOAD_ADDRESS = 0x10_0000        # flat images are loaded and entered here
GUEST_VP_STACK_SIZE = 64 * 1024       # VP n's stack ends n stacks below the top of guest RAM
DEFAULT_GUEST_MEMORY = 64 * MIB
GUEST_CODE_SELECTOR = 0x08
GUEST_DATA_SELECTOR = 0x10
GUEST_TSS_SELECTOR = 0x18


def constants() -> dict[str, int]:
    return {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)}
