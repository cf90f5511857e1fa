"""The cpustate guests' layout (guests/builtin/cpustate.inc): each VP's area of guest RAM and its value slots, as assembly constants."""
from __future__ import annotations

VP_AREAS = 0x400000             # guest-physical: VP v's area is VP_AREAS + v x VP_AREA_BYTES (identity-mapped)
VP_AREA_SHIFT = 16
VP_AREA_BYTES = 1 << VP_AREA_SHIFT

# Offsets in a VP's area.
AREA_OFFSETS = {
    "PML4": 0x0000, "PDPT": 0x1000, "PD": 0x2000,     # its page tables
    "GDT": 0x3000, "LDT": 0x3100, "TSS": 0x3200, "IDT": 0x4000,
    "FX_EXPECTED": 0x5000,      # FXSAVE images (512 bytes, 16-byte aligned): what it set, what it found
    "FX_FOUND": 0x5200,
    "EXPECTED": 0x5400,         # one qword per slot: the value it set
    "FOUND": 0x5800,            # one qword per slot: the value it read back
    "REPORTED": 0x5C00,         # one byte per check: 1 once its change has been printed
    "CHANGED": 0x5F00,          # qword: how many of its values changed
    "SCRATCH": 0x5F10,          # SGDT and SIDT store here (10 bytes)
    "ROUNDS": 0x5F20,           # qword: rounds done
    "LINE": 0x6000,             # a console line being built
    "X87_VALUES": 0x6400,       # the eight 80-bit values pushed, 16 bytes apart
    "FS_TARGET": 0x7000,        # the FS base points here, the GS base at GS_TARGET
    "GS_TARGET": 0x7100,
}

# The value slots, in order. The general registers come first, in the order a round pops them
# (RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8-R15), then RFLAGS.
GENERAL_REGISTERS = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP",
                     "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
SLOTS = (*GENERAL_REGISTERS, "RFLAGS", "CR2", "CR3", "DR0", "DR1", "DR2", "DR3", "DR6", "DR7",
         "GDTR_BASE", "GDTR_LIMIT", "IDTR_BASE", "IDTR_LIMIT", "TR", "LDTR",
         "CS", "DS", "ES", "FS", "GS", "SS",          # DS-SS consecutive: a loop sets them
         "FS_BASE", "GS_BASE", "KERNEL_GS_BASE", "STAR", "LSTAR", "CSTAR", "FMASK", "TSC_AUX", "PAT",
         "SYSENTER_CS", "SYSENTER_ESP", "SYSENTER_EIP", "EFER",
         "FS_MARKER", "GS_MARKER",                   # the qwords at FS:0 and GS:0
         "CR0", "CR4")                               # as the guest found them (it sets neither)
SLOT_BYTES = 8


def slot(name: str) -> int:
    return SLOTS.index(name)


def constants() -> dict[str, int]:
    """VP_AREAS, VP_AREA_SHIFT and _BYTES, AREA_<NAME> offsets, SLOT_<NAME> numbers and GPR_COUNT."""
    values = {"VP_AREAS": VP_AREAS, "VP_AREA_SHIFT": VP_AREA_SHIFT, "VP_AREA_BYTES": VP_AREA_BYTES,
              "GPR_COUNT": len(GENERAL_REGISTERS)}
    values.update({f"AREA_{name}": offset for name, offset in AREA_OFFSETS.items()})
    values.update({f"SLOT_{name}": number for number, name in enumerate(SLOTS)})
    return values
