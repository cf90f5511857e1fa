"""The hot-restart protocol's numbers and wire format (docs/protocol.md), defined once for Python and both hypervisors."""
from __future__ import annotations

import enum

from asm.layout import Struct
from emu import vmcs_fields
from hypervisors import invariants, layouts, vp_state

PROTOCOL_VERSION = 2                   # 2: VP_STATE records (a receiver of version 1 would drop that state)
REQUEST_MAGIC = int.from_bytes(b"HHRR", "little")
TRANSFER_MAGIC = int.from_bytes(b"HHRX", "little")
DIGEST_BYTES = 32                      # SHA-256, of the image
STATE_DIGEST_BYTES = 16                # the state stream's digest (hypervisors/common/digest.inc)

MIB = 1 << 20
SERVICE_REGION_SIZE = 64 * MIB         # reserved at boot for the next hypervisor (whole 2 MiB frames)
SERVICE_IMAGE_MAX = 2 * MIB            # the new image, at the start of the region
TRANSFER_AREA_SIZE = 2 * MIB           # one frame of the old hypervisor's: the messages
SERVICE_BOOT_BUDGET = 50_000_000       # ticks the new hypervisor may take to say it is ready
SERVICE_CALL_BUDGET = 50_000_000       # ticks one inverse hypercall may take (preemption timer)
DRAIN_CALL_BUDGET = 5_000_000         # ticks one post-copy fetch from the old hypervisor may take
DRAIN_BATCH_BYTES = 0x2000             # a background fetch's message ends at about this size (~250 MAP records)
DRAIN_BATCH_TABLES = 64                # ... or once the old hypervisor has read this many window page tables (~200,000 instructions)
PRECOPY_SMALL_DELTA = 64               # a round whose change log is this short ends the pre-copy
PRECOPY_MAX_ROUNDS = 8
CHANGE_LOG_ENTRIES = 4096              # more changes in one round: the next round re-sends everything
STAGING_BASE = 4 * MIB                 # where the operator stages an image (the firmware's staging area)
STAGING_END = 16 * MIB
# A map window's sum (memory.inc, window_term): each mapping adds ((hpa * M1) ^ gpa) * M2, modulo 2^64;
# a mapping that arrives changed in one field changes the new hypervisor's sum (odd multipliers).
WINDOW_SUM_MULTIPLIER = 0x2545F491
WINDOW_SUM_MIXER = 0x4F1BBCDD


# Posted on the doorbell by the operator as 32-bit words (docs/protocol.md, 1. Request).
RESTART_REQUEST = Struct("restart_request", [
    ("magic", 4), ("version", 4),
    ("image", 8),                              # host-physical address of the staged image
    ("image_size", 4),
    ("service_entry", 4),                      # offsets in the image of its three entry points
    ("inverse_entry", 4),
    ("takeover_entry", 4),
    ("digest", DIGEST_BYTES),                  # SHA-256 of the image's bytes
    ("mode", 4), ("_pad0", 4),                 # a Mode
])


class Mode(enum.IntEnum):
    """How state crosses: rounds while guests run, everything in the blackout, through the disk (the
    old hypervisor writes state and guest RAM out and powers the machine off, and the next one reads
    them back after a cold boot: docs/protocol.md, Suspend and resume), or post-copy: only what a VP
    needs to run in the blackout, the map windows and their pages' owners after the take-over, pulled
    by the new hypervisor from the old one (docs/protocol.md, Post-copy)."""

    PRECOPY = 0
    STOP_AND_COPY = 1
    SUSPEND = 2
    POSTCOPY = 3
REQUEST_WORDS = RESTART_REQUEST.size // 4

# The transfer area: one message at a time, a header and then records.
TRANSFER_HEADER = Struct("transfer_header", [
    ("magic", 4), ("format", 4),
    ("sequence", 4),                           # 1, 2, ... over the whole restart
    ("record_count", 4),
    ("bytes", 8),                              # header and records
])
RECORD_HEADER = Struct("record_header", [
    ("type", 2), ("version", 2),
    ("length", 4),                             # of the body that follows
])


class RecordType(enum.IntEnum):
    INVARIANTS = 1
    CPUID = 2
    PARTITION = 3
    VP = 4
    MAP = 5
    UNMAP = 6
    OWNER = 7
    VMCS = 8
    END = 9
    WINDOW_RESET = 10                          # the partition's map window is emptied; MAPs follow
    VP_STATE = 11                              # a VP's state beyond the VMCS: FXSAVE image, CR2, DRs, shared MSRs
    POSTCOPY = 12                              # a post-copy: where the old hypervisor's code serves the fetches
    DEVICE = 13                                # a block device assigned to a partition, and its completions' VP


RECORD_VERSION = 1

INVARIANTS_RECORD = Struct("tr_invariants", [
    ("protocol", 4), ("sender_version", 4),    # PROTOCOL_VERSION; the old hypervisor's version
    ("lp_count", 4), ("vmcs_revision", 4),
    ("ram_size", 8),
    ("cpuid_leaves", 4), ("_pad0", 4),         # CPUID records that follow
])
CPUID_RECORD = Struct("tr_cpuid", [
    ("leaf", 4), ("eax", 4), ("ebx", 4), ("ecx", 4), ("edx", 4),
])
PARTITION_RECORD = Struct("tr_partition", [
    ("number", 4), ("state", 4),
    ("exit_code", 4), ("stop_reason", 4),
    ("vp_count", 4), ("channel", 4),
    ("memory", 8), ("memory_size", 8),         # host-physical base and size of its RAM
    ("mapped_pages", 4), ("vps_done", 4),
    ("name", 16),
    ("window_sum", 8),                         # the sum of window_term over its window: VERIFY compares it
])
VP_RECORD = Struct("tr_vp", [
    ("partition", 4), ("index", 4),
    ("lp", 4), ("state", 4),
    ("halted", 4), ("timer_pending", 4),
    ("timer_vector", 4), ("_pad0", 4),
    ("timer_period", 8), ("timer_deadline", 8),
    ("rax", 8), ("rbx", 8), ("rcx", 8), ("rdx", 8), ("rsi", 8), ("rdi", 8), ("rbp", 8),
    ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8), ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8),
])
# The state real hardware leaves to the hypervisor (hypervisors/vp_state.py): sent after each VP record.
VP_STATE_RECORD = Struct("tr_vp_state", [
    ("partition", 4), ("index", 4),            # the VP (the index where TR_VP_INDEX is)
    *vp_state.transfer_record_fields(),        # CR2, DR0-DR3, DR6, the shared MSRs, the FXSAVE image
])                                             # (from fx_header on, 512 bytes)
if (VP_STATE_RECORD.size - VP_STATE_RECORD.offset("fx_header") != vp_state.FXSAVE_AREA_BYTES
        or VP_STATE_RECORD.offset("mxcsr") - VP_STATE_RECORD.offset("fx_header") != vp_state.FXSAVE_MXCSR):
    raise ValueError("tr_vp_state: the FXSAVE image must be whole from fx_header on, MXCSR where FXSAVE puts it")
MAP_RECORD = Struct("tr_map", [
    ("partition", 4), ("_pad0", 4),
    ("gpa", 8),                                # a page of its map window
    ("hpa", 8),                                # the host page there
])
UNMAP_RECORD = Struct("tr_unmap", [
    ("partition", 4), ("_pad0", 4),
    ("gpa", 8),
])
OWNER_RECORD = Struct("tr_owner", [
    ("base", 8), ("bytes", 8),                 # 4 KiB aligned host memory
    ("owner", 4), ("_pad0", 4),                # a TRANSFER_OWNER value
])
VMCS_RECORD = Struct("tr_vmcs", [
    ("partition", 4), ("index", 4),            # the VP
    ("field_count", 4), ("_pad0", 4),          # VMCS_FIELD pairs that follow in the body
])
VMCS_FIELD = Struct("tr_vmcs_field", [
    ("encoding", 4), ("_pad0", 4),
    ("value", 8),
])
END_RECORD = Struct("tr_end", [
    ("phase", 4), ("round", 4),
    ("records", 4), ("_pad0", 4),              # records sent in the round, this one excluded
])
WINDOW_RESET_RECORD = Struct("tr_window_reset", [
    ("partition", 4), ("_pad0", 4),
])
# Sent in a post-copy's blackout, before the OWNER records of its pending frames: how the new hypervisor
# runs the old one's code, de-privileged in a partition of its own, to fetch the rest (docs/protocol.md).
POSTCOPY_RECORD = Struct("tr_postcopy", [
    ("launch_entry", 8),                       # where its VP starts: it says ready by VMCALL (DRAIN_READY)
    ("serve_entry", 8),                        # its inverse-call entry: FETCH_NEXT, FETCH_TABLE, DRAIN_DIGEST
    ("stack", 8),                              # the stack of its calls (the top)
    ("cr3", 8),                                # its page tables
    ("gdt", 8),                                # its GDT: the selectors HV_CODE and HV_DATA
])
# Sent in the blackout after the VP records, one per assigned block device (docs/protocol.md, "Assigned
# devices"). The device keeps running through the hand-off: its queue is in guest memory and its
# registers are its own; what crosses is whose it is and where its completions go.
DEVICE_RECORD = Struct("tr_device", [
    ("partition", 4), ("index", 4),            # the partition; the VP its completions interrupt (DEVICE_NO_VP:
                                               # none asked), the index where TR_VP_INDEX is
    ("device", 4),                             # the block device
    ("vector", 4),                             # the VP's vector for its completions, 0 for none
    ("pending", 4), ("_pad0", 4),              # a completion not yet delivered to the VP: its vector, 0 none
])
DEVICE_NO_VP = 0xFFFF_FFFF
DIGEST_MESSAGE = Struct("tr_digest", [
    ("chain", STATE_DIGEST_BYTES),             # the sender's digest chain over every message
])

RECORD_LAYOUTS = {RecordType.INVARIANTS: INVARIANTS_RECORD, RecordType.CPUID: CPUID_RECORD,
                  RecordType.PARTITION: PARTITION_RECORD, RecordType.VP: VP_RECORD,
                  RecordType.MAP: MAP_RECORD, RecordType.UNMAP: UNMAP_RECORD,
                  RecordType.OWNER: OWNER_RECORD, RecordType.VMCS: VMCS_RECORD, RecordType.END: END_RECORD,
                  RecordType.WINDOW_RESET: WINDOW_RESET_RECORD, RecordType.VP_STATE: VP_STATE_RECORD,
                  RecordType.POSTCOPY: POSTCOPY_RECORD, RecordType.DEVICE: DEVICE_RECORD}

# Fields whose values the new hypervisor must take on the old one's word: guest registers, the
# VMCS images' values, timers, a partition's outcome, names. A changed value there changes what a
# guest computes without any check being able to tell; every other field (padding aside) is
# checkable (numbers, counts, lengths, types, versions, addresses, owners, encodings) and a wrong
# value there must be refused. The fuzzer (tools/fuzz/fields.py) aims its oracles by these marks.
TRUSTED_FIELDS = {
    VP_RECORD.name: {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                     "r14", "r15", "timer_deadline", "timer_pending", "timer_vector", "timer_period", "halted",
                     "state"},
    PARTITION_RECORD.name: {"state", "exit_code", "stop_reason", "vps_done", "name"},
    VMCS_FIELD.name: {"value"},
    END_RECORD.name: {"phase", "round", "records"},
    INVARIANTS_RECORD.name: {"sender_version"},
    # A VP's state beyond the VMCS: any value of these is one a guest may hold (MXCSR, DR6 and the
    # MSRs but STAR are checked: hypervisors/common/vp_state.inc).
    VP_STATE_RECORD.name: {"cr2", "dr0", "dr1", "dr2", "dr3", "star", "fx_header", "mxcsr_mask", "fx_registers"},
}


class TransferOwner(enum.IntEnum):
    """Owners in OWNER records: the page-ownership database's own values (hypervisors/layouts.py)."""

    FIRMWARE = layouts.OWNER_FIRMWARE          # the firmware's and operator's memory: nobody allocates it
    PREVIOUS_HYPERVISOR = layouts.OWNER_PREVIOUS   # the old hypervisor's: free once the new one runs
    PENDING = layouts.OWNER_PENDING            # post-copy: a frame whose pages' owners come after the take-over


class Call(enum.IntEnum):
    """Inverse hypercalls (VMCALLR, RAX) from the old hypervisor into the service partition, and in a
    post-copy from the new hypervisor into the old one's drain partition."""

    INVARIANTS = 1
    STATE = 2
    VERIFY = 3
    COMMIT = 4
    FETCH_NEXT = 5                             # post-copy: the next MAP records of the windows, in order
    FETCH_TABLE = 6                            # post-copy: the 2 MiB of a window around a page (RDI partition, RSI page)
    DRAIN_DIGEST = 7                           # post-copy: the digest chain over every message, the fetches' too


DRAIN_CALLS = frozenset({Call.FETCH_NEXT, Call.FETCH_TABLE, Call.DRAIN_DIGEST})   # new to old, after the commit


class Reply(enum.IntEnum):
    """What the new hypervisor returns in RAX; anything but ACCEPT aborts the restart."""

    ACCEPT = 0
    VERSION = 1
    LP_COUNT = 2
    CPUID = 3
    VMX = 4
    MESSAGE = 5                         # a bad header: magic, format, sequence, size
    RECORD = 6                          # an unknown type or version, a wrong length
    VALUE = 7                           # a value out of range
    DIGEST = 8
    NO_MEMORY = 9                       # the service region is too small for what it must build
    ORDER = 10                          # a call out of protocol order


class Phase(enum.IntEnum):
    """restart_phase, also written to the machine's restart-phase port at every change."""

    IDLE = 0
    REQUESTED = 1
    SERVICE = 2
    INVARIANTS = 3
    PRECOPY = 4
    BLACKOUT = 5
    COMMIT = 6
    DEVIRTUALIZE = 7
    RESUMED = 8                                # the new hypervisor runs guests again
    ABORTED = 9
    SUSPENDING = 10                            # suspend: the state is on the disk, guest RAM goes after it
    SUSPENDED = 11                             # the suspend image is complete: the machine powers off
    RESUMING = 12                              # a hypervisor cold-booted to resume reads the image back
    POSTCOPY = 13                              # post-copy: the new hypervisor runs guests and pulls the windows
    DRAINED = 14                               # post-copy: everything came; the old hypervisor's memory is free
    DRAIN_FAILED = 15                          # post-copy: a fetch failed; the partitions it left short stopped


class Status(enum.IntEnum):
    """restart_status: how the last restart ended (0 while none has)."""

    NONE = 0
    DONE = 1
    BAD_REQUEST = 2
    DIGEST_MISMATCH = 3
    SERVICE_FAILED = 4                         # the new hypervisor faulted or stopped before ready
    SERVICE_TIMEOUT = 5
    REFUSED = 6                                # restart_refusal has the Reply
    CALL_FAILED = 7                            # an inverse hypercall ended by a VM exit: restart_exit_reason
    DISK_FAILED = 8                            # a disk command failed: the detail is its DiskStatus
    INCONSISTENT = 9                           # the sender's own state contradicts itself: the detail is the partition
    DEVICE_ASSIGNED = 10                       # a suspend of a partition with a block device (a reset loses it): the detail is the partition
    POSTCOPY_FAILED = 11                       # after a post-copy's commit, a fetch failed: the detail is the reply or exit reason
    POSTCOPY_WINDOW = 12                       # a post-copy brought a window that does not add up: the detail is the partition


# Suspend and resume (docs/protocol.md): the image on the disk. Block SUSPEND_HEADER_BLOCK holds a
# SUSPEND_HEADER, written last; the messages follow it, each in whole blocks, exactly as they would
# be in the transfer area (the last one the digest, as VERIFY carries it), then every partition's
# RAM in partition order, then every page of every map window (partition, then guest-physical order).
SUSPEND_MAGIC = int.from_bytes(b"HHRS", "little")
SUSPEND_FORMAT = 1
SUSPEND_HEADER_BLOCK = 0
SUSPEND_STATE_BLOCK = 1
SUSPEND_HEADER = Struct("suspend_header", [
    ("magic", 4), ("format", 4),
    ("messages", 4), ("sender_version", 4),   # messages on the disk, the digest's included; HV_VERSION
    ("state_block", 8),                        # the first message's block
    ("memory_block", 8),                       # the first block of guest RAM
    ("end_block", 8),                          # the block after the image
    ("buffer", 8),                             # the suspending hypervisor's transfer area: free memory
                                               # for any hypervisor, where the resuming one reads messages
])
SUSPEND_EXIT_CODE = 0x53                       # the debug-exit value of a suspended machine ("S")
RESUME_REFUSED_EXIT_CODE = 0x52                # the value of a resume that refused the image ("R")

SERVICE_READY = 0x100                          # hypercall (VMCALL RAX) of the service VP: initialized
DRAIN_READY = 0x101                            # hypercall of a post-copy's drain VP at its launch

# The VMCS fields a restart carries for each VP: all guest state but the link pointer and the
# preemption timer (each hypervisor sets its own), and the event being injected at the next entry.
_NOT_CARRIED = {"VMCS_LINK_POINTER", "VMX_PREEMPTION_TIMER_VALUE"}
VMCS_TRANSFER_FIELDS = tuple(
    [field.encoding for field in vmcs_fields.FIELDS
     if field.kind == vmcs_fields.FieldKind.GUEST and field.name not in _NOT_CARRIED]
    + [vmcs_fields.BY_NAME[name].encoding
       for name in ("VM_ENTRY_INTR_INFO_FIELD", "VM_ENTRY_EXCEPTION_ERROR_CODE", "VM_ENTRY_INSTRUCTION_LEN")])

VMCS_IMAGE_SLOT_BYTES = 8                      # a VMCS image holds each carried field in a qword

LAYOUTS = (RESTART_REQUEST, TRANSFER_HEADER, RECORD_HEADER, *RECORD_LAYOUTS.values(), VMCS_FIELD, DIGEST_MESSAGE,
           SUSPEND_HEADER)


def constants() -> dict[str, int]:
    """Everything above for assembly: layouts (TR_VP_RAX ...), and enumerations as PREFIX_NAME."""
    values: dict[str, int] = {}
    for layout in LAYOUTS:
        values.update(layout.constants())
    for enumeration, prefix in ((Mode, "MODE"), (RecordType, "RECORD"), (TransferOwner, "TRANSFER_OWNER"), (Call, "CALL"),
                                (Reply, "REPLY"), (Phase, "PHASE"), (Status, "STATUS")):
        values.update({f"{prefix}_{member.name}": int(member) for member in enumeration})
    values.update({name: value for name, value in globals().items()
                   if name.isupper() and isinstance(value, int) and name != "MIB"})
    values["VMCS_TRANSFER_FIELD_COUNT"] = len(VMCS_TRANSFER_FIELDS)
    values.update(vmcs_image_offsets())
    values["CPUID_INVARIANT_COUNT"] = len(cpuid_invariants())
    return values


def vmcs_image_offsets() -> dict[str, int]:
    """VMCS_IMAGE_<FIELD>: where a field's value lies in a VP's VMCS image (a qword per field, in the
    order of VMCS_TRANSFER_FIELDS), for the receiver's checks of the guest state."""
    return {f"VMCS_IMAGE_{vmcs_fields.lookup(encoding)[0].name}": index * VMCS_IMAGE_SLOT_BYTES
            for index, encoding in enumerate(VMCS_TRANSFER_FIELDS)}


_MASK64 = (1 << 64) - 1
# The state stream's digest (hypervisors/common/digest.inc takes these as constants): two 64-bit lanes.
DIGEST_LANE_BYTES = 8
DIGEST_LANE1_PRIME = 0x100000001B3              # FNV-1a's 64-bit prime
DIGEST_LANE2_MULTIPLIER = 0x9E3779B97F4A7C15    # 2^64 / golden ratio
DIGEST_LANE2_ROTATION = 31
DIGEST_LANE1_START = 0xCBF29CE484222325         # FNV-1a's offset basis: no lane starts at 0
DIGEST_LANE2_START = 0x6A09E667F3BCC908         # SHA-512's first initial word
STATE_DIGEST_START = DIGEST_LANE1_START.to_bytes(DIGEST_LANE_BYTES, "little") + \
    DIGEST_LANE2_START.to_bytes(DIGEST_LANE_BYTES, "little")


def chain_digest(previous: bytes, message: bytes) -> bytes:
    """The state stream's digest after `message` (hypervisors/common/digest.inc, in Python)."""
    lane1 = int.from_bytes(previous[:8], "little")
    lane2 = int.from_bytes(previous[8:16], "little")

    def mix(word: int) -> None:
        nonlocal lane1, lane2
        lane1 = ((lane1 ^ word) * DIGEST_LANE1_PRIME) & _MASK64
        lane2 = (lane2 + word * DIGEST_LANE2_MULTIPLIER) & _MASK64
        lane2 = ((lane2 << DIGEST_LANE2_ROTATION) | (lane2 >> (64 - DIGEST_LANE2_ROTATION))) & _MASK64

    for offset in range(0, len(message), 8):
        mix(int.from_bytes(message[offset:offset + 8], "little"))
    mix(len(message))
    return lane1.to_bytes(8, "little") + lane2.to_bytes(8, "little")


def window_term(gpa: int, hpa: int) -> int:
    """A mapping's term of its window's sum (window_term of hypervisors/common/memory.inc, in Python)."""
    return (((hpa * WINDOW_SUM_MULTIPLIER) & _MASK64) ^ gpa) * WINDOW_SUM_MIXER & _MASK64


def window_sum(window: dict[int, int]) -> int:
    """A map window's sum ({gpa: host page}), as the partition records keep it."""
    return sum(window_term(gpa, page) for gpa, page in window.items()) & _MASK64


def cpuid_invariants() -> list[tuple[int, int, int, int, int]]:
    """(leaf, EAX, EBX, ECX, EDX) that a new hypervisor must answer as the old one did; leaf 1 EBX's
    per-VP fields (APIC ID, VP count) and the version leaf are not invariants."""
    values = invariants.constants()
    vendor = (values["HV_CPUID_VENDOR_EBX"], values["HV_CPUID_VENDOR_ECX"], values["HV_CPUID_VENDOR_EDX"])
    return [
        (0, invariants.HV_CPUID_MAX_BASIC_LEAF, *vendor),
        (1, invariants.HV_CPUID_FAMILY_MODEL, 0, invariants.HV_CPUID_LEAF1_ECX, invariants.HV_CPUID_LEAF1_EDX),
        (invariants.HV_CPUID_HYPERVISOR_BASE, invariants.HV_CPUID_MAX_HYPERVISOR_LEAF, *vendor),
    ]


def generated_includes() -> dict[str, str]:
    """Include files made from the tables above, for the hypervisors' assembly."""
    return {"vmcs_transfer.inc": vmcs_field_table(), "cpuid_invariants.inc": cpuid_table()}


def cpuid_table() -> str:
    rows = "\n".join(f"    .long {', '.join(f'{value:#x}' for value in row)}" for row in cpuid_invariants())
    return ("; cpuid_invariants.inc: generated by hypervisors/transfer.py; leaf, EAX, EBX, ECX, EDX per row.\n"
            f"cpuid_invariants:\n{rows}\n")


def vmcs_field_table() -> str:
    """Assembly for the table of VMCS_TRANSFER_FIELDS (generated include vmcs_transfer.inc)."""
    words = ", ".join(f"{encoding:#x}" for encoding in VMCS_TRANSFER_FIELDS)
    return ("; vmcs_transfer.inc: generated by hypervisors/transfer.py; the VMCS fields a restart carries.\n"
            f"vmcs_transfer_fields:\n    .long {words}\n")
