"""A VP's state beyond the VMCS (x87/SSE, CR2, DR0-DR3, DR6, the MSRs root and guest share) and the MSRs guests may use, defined once."""
from __future__ import annotations

import enum

from emu import msrs, vmcs_fields
from emu.vmx_defs import MSR_BITMAP_HIGH_PART, MSR_BITMAP_LOW_PART, MSR_IA32_EFER

FXSAVE_AREA_BYTES = 512                 # what FXSAVE stores (SDM Vol. 1 10.5.1, Table 10-2)
FXSAVE_ALIGNMENT = 16                   # FXSAVE/FXRSTOR fault on a less aligned area
FXSAVE_FCW = 0                          # offsets in the FXSAVE image
FXSAVE_MXCSR = 24
FXSAVE_MXCSR_MASK = 28
FXSAVE_FCW_INITIAL = 0x037F             # FNINIT's control word (SDM Vol. 1 8.1.5)
MXCSR_INITIAL = 0x1F80                  # every exception masked, round to nearest (SDM Vol. 1 10.2.3)
MXCSR_MASK_DEFAULT = 0xFFBF             # a zero MXCSR_MASK field means this one (SDM Vol. 1 11.6.6)
DR6_INITIAL = 0xFFFF0FF0                # DR6 at power-up (SDM Vol. 3A Table 10-1)
PAT_INITIAL = 0x0007040600070406        # IA32_PAT at power-up (SDM Vol. 3A 13.12.4)
PAT_ENTRY_TYPE_BITS = 3                 # an entry's type; its bits 7:3 are reserved (SDM Vol. 3A 13.12.2)
PAT_RESERVED_BITS = sum(((1 << msrs.PAT_ENTRY_BITS) - (1 << PAT_ENTRY_TYPE_BITS)) << (msrs.PAT_ENTRY_BITS * entry)
                        for entry in range(msrs.PAT_ENTRIES))


class MsrCheck(enum.IntEnum):
    """What WRMSR checks of a value before it takes it (#GP(0) otherwise), per MSR (SDM Vol. 4 Table 2-2;
    the machine's own checks are emu/msrs.py's, and msr_check derives these from them)."""

    ANY = 0
    CANONICAL = 1                       # an address: canonical
    HIGH_ZERO = 2                       # bits 63:32 reserved
    PAT = 3                             # eight entries of a valid memory type, bits 7:3 zero
    EFER = 4                            # no unsupported bit; LME as it is (paging is on); LMA read-only


def msr_check(index: int) -> MsrCheck:
    """The check WRMSR makes of an MSR's value, from the machine's own sets (emu/msrs.py). IA32_EFER:
    what a guest may change of it with paging on. IA32_SYSENTER_CS: bits 63:32 too, since the
    VMCS field that holds a guest's is 32 bits wide (SDM Vol. 3C 25.4.2)."""
    if index in msrs.CANONICAL_ADDRESS_MSRS:
        return MsrCheck.CANONICAL
    if index in msrs.LOW_HALF_ONLY_MSRS or index == msrs.IA32_SYSENTER_CS:
        return MsrCheck.HIGH_ZERO
    if index == msrs.IA32_PAT:
        return MsrCheck.PAT
    if index == MSR_IA32_EFER:
        return MsrCheck.EFER
    return MsrCheck.ANY


# The MSRs root and guest share (emu/msrs.py SHARED_MSRS: the VMCS switches none of them, SDM Vol.
# 3C 28.3, 29.3): a hypervisor keeps them per VP and switches them itself. In this order in both
# hypervisors' VP records and in the VP_STATE transfer record: (field name, MSR index).
SHARED_MSRS = (
    ("kernel_gs_base", msrs.IA32_KERNEL_GS_BASE),
    ("star", msrs.IA32_STAR),
    ("lstar", msrs.IA32_LSTAR),
    ("cstar", msrs.IA32_CSTAR),
    ("fmask", msrs.IA32_FMASK),
    ("tsc_aux", msrs.IA32_TSC_AUX),
    ("pat", msrs.IA32_PAT),
)
if {index for _, index in SHARED_MSRS} != msrs.SHARED_MSRS:
    raise ValueError("vp_state.SHARED_MSRS must name exactly the machine's shared MSRs (emu/msrs.py)")
SHARED_MSR_BYTES = 8

# The MSRs a guest reaches through its VMCS: RDMSR reads the guest field, WRMSR writes it.
VMCS_MSRS = (
    (msrs.IA32_FS_BASE, "GUEST_FS_BASE"),
    (msrs.IA32_GS_BASE, "GUEST_GS_BASE"),
    (msrs.IA32_SYSENTER_CS, "GUEST_SYSENTER_CS"),
    (msrs.IA32_SYSENTER_ESP, "GUEST_SYSENTER_ESP"),
    (msrs.IA32_SYSENTER_EIP, "GUEST_SYSENTER_EIP"),
    (MSR_IA32_EFER, "GUEST_IA32_EFER"),
)

# The MSR bitmap's read parts (its layout is emu/vmx_defs.py's, SDM Vol. 3C 25.6.9; a bit of 1 makes
# the access exit): one for MSRs 0-0x1FFF, one for 0xC0000000-0xC0001FFF.
MSR_BITMAP_LOW_READ = MSR_BITMAP_LOW_PART
MSR_BITMAP_HIGH_READ = MSR_BITMAP_HIGH_PART

# The registers of the state beyond the VMCS, each a qword, in the order the VP_STATE record keeps them.
DEBUG_AND_CONTROL_REGISTERS = ("cr2", "dr0", "dr1", "dr2", "dr3", "dr6")


def record_fields() -> list[tuple[str, int]]:
    """The VP-state fields as they sit in a record: the registers, the shared MSRs, then the FXSAVE image."""
    return ([(name, 8) for name in DEBUG_AND_CONTROL_REGISTERS]
            + [(name, SHARED_MSR_BYTES) for name, _ in SHARED_MSRS]
            + [("fx_area", FXSAVE_AREA_BYTES)])


def transfer_record_fields() -> list[tuple[str, int]]:
    """The same for the VP_STATE transfer record, whose FXSAVE image is cut where MXCSR lies so that
    the one field of it a receiver checks is a field of its own (for the fuzzer, docs/fuzzing.md)."""
    return record_fields()[:-1] + [
        ("fx_header", FXSAVE_MXCSR),                                   # FCW, FSW, FTW, FOP, FIP, FDP
        ("mxcsr", 4), ("mxcsr_mask", 4),
        ("fx_registers", FXSAVE_AREA_BYTES - FXSAVE_MXCSR_MASK - 4),   # ST0-ST7, XMM0-XMM15, the rest
    ]


def initial_fxsave_image() -> bytes:
    """The FXSAVE image a VP starts with: FCW 0x037F, MXCSR 0x1F80, everything else 0."""
    image = bytearray(FXSAVE_AREA_BYTES)
    image[FXSAVE_FCW:FXSAVE_FCW + 2] = FXSAVE_FCW_INITIAL.to_bytes(2, "little")
    image[FXSAVE_MXCSR:FXSAVE_MXCSR + 4] = MXCSR_INITIAL.to_bytes(4, "little")
    return bytes(image)


def constants() -> dict[str, int]:
    """For assembly: the FXSAVE offsets and initial values, the checks, the table sizes."""
    values = {name: value for name, value in globals().items()
              if name.isupper() and isinstance(value, int)}
    values.update({f"MSR_CHECK_{member.name}": int(member) for member in MsrCheck})
    values["SHARED_MSR_COUNT"] = len(SHARED_MSRS)
    values["VMCS_MSR_COUNT"] = len(VMCS_MSRS)
    values["PAT_VALID_TYPE_BITS"] = sum(1 << kind for kind in msrs.PAT_VALID_TYPES)
    values["PAT_ENTRIES"] = msrs.PAT_ENTRIES
    values["PAT_ENTRY_BITS"] = msrs.PAT_ENTRY_BITS
    return values


def msr_tables() -> str:
    """Assembly (generated include msr_tables.inc): the shared MSRs' indices and checks, in record
    order; the VMCS MSRs' indices, guest-field encodings and checks."""
    shared_indices = ", ".join(f"{index:#x}" for _, index in SHARED_MSRS)
    shared_checks = ", ".join(str(int(msr_check(index))) for _, index in SHARED_MSRS)
    vmcs_indices = ", ".join(f"{index:#x}" for index, _ in VMCS_MSRS)
    vmcs_encodings = ", ".join(f"{vmcs_fields.BY_NAME[field].encoding:#x}" for _, field in VMCS_MSRS)
    vmcs_checks = ", ".join(str(int(msr_check(index))) for index, _ in VMCS_MSRS)
    return ("; msr_tables.inc: generated by hypervisors/vp_state.py; the MSRs guests use.\n"
            f"shared_msr_indices:\n    .long {shared_indices}\n"
            f"shared_msr_checks:\n    .byte {shared_checks}\n"
            f"vmcs_msr_indices:\n    .long {vmcs_indices}\n"
            f"vmcs_msr_encodings:\n    .long {vmcs_encodings}\n"
            f"vmcs_msr_checks:\n    .byte {vmcs_checks}\n")
