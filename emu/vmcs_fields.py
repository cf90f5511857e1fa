"""The VMCS of our machine: every field, its encoding, width, kind and slot in the 4 KiB VMCS region.

This module is the single source of truth for the VMCS. Field names follow Linux
`enum vmcs_field` (arch/x86/include/asm/vmx.h); encodings follow SDM Vol. 3D Appendix B.
Section numbers cite the current SDM (VMCS = Chapter 25, VM entries = Chapter 27).

Memory layout of a VMCS region (ours; the SDM leaves the format implementation-specific,
see SDM Vol. 3C 25.2 "Format of the VMCS Region"):

    offset 0x00  u32  VMCS revision identifier (bit 31 = shadow-VMCS indicator)
    offset 0x04  u32  VMX-abort indicator
    offset 0x08  u32  launch state (0 = clear, 1 = launched), written by VMCLEAR / VMLAUNCH
    offset 0x0C  u32  reserved (0)
    offset 0x10  one 8-byte little-endian slot per field, in FIELDS order (sorted by encoding)

Run `python -m emu.vmcs_fields --markdown` for the field table, or
`python -m emu.vmcs_fields --update-doc docs/vmx-reference.md` to refresh every generated
block of that document.
"""

from __future__ import annotations

import enum
import importlib
import re
import sys
from dataclasses import dataclass

from emu.vmx_defs import U16_MASK, U32_MASK, U64_MASK

# --- Region layout (our machine) -------------------------------------------------------------

VMCS_REGION_SIZE = 4096
VMCS_REVISION_ID_OFFSET = 0x00
VMCS_ABORT_OFFSET = 0x04
VMCS_LAUNCH_STATE_OFFSET = 0x08
VMCS_RESERVED_OFFSET = 0x0C
VMCS_FIELDS_OFFSET = 0x10
VMCS_SLOT_SIZE = 8

# See: SDM Vol. 3C 25.2 "Format of the VMCS Region" (bit 31 of the first word).
VMCS_SHADOW_INDICATOR = 1 << 31
VMCS_REVISION_ID_MASK = VMCS_SHADOW_INDICATOR - 1

LAUNCH_STATE_CLEAR = 0
LAUNCH_STATE_LAUNCHED = 1

# --- Component encoding (SDM Vol. 3C 25.11.2) ---------------------------------------------

ENCODING_ACCESS_HIGH = 1 << 0          # bit 0: access type (1 = high 32 bits of a 64-bit field)
ENCODING_INDEX_SHIFT = 1               # bits 9:1: index
ENCODING_INDEX_MASK = 0x1FF
ENCODING_TYPE_SHIFT = 10               # bits 11:10: type
ENCODING_TYPE_MASK = 0x3
ENCODING_WIDTH_SHIFT = 13              # bits 14:13: width
ENCODING_WIDTH_MASK = 0x3
ENCODING_RESERVED_BITS = (1 << 12) | (1 << 15) | (0xFFFF << 16)  # must be 0
ENCODING_MAX = 0xFFFFFFFF              # VMREAD/VMWRITE fail if bits 63:32 of the operand are set

HIGH_HALF_SHIFT = 32


class FieldWidth(enum.IntEnum):
    """Width of a VMCS component: the value of encoding bits 14:13."""

    W16 = 0
    W64 = 1
    W32 = 2
    NATURAL = 3

    @property
    def mask(self) -> int:
        """Mask of the bits a field of this width holds (natural width = 64 bits on our machine)."""
        return {FieldWidth.W16: U16_MASK, FieldWidth.W32: U32_MASK}.get(self, U64_MASK)

    @property
    def label(self) -> str:
        return {FieldWidth.W16: "16-bit", FieldWidth.W64: "64-bit",
                FieldWidth.W32: "32-bit", FieldWidth.NATURAL: "natural"}[self]


class FieldKind(enum.IntEnum):
    """Type of a VMCS component: the value of encoding bits 11:10."""

    CONTROL = 0
    EXIT_INFO = 1   # "VM-exit information" / read-only data fields
    GUEST = 2
    HOST = 3

    @property
    def label(self) -> str:
        return {FieldKind.CONTROL: "control", FieldKind.EXIT_INFO: "read-only",
                FieldKind.GUEST: "guest", FieldKind.HOST: "host"}[self]


@dataclass(frozen=True)
class Field:
    """One VMCS field: name (Linux spelling), encoding, width, kind and slot offset in the region."""

    name: str
    encoding: int
    width: FieldWidth
    kind: FieldKind
    offset: int
    mask: int                      # the bits the field holds: its width's mask
    machine_specific: bool = False

    @property
    def read_only(self) -> bool:
        """VMWRITE to these fails with error 13 (our IA32_VMX_MISC bit 29 is 0). See: SDM 31.3 VMWRITE."""
        return self.kind == FieldKind.EXIT_INFO


def decode_encoding(encoding: int) -> tuple[bool, int, FieldKind, FieldWidth]:
    """Split a component encoding into (access_high, index, type, width). See: SDM Vol. 3C 25.11.2."""
    access_high = bool(encoding & ENCODING_ACCESS_HIGH)
    index = (encoding >> ENCODING_INDEX_SHIFT) & ENCODING_INDEX_MASK
    kind = FieldKind((encoding >> ENCODING_TYPE_SHIFT) & ENCODING_TYPE_MASK)
    width = FieldWidth((encoding >> ENCODING_WIDTH_SHIFT) & ENCODING_WIDTH_MASK)
    return access_high, index, kind, width


# Every field our machine implements, by encoding. A 64-bit VMX implementation without
# SGX, Intel PT, CET (shadow stacks), HLAT, IPI virtualization, PASID, FRED or tertiary
# controls: those fields are absent, so VMREAD/VMWRITE of them fail with error 12.
# See: SDM Vol. 3D Appendix B "Field Encoding in VMCS".
_FIELD_TABLE: tuple[tuple[str, int], ...] = (
    # B.1.1 16-bit control fields
    ("VIRTUAL_PROCESSOR_ID", 0x0000),
    ("POSTED_INTR_NV", 0x0002),
    ("EPTP_INDEX", 0x0004),
    # B.1.2 16-bit guest-state fields
    ("GUEST_ES_SELECTOR", 0x0800),
    ("GUEST_CS_SELECTOR", 0x0802),
    ("GUEST_SS_SELECTOR", 0x0804),
    ("GUEST_DS_SELECTOR", 0x0806),
    ("GUEST_FS_SELECTOR", 0x0808),
    ("GUEST_GS_SELECTOR", 0x080A),
    ("GUEST_LDTR_SELECTOR", 0x080C),
    ("GUEST_TR_SELECTOR", 0x080E),
    ("GUEST_INTR_STATUS", 0x0810),
    ("GUEST_PML_INDEX", 0x0812),
    # B.1.3 16-bit host-state fields
    ("HOST_ES_SELECTOR", 0x0C00),
    ("HOST_CS_SELECTOR", 0x0C02),
    ("HOST_SS_SELECTOR", 0x0C04),
    ("HOST_DS_SELECTOR", 0x0C06),
    ("HOST_FS_SELECTOR", 0x0C08),
    ("HOST_GS_SELECTOR", 0x0C0A),
    ("HOST_TR_SELECTOR", 0x0C0C),
    # B.2.1 64-bit control fields
    ("IO_BITMAP_A", 0x2000),
    ("IO_BITMAP_B", 0x2002),
    ("MSR_BITMAP", 0x2004),
    ("VM_EXIT_MSR_STORE_ADDR", 0x2006),
    ("VM_EXIT_MSR_LOAD_ADDR", 0x2008),
    ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A),
    ("EXECUTIVE_VMCS_POINTER", 0x200C),
    ("PML_ADDRESS", 0x200E),
    ("TSC_OFFSET", 0x2010),
    ("VIRTUAL_APIC_PAGE_ADDR", 0x2012),
    ("APIC_ACCESS_ADDR", 0x2014),
    ("POSTED_INTR_DESC_ADDR", 0x2016),
    ("VM_FUNCTION_CONTROL", 0x2018),
    ("EPT_POINTER", 0x201A),
    ("EOI_EXIT_BITMAP0", 0x201C),
    ("EOI_EXIT_BITMAP1", 0x201E),
    ("EOI_EXIT_BITMAP2", 0x2020),
    ("EOI_EXIT_BITMAP3", 0x2022),
    ("EPTP_LIST_ADDRESS", 0x2024),
    ("VMREAD_BITMAP", 0x2026),
    ("VMWRITE_BITMAP", 0x2028),
    ("VE_INFORMATION_ADDRESS", 0x202A),
    ("XSS_EXIT_BITMAP", 0x202C),
    ("TSC_MULTIPLIER", 0x2032),
    # B.2.2 64-bit read-only data field
    ("GUEST_PHYSICAL_ADDRESS", 0x2400),
    # B.2.3 64-bit guest-state fields
    ("VMCS_LINK_POINTER", 0x2800),
    ("GUEST_IA32_DEBUGCTL", 0x2802),
    ("GUEST_IA32_PAT", 0x2804),
    ("GUEST_IA32_EFER", 0x2806),
    ("GUEST_IA32_PERF_GLOBAL_CTRL", 0x2808),
    ("GUEST_PDPTR0", 0x280A),
    ("GUEST_PDPTR1", 0x280C),
    ("GUEST_PDPTR2", 0x280E),
    ("GUEST_PDPTR3", 0x2810),
    ("GUEST_BNDCFGS", 0x2812),
    # B.2.4 64-bit host-state fields
    ("HOST_IA32_PAT", 0x2C00),
    ("HOST_IA32_EFER", 0x2C02),
    ("HOST_IA32_PERF_GLOBAL_CTRL", 0x2C04),
    # B.3.1 32-bit control fields
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
    ("EXCEPTION_BITMAP", 0x4004),
    ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006),
    ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008),
    ("CR3_TARGET_COUNT", 0x400A),
    ("VM_EXIT_CONTROLS", 0x400C),
    ("VM_EXIT_MSR_STORE_COUNT", 0x400E),
    ("VM_EXIT_MSR_LOAD_COUNT", 0x4010),
    ("VM_ENTRY_CONTROLS", 0x4012),
    ("VM_ENTRY_MSR_LOAD_COUNT", 0x4014),
    ("VM_ENTRY_INTR_INFO_FIELD", 0x4016),
    ("VM_ENTRY_EXCEPTION_ERROR_CODE", 0x4018),
    ("VM_ENTRY_INSTRUCTION_LEN", 0x401A),
    ("TPR_THRESHOLD", 0x401C),
    ("SECONDARY_VM_EXEC_CONTROL", 0x401E),
    ("PLE_GAP", 0x4020),
    ("PLE_WINDOW", 0x4022),
    # B.3.2 32-bit read-only data fields
    ("VM_INSTRUCTION_ERROR", 0x4400),
    ("VM_EXIT_REASON", 0x4402),
    ("VM_EXIT_INTR_INFO", 0x4404),
    ("VM_EXIT_INTR_ERROR_CODE", 0x4406),
    ("IDT_VECTORING_INFO_FIELD", 0x4408),
    ("IDT_VECTORING_ERROR_CODE", 0x440A),
    ("VM_EXIT_INSTRUCTION_LEN", 0x440C),
    ("VMX_INSTRUCTION_INFO", 0x440E),
    # B.3.3 32-bit guest-state fields
    ("GUEST_ES_LIMIT", 0x4800),
    ("GUEST_CS_LIMIT", 0x4802),
    ("GUEST_SS_LIMIT", 0x4804),
    ("GUEST_DS_LIMIT", 0x4806),
    ("GUEST_FS_LIMIT", 0x4808),
    ("GUEST_GS_LIMIT", 0x480A),
    ("GUEST_LDTR_LIMIT", 0x480C),
    ("GUEST_TR_LIMIT", 0x480E),
    ("GUEST_GDTR_LIMIT", 0x4810),
    ("GUEST_IDTR_LIMIT", 0x4812),
    ("GUEST_ES_AR_BYTES", 0x4814),
    ("GUEST_CS_AR_BYTES", 0x4816),
    ("GUEST_SS_AR_BYTES", 0x4818),
    ("GUEST_DS_AR_BYTES", 0x481A),
    ("GUEST_FS_AR_BYTES", 0x481C),
    ("GUEST_GS_AR_BYTES", 0x481E),
    ("GUEST_LDTR_AR_BYTES", 0x4820),
    ("GUEST_TR_AR_BYTES", 0x4822),
    ("GUEST_INTERRUPTIBILITY_INFO", 0x4824),
    ("GUEST_ACTIVITY_STATE", 0x4826),
    ("GUEST_SMBASE", 0x4828),
    ("GUEST_SYSENTER_CS", 0x482A),
    ("VMX_PREEMPTION_TIMER_VALUE", 0x482E),
    # B.3.4 32-bit host-state field
    ("HOST_IA32_SYSENTER_CS", 0x4C00),
    # B.4.1 natural-width control fields
    ("CR0_GUEST_HOST_MASK", 0x6000),
    ("CR4_GUEST_HOST_MASK", 0x6002),
    ("CR0_READ_SHADOW", 0x6004),
    ("CR4_READ_SHADOW", 0x6006),
    ("CR3_TARGET_VALUE0", 0x6008),
    ("CR3_TARGET_VALUE1", 0x600A),
    ("CR3_TARGET_VALUE2", 0x600C),
    ("CR3_TARGET_VALUE3", 0x600E),
    # B.4.2 natural-width read-only data fields
    ("EXIT_QUALIFICATION", 0x6400),
    ("IO_RCX", 0x6402),
    ("IO_RSI", 0x6404),
    ("IO_RDI", 0x6406),
    ("IO_RIP", 0x6408),
    ("GUEST_LINEAR_ADDRESS", 0x640A),
    # B.4.3 natural-width guest-state fields
    ("GUEST_CR0", 0x6800),
    ("GUEST_CR3", 0x6802),
    ("GUEST_CR4", 0x6804),
    ("GUEST_ES_BASE", 0x6806),
    ("GUEST_CS_BASE", 0x6808),
    ("GUEST_SS_BASE", 0x680A),
    ("GUEST_DS_BASE", 0x680C),
    ("GUEST_FS_BASE", 0x680E),
    ("GUEST_GS_BASE", 0x6810),
    ("GUEST_LDTR_BASE", 0x6812),
    ("GUEST_TR_BASE", 0x6814),
    ("GUEST_GDTR_BASE", 0x6816),
    ("GUEST_IDTR_BASE", 0x6818),
    ("GUEST_DR7", 0x681A),
    ("GUEST_RSP", 0x681C),
    ("GUEST_RIP", 0x681E),
    ("GUEST_RFLAGS", 0x6820),
    ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822),
    ("GUEST_SYSENTER_ESP", 0x6824),
    ("GUEST_SYSENTER_EIP", 0x6826),
    # B.4.4 natural-width host-state fields
    ("HOST_CR0", 0x6C00),
    ("HOST_CR3", 0x6C02),
    ("HOST_CR4", 0x6C04),
    ("HOST_FS_BASE", 0x6C06),
    ("HOST_GS_BASE", 0x6C08),
    ("HOST_TR_BASE", 0x6C0A),
    ("HOST_GDTR_BASE", 0x6C0C),
    ("HOST_IDTR_BASE", 0x6C0E),
    ("HOST_IA32_SYSENTER_ESP", 0x6C10),
    ("HOST_IA32_SYSENTER_EIP", 0x6C12),
    ("HOST_RSP", 0x6C14),
    ("HOST_RIP", 0x6C16),
)

# Our machine's own natural-width control fields. Intel assigns natural-width control
# indices 0-7 only (0x6000-0x600E, Appendix B.4.1); 0x6030/0x6032 (indices 24/25) are free.
INVERSE_HYPERCALL_ENTRY_ENCODING = 0x6030   # guest RIP at which VMCALLR enters the guest
INVERSE_HYPERCALL_STACK_ENCODING = 0x6032   # guest RSP for that entry
_MACHINE_FIELD_TABLE: tuple[tuple[str, int], ...] = (
    ("INVERSE_HYPERCALL_ENTRY", INVERSE_HYPERCALL_ENTRY_ENCODING),
    ("INVERSE_HYPERCALL_STACK", INVERSE_HYPERCALL_STACK_ENCODING),
)
MACHINE_SPECIFIC_FIELD_NOTES = {
    "INVERSE_HYPERCALL_ENTRY": "guest RIP at which an inverse hypercall (VMCALLR) enters the guest",
    "INVERSE_HYPERCALL_STACK": "guest RSP loaded when an inverse hypercall (VMCALLR) enters the guest",
}


def _build_fields() -> tuple[Field, ...]:
    machine_names = {name for name, _ in _MACHINE_FIELD_TABLE}
    entries = sorted(_FIELD_TABLE + _MACHINE_FIELD_TABLE, key=lambda entry: entry[1])
    fields = []
    for slot, (name, encoding) in enumerate(entries):
        access_high, _index, kind, width = decode_encoding(encoding)
        assert not access_high and not encoding & ENCODING_RESERVED_BITS, name
        fields.append(Field(name=name, encoding=encoding, width=width, kind=kind,
                            offset=VMCS_FIELDS_OFFSET + slot * VMCS_SLOT_SIZE, mask=width.mask,
                            machine_specific=name in machine_names))
    return tuple(fields)


FIELDS: tuple[Field, ...] = _build_fields()
BY_NAME: dict[str, Field] = {field.name: field for field in FIELDS}
BY_ENCODING: dict[int, Field] = {field.encoding: field for field in FIELDS}

assert len(BY_NAME) == len(FIELDS) and len(BY_ENCODING) == len(FIELDS), "duplicate VMCS field"
assert FIELDS[-1].offset + VMCS_SLOT_SIZE <= VMCS_REGION_SIZE, "VMCS layout exceeds 4 KiB"

# IA32_VMX_VMCS_ENUM bits 9:1 report the highest index of any encoding. See: SDM Appendix A.9.
HIGHEST_FIELD_INDEX = max(decode_encoding(field.encoding)[1] for field in FIELDS)


def lookup(encoding: int) -> tuple[Field, bool] | None:
    """Find the field an encoding names and whether it selects the high 32 bits of a 64-bit field.

    None means "unsupported VMCS component": the caller fails VMREAD/VMWRITE with VMfailValid(12).
    See: SDM Vol. 3C 25.11.2 (access type bit 0 is valid only for 64-bit fields).
    """
    if encoding < 0 or encoding > ENCODING_MAX:
        return None
    if encoding & ENCODING_ACCESS_HIGH:
        field = BY_ENCODING.get(encoding & ~ENCODING_ACCESS_HIGH)
        if field is None or field.width != FieldWidth.W64:
            return None
        return field, True
    field = BY_ENCODING.get(encoding)
    return (field, False) if field is not None else None


def read_component(field: Field, high: bool, stored: int) -> int:
    """The value VMREAD returns for `field` (or its high half) when the slot holds `stored`."""
    value = stored & field.mask
    return value >> HIGH_HALF_SHIFT if high else value


def write_component(field: Field, high: bool, stored: int, value: int) -> int:
    """The new slot value after VMWRITE of `value` to `field` (or its high half). See: SDM 31.3 VMWRITE."""
    if high:
        return ((value & U32_MASK) << HIGH_HALF_SHIFT) | (stored & U32_MASK)
    return value & field.mask


def layout_constants() -> dict[str, int]:
    """Constants for assembly sources: region offsets, VMCS_FIELD_<NAME> encodings, VMCS_OFFSET_<NAME> slots."""
    constants = {
        "VMCS_REGION_SIZE": VMCS_REGION_SIZE,
        "VMCS_REVISION_ID_OFFSET": VMCS_REVISION_ID_OFFSET,
        "VMCS_ABORT_OFFSET": VMCS_ABORT_OFFSET,
        "VMCS_LAUNCH_STATE_OFFSET": VMCS_LAUNCH_STATE_OFFSET,
        "VMCS_RESERVED_OFFSET": VMCS_RESERVED_OFFSET,
        "VMCS_FIELDS_OFFSET": VMCS_FIELDS_OFFSET,
        "VMCS_SLOT_SIZE": VMCS_SLOT_SIZE,
        "VMCS_SHADOW_INDICATOR": VMCS_SHADOW_INDICATOR,
        "VMCS_LAUNCH_STATE_CLEAR": LAUNCH_STATE_CLEAR,
        "VMCS_LAUNCH_STATE_LAUNCHED": LAUNCH_STATE_LAUNCHED,
    }
    for field in FIELDS:
        constants[f"VMCS_FIELD_{field.name}"] = field.encoding
        constants[f"VMCS_OFFSET_{field.name}"] = field.offset
    return constants


def markdown() -> str:
    """The VMCS region header and field table, as Markdown."""
    lines = [
        "| offset | size | content |",
        "|---|---|---|",
        f"| 0x{VMCS_REVISION_ID_OFFSET:03x} | 4 | VMCS revision identifier; bit 31 = shadow-VMCS indicator |",
        f"| 0x{VMCS_ABORT_OFFSET:03x} | 4 | VMX-abort indicator |",
        f"| 0x{VMCS_LAUNCH_STATE_OFFSET:03x} | 4 | launch state: {LAUNCH_STATE_CLEAR} = clear, "
        f"{LAUNCH_STATE_LAUNCHED} = launched |",
        f"| 0x{VMCS_RESERVED_OFFSET:03x} | 4 | reserved (0) |",
        f"| 0x{VMCS_FIELDS_OFFSET:03x} | {VMCS_SLOT_SIZE} each | {len(FIELDS)} field slots, "
        f"little-endian, in the order below; the region ends at "
        f"0x{FIELDS[-1].offset + VMCS_SLOT_SIZE:03x} of 0x{VMCS_REGION_SIZE:03x} |",
        "",
        "| name | encoding | width | kind | offset |",
        "|---|---|---|---|---|",
    ]
    for field in FIELDS:
        name = f"{field.name} (machine-specific)" if field.machine_specific else field.name
        lines.append(f"| {name} | 0x{field.encoding:04X} | {field.width.label} | "
                     f"{field.kind.label} | 0x{field.offset:03x} |")
    return "\n".join(lines) + "\n"


# --- Generated documentation blocks -----------------------------------------------------------

_GENERATED_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: python -m (emu\.[a-z_]+) --markdown -->\n)(.*?)(<!-- END GENERATED -->)",
    re.DOTALL)


def render_generated_blocks(text: str) -> str:
    """Replace every generated block of a Markdown document with its module's current markdown()."""
    def regenerate(match: re.Match[str]) -> str:
        module = importlib.import_module(match.group(2))
        return match.group(1) + module.markdown() + match.group(4)
    return _GENERATED_BLOCK.sub(regenerate, text)


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if len(argv) == 2 and argv[0] == "--update-doc":
        with open(argv[1], encoding="utf-8") as doc:
            text = doc.read()
        with open(argv[1], "w", encoding="utf-8") as doc:
            doc.write(render_generated_blocks(text))
        return 0
    sys.stderr.write("usage: python -m emu.vmcs_fields --markdown | --update-doc PATH\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
