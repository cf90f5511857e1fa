"""The boot protocol's structures (firmware to hypervisor) and each hypervisor's own records, defined once for Python and assembly."""
from __future__ import annotations

from dataclasses import dataclass

from asm.layout import Struct
from hypervisors import vp_state

BOOT_INFO_MAGIC = int.from_bytes(b"HHRBOOT1", "little")
BOOT_PROTOCOL_VERSION = 1
GUEST_NAME_BYTES = 16

# Written by the firmware step (hypervisors/boot.py) at BOOT_INFO_ADDRESS; docs/boot.md.
BOOT_INFO = Struct("boot_info", [
    ("magic", 8),
    ("version", 4), ("lp_count", 4),
    ("ram_size", 8),
    ("heap_base", 8), ("heap_size", 8),           # host memory reserved for the hypervisor's data
    ("free_base", 8), ("free_size", 8),           # host memory for partitions
    ("guest_count", 4),
    ("doorbell_port", 4),                         # where an operator's requests arrive (docs/machine.md 6.8)
    ("guests", 8),                                # host-physical address of the guest descriptors
    # A hot restart (docs/protocol.md): how this hypervisor was started, and, when it was started
    # in a service partition, the region it lives in and the old hypervisor's transfer area.
    ("mode", 4), ("protocol", 4),                 # BOOT_MODE_*; the restart protocol version
    ("service_base", 8), ("service_size", 8),
    ("transfer_area", 8),
    ("resume_block", 8),                          # BOOT_MODE_RESUME: the disk block of the suspend image
])

BOOT_MODE_COLD = 0            # started by the firmware step, with guests to create
BOOT_MODE_SERVICE = 1         # started by a running hypervisor in a service partition
BOOT_MODE_RESUME = 2          # started by the firmware after a reset, to resume the guests a suspend left on the disk

GUEST_DESCRIPTOR = Struct("guest_descriptor", [
    ("image", 8), ("image_size", 8),              # where the firmware staged the guest's image
    ("memory_size", 8),                           # guest RAM in bytes (a multiple of 2 MiB)
    ("entry", 8),                                 # guest-physical address the VPs start at
    ("vp_count", 4),
    ("device", 4),                                # its assigned block device: 0 none, n + 1 blk n (docs/boot.md)
    ("name", GUEST_NAME_BYTES),
])

# hv1's partition record; `hhr run` reads it to report each guest's outcome.
HV1_PARTITION = Struct("hv1_partition", [
    ("state", 4), ("exit_code", 4),
    ("stop_reason", 4), ("vp_count", 4),
    ("memory", 8), ("memory_size", 8),            # host-physical base and size of guest RAM
    ("eptp", 8),
    ("vps_done", 4), ("channel", 4),              # VPs that finished; console channel of its COM1
    ("number", 4),                                # its place in the partition table (boot order)
    ("mapped_pages", 4),                          # pages it has mapped by hypercall (map window)
    ("window_sum", 8),                            # its window's sum (window_term of memory.inc): a restart checks it
])

# hv1's virtual processor: where it runs and the guest registers a VM exit hands over.
HV1_VP = Struct("hv1_vp", [
    ("partition", 8),                             # address of its HV1_PARTITION record
    ("vmcs", 8),
    ("lp", 4), ("index", 4),
    ("state", 4), ("launched", 4),
    ("halted", 4), ("timer_pending", 4),          # HLT until an interrupt; a tick not yet delivered
    ("timer_vector", 4), ("_pad0", 4),
    ("timer_period", 8), ("timer_deadline", 8),   # the VP's virtual timer (hypercall set-timer)
    ("slice_end", 8),                             # LP time its time slice ends
    ("rax", 8), ("rbx", 8), ("rcx", 8), ("rdx", 8), ("rsi", 8), ("rdi", 8), ("rbp", 8),
    ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8), ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8),
    # The state the VMCS does not hold (hypervisors/vp_state.py): CR2, DR0-DR3, DR6, the shared MSRs,
    # then the FXSAVE area (16-byte aligned: VP records are, hypervisors/build.py checks it).
    *vp_state.record_fields()[:-1],
    ("_pad1", 8),
    vp_state.record_fields()[-1],
])

# hv1's page-ownership database: which host page belongs to whom (docs/hv1.md). One HV1_FRAME per
# 2 MiB of RAM, in the array at hv1's `frame_table`; a frame whose 4 KiB pages have owners of their
# own (pages mapped by hypercall, the EPT tables that map them) is *split* and has 512 HV1_PAGE records.
HV1_FRAME = Struct("hv1_frame", [
    ("owner", 4),                                 # an OWNER_* value
    ("free_pages", 2),                            # of a split frame: its pages owned by nobody
    ("first_free", 2),                            # of a split frame: no page below this one is free
    ("pages", 8),                                 # of a split frame: host address of its HV1_PAGE records
])

HV1_PAGE = Struct("hv1_page", [
    ("owner", 4),                                 # an OWNER_* value, never OWNER_SPLIT
    ("guest_frame", 4),                           # a partition's page: guest-physical address >> 12
])

# hv2's records: the same facts in other shapes, and more of them (docs/hv2.md). A hot restart
# between the two translates through the transfer records of hypervisors/transfer.py.
HV2_PARTITION = Struct("hv2_partition", [
    ("number", 4), ("state", 4),
    ("vp_count", 4), ("channel", 4),
    ("memory", 8), ("memory_size", 8),
    ("eptp", 8),
    ("exit_code", 4), ("stop_reason", 4),
    ("mapped_pages", 4), ("vps_done", 4),
    ("exits", 8),                                 # VM exits of all its VPs (new in hv2)
    ("name", GUEST_NAME_BYTES),                   # the guest's name (new in hv2)
    ("window_sum", 8),                            # its window's sum (window_term of memory.inc): a restart checks it
])

HV2_VP = Struct("hv2_vp", [
    vp_state.record_fields()[-1],                 # hv2 keeps the FXSAVE area first (16-byte aligned)
    ("rax", 8), ("rbx", 8), ("rcx", 8), ("rdx", 8), ("rsi", 8), ("rdi", 8), ("rbp", 8),
    ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8), ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8),
    ("partition", 8), ("vmcs", 8),
    ("index", 4), ("lp", 4),
    ("state", 4), ("launched", 4),
    ("halted", 4), ("timer_pending", 4),
    ("timer_vector", 4), ("_pad0", 4),
    ("timer_period", 8), ("timer_deadline", 8),
    ("slice_end", 8),
    ("last_run", 8),                              # LP time it was last picked: hv2 runs the longest-waiting first
    ("runs", 8),                                  # times it was picked (new in hv2)
    *vp_state.record_fields()[len(vp_state.DEBUG_AND_CONTROL_REGISTERS):-1],   # the shared MSRs first,
    *reversed(vp_state.record_fields()[:len(vp_state.DEBUG_AND_CONTROL_REGISTERS)]),  # then DR6 ... CR2
    ("_pad1", 8),                                 # a multiple of 16 bytes: every record's FXSAVE area aligned
])

HV2_FRAME = Struct("hv2_frame", [
    ("pages", 8),                                 # of a split frame: its HV2_PAGE records, in hv2's heap
    ("owner", 4),
    ("free_pages", 2), ("first_free", 2),
])

HV2_PAGE = Struct("hv2_page", [
    ("owner", 4), ("guest_frame", 4),
    ("mapped_at", 8),                             # virtual time of the map (new in hv2)
])


@dataclass(frozen=True)
class Records:
    """One hypervisor version's record layouts; its assembly reaches them under generic names too."""

    partition: Struct
    vp: Struct
    frame: Struct
    page: Struct

    GENERIC_PREFIXES = {"partition": "PARTITION", "vp": "VP", "frame": "FRAME", "page": "PAGE_RECORD"}

    def constants(self) -> dict[str, int]:
        """Each layout's own constants (HV1_VP_RAX) and the generic ones its shared code uses (VP_RAX)."""
        table: dict[str, int] = {}
        for role, prefix in self.GENERIC_PREFIXES.items():
            layout = getattr(self, role)
            table.update(layout.constants())
            table.update(layout.constants(prefix))
        return table


RECORDS = {
    "hv1": Records(partition=HV1_PARTITION, vp=HV1_VP, frame=HV1_FRAME, page=HV1_PAGE),
    "hv2": Records(partition=HV2_PARTITION, vp=HV2_VP, frame=HV2_FRAME, page=HV2_PAGE),
}

OWNER_FREE = 0
OWNER_PENDING = 0xFFFF_FFFA   # a post-copy: the old hypervisor's split frame, its pages' owners still to come
OWNER_PARTITION_BASE = 1      # partition number n owns what says n + OWNER_PARTITION_BASE
OWNER_FIRMWARE = 0xFFFF_FFFB  # the firmware's and the operator's (boot info, staging area): never allocated
OWNER_SERVICE = 0xFFFF_FFFC   # the service region, kept for the next hypervisor (docs/protocol.md)
OWNER_PREVIOUS = 0xFFFF_FFFD  # the previous hypervisor's, until the hot restart that replaced it is done
OWNER_SPLIT = 0xFFFF_FFFE     # a frame whose pages have their own page records
OWNER_HYPERVISOR = 0xFFFF_FFFF

# Partition states (the partition records' state) and how a stopped one ended (stop_reason).
PARTITION_RUNNING = 1
PARTITION_EXITED = 2          # the guest wrote its exit code to port 0xF4
PARTITION_STOPPED = 3         # the hypervisor stopped it: stop_reason is the VM exit reason that did it
PARTITION_STOP_ENTRY_FAILED = 0xFFFF_FFFF   # stop_reason when VMLAUNCH/VMRESUME itself failed (no exit)
PARTITION_STOP_POSTCOPY = 0xFFFF_FFFE       # stop_reason when a post-copy could not bring its window (docs/protocol.md)
VP_RUNNABLE = 1
VP_DONE = 2

LAYOUTS = (BOOT_INFO, GUEST_DESCRIPTOR)
STATES = {name: value for name, value in globals().items()
          if name.startswith(("PARTITION_", "VP_", "OWNER_", "BOOT_MODE_")) and isinstance(value, int)}
