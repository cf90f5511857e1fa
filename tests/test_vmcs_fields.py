"""Tests of the VMCS field table: encodings, widths, the 4 KiB layout and the generated docs."""

import pathlib
import subprocess
import sys

import pytest

from emu import vmcs_fields as vf
from emu.vmcs_fields import FieldKind, FieldWidth

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "vmx-reference.md"

# (name, encoding) pairs as Linux arch/x86/include/asm/vmx.h spells them.
LINUX_ENCODINGS = [
    ("VIRTUAL_PROCESSOR_ID", 0x0000), ("GUEST_ES_SELECTOR", 0x0800), ("HOST_TR_SELECTOR", 0x0C0C),
    ("IO_BITMAP_A", 0x2000), ("MSR_BITMAP", 0x2004), ("TSC_OFFSET", 0x2010),
    ("EPT_POINTER", 0x201A), ("GUEST_PHYSICAL_ADDRESS", 0x2400), ("VMCS_LINK_POINTER", 0x2800),
    ("GUEST_IA32_EFER", 0x2806), ("HOST_IA32_EFER", 0x2C02),
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000), ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
    ("VM_EXIT_CONTROLS", 0x400C), ("VM_ENTRY_CONTROLS", 0x4012),
    ("VM_ENTRY_INTR_INFO_FIELD", 0x4016), ("SECONDARY_VM_EXEC_CONTROL", 0x401E),
    ("VM_INSTRUCTION_ERROR", 0x4400), ("VM_EXIT_REASON", 0x4402), ("VMX_INSTRUCTION_INFO", 0x440E),
    ("GUEST_TR_AR_BYTES", 0x4822), ("GUEST_ACTIVITY_STATE", 0x4826),
    ("VMX_PREEMPTION_TIMER_VALUE", 0x482E), ("HOST_IA32_SYSENTER_CS", 0x4C00),
    ("CR0_GUEST_HOST_MASK", 0x6000), ("CR3_TARGET_VALUE3", 0x600E), ("EXIT_QUALIFICATION", 0x6400),
    ("GUEST_LINEAR_ADDRESS", 0x640A), ("GUEST_CR0", 0x6800), ("GUEST_RIP", 0x681E),
    ("GUEST_RFLAGS", 0x6820), ("HOST_CR3", 0x6C02), ("HOST_RIP", 0x6C16),
]


@pytest.mark.parametrize("name,encoding", LINUX_ENCODINGS)
def test_linux_names_have_linux_encodings(name, encoding):
    assert vf.BY_NAME[name].encoding == encoding
    assert vf.BY_ENCODING[encoding].name == name


@pytest.mark.parametrize("encoding,expected", [
    (0x681E, (False, 0x0F, FieldKind.GUEST, FieldWidth.NATURAL)),    # guest RIP
    (0x4402, (False, 0x01, FieldKind.EXIT_INFO, FieldWidth.W32)),    # exit reason
    (0x0000, (False, 0x00, FieldKind.CONTROL, FieldWidth.W16)),      # VPID
    (0x2801, (True, 0x00, FieldKind.GUEST, FieldWidth.W64)),         # link pointer, high half
    (0x201A, (False, 0x0D, FieldKind.CONTROL, FieldWidth.W64)),      # EPTP
    (0x6C16, (False, 0x0B, FieldKind.HOST, FieldWidth.NATURAL)),     # host RIP
    (0x0C02, (False, 0x01, FieldKind.HOST, FieldWidth.W16)),         # host CS selector
])
def test_decode_encoding_follows_sdm_25_11_2(encoding, expected):
    assert vf.decode_encoding(encoding) == expected


def test_every_field_width_and_kind_match_its_encoding():
    for field in vf.FIELDS:
        access_high, _, kind, width = vf.decode_encoding(field.encoding)
        assert not access_high
        assert (field.kind, field.width) == (kind, width), field.name
        assert field.mask == {FieldWidth.W16: 0xFFFF, FieldWidth.W32: 0xFFFF_FFFF}.get(
            width, 0xFFFF_FFFF_FFFF_FFFF)


def test_names_and_encodings_are_unique_and_no_high_aliases():
    assert len({f.name for f in vf.FIELDS}) == len(vf.FIELDS)
    assert len({f.encoding for f in vf.FIELDS}) == len(vf.FIELDS)
    assert not [f.name for f in vf.FIELDS if f.name.endswith("_HIGH")]
    assert all(f.encoding & 1 == 0 for f in vf.FIELDS)


def test_read_only_fields_are_exactly_the_exit_information_type():
    read_only = {f.name for f in vf.FIELDS if f.read_only}
    assert {"VM_EXIT_REASON", "EXIT_QUALIFICATION", "VM_INSTRUCTION_ERROR",
            "GUEST_PHYSICAL_ADDRESS"} <= read_only
    assert all((f.encoding >> 10) & 3 == 1 for f in vf.FIELDS if f.read_only)
    assert "GUEST_RIP" not in read_only


def test_layout_fits_in_4k_without_overlap():
    offsets = sorted(f.offset for f in vf.FIELDS)
    assert offsets[0] == vf.VMCS_FIELDS_OFFSET == 0x10
    assert all(b - a == vf.VMCS_SLOT_SIZE for a, b in zip(offsets, offsets[1:]))
    assert offsets[-1] + vf.VMCS_SLOT_SIZE <= vf.VMCS_REGION_SIZE == 4096
    header = {vf.VMCS_REVISION_ID_OFFSET, vf.VMCS_ABORT_OFFSET, vf.VMCS_LAUNCH_STATE_OFFSET,
              vf.VMCS_RESERVED_OFFSET}
    assert header == {0, 4, 8, 12}
    assert all(offset + 4 <= vf.VMCS_FIELDS_OFFSET for offset in header)


def test_fields_are_in_encoding_order_and_slots_follow_it():
    assert [f.encoding for f in vf.FIELDS] == sorted(f.encoding for f in vf.FIELDS)
    for slot, field in enumerate(vf.FIELDS):
        assert field.offset == vf.VMCS_FIELDS_OFFSET + slot * vf.VMCS_SLOT_SIZE


def test_high_access_of_a_64_bit_field():
    assert vf.lookup(0x201B) == (vf.BY_NAME["EPT_POINTER"], True)
    assert vf.lookup(0x201A) == (vf.BY_NAME["EPT_POINTER"], False)
    assert vf.lookup(0x2801) == (vf.BY_NAME["VMCS_LINK_POINTER"], True)


@pytest.mark.parametrize("encoding", [
    0x681F,                  # high access of a natural-width field
    0x4403,                  # high access of a 32-bit field
    0x0001,                  # high access of a 16-bit field
    0x6010,                  # unassigned natural-width control index
    0x202E,                  # ENCLS-exiting bitmap: SGX, not on our machine
    0x6828,                  # guest IA32_S_CET: CET, not on our machine
    0x2814,                  # guest IA32_RTIT_CTL: Intel PT, not on our machine
    0x681E | (1 << 12),      # reserved bit 12
    0x681E | (1 << 15),      # reserved bit 15
    0x681E | (1 << 16),      # bits 31:16 must be 0
    (1 << 32) | 0x681E,      # bits 63:32 of the VMREAD/VMWRITE operand
    -1,
])
def test_unsupported_encodings_return_none(encoding):
    assert vf.lookup(encoding) is None


def test_every_field_is_found_by_its_encoding():
    for field in vf.FIELDS:
        assert vf.lookup(field.encoding) == (field, False)
        high = vf.lookup(field.encoding | 1)
        assert (high == (field, True)) if field.width == FieldWidth.W64 else high is None


def test_read_and_write_components():
    link = vf.BY_NAME["VMCS_LINK_POINTER"]
    stored = 0x1122_3344_5566_7788
    assert vf.read_component(link, False, stored) == stored
    assert vf.read_component(link, True, stored) == 0x1122_3344
    assert vf.write_component(link, True, stored, 0xFFFF_FFFF_AAAA_BBBB) == 0xAAAA_BBBB_5566_7788
    selector = vf.BY_NAME["GUEST_CS_SELECTOR"]
    assert vf.write_component(selector, False, 0, 0x12_3456) == 0x3456
    reason = vf.BY_NAME["VM_EXIT_REASON"]
    assert vf.read_component(reason, False, 0x1_8000_0021) == 0x8000_0021


def test_machine_specific_fields():
    machine = [f for f in vf.FIELDS if f.machine_specific]
    assert {f.name for f in machine} == {"INVERSE_HYPERCALL_ENTRY", "INVERSE_HYPERCALL_STACK"}
    for field in machine:
        assert (field.kind, field.width) == (FieldKind.CONTROL, FieldWidth.NATURAL)
        # Intel's natural-width control fields are 0x6000-0x600E (indices 0-7).
        assert field.encoding > 0x600E and field.encoding >> 10 == 0x6000 >> 10
        assert field.name in vf.MACHINE_SPECIFIC_FIELD_NOTES


def test_highest_field_index_reported_for_vmcs_enum():
    assert vf.HIGHEST_FIELD_INDEX == max((f.encoding >> 1) & 0x1FF for f in vf.FIELDS)
    assert vf.HIGHEST_FIELD_INDEX == 0x19     # INVERSE_HYPERCALL_STACK, 0x6032


def test_layout_constants_are_consistent():
    constants = vf.layout_constants()
    assert constants["VMCS_REVISION_ID_OFFSET"] == 0
    assert constants["VMCS_ABORT_OFFSET"] == 4
    assert constants["VMCS_LAUNCH_STATE_OFFSET"] == 8
    assert constants["VMCS_FIELD_GUEST_RIP"] == 0x681E
    for field in vf.FIELDS:
        assert constants[f"VMCS_FIELD_{field.name}"] == field.encoding
        assert constants[f"VMCS_OFFSET_{field.name}"] == field.offset
    slots = [value for key, value in constants.items() if key.startswith("VMCS_OFFSET_")]
    assert len(set(slots)) == len(vf.FIELDS)


def test_markdown_lists_every_field():
    text = vf.markdown()
    for field in vf.FIELDS:
        assert f"| {field.name}" in text and f"0x{field.encoding:04X}" in text


def test_cli_prints_the_markdown_table():
    result = subprocess.run([sys.executable, "-m", "emu.vmcs_fields", "--markdown"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout == vf.markdown()


def test_reference_doc_generated_blocks_are_current():
    text = DOC.read_text(encoding="utf-8")
    assert text.count("<!-- BEGIN GENERATED") >= 4
    assert vf.render_generated_blocks(text) == text, (
        "docs/vmx-reference.md is stale: run "
        "python -m emu.vmcs_fields --update-doc docs/vmx-reference.md")
