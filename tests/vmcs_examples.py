"""A valid VMCS for a 64-bit guest and a 64-bit host, as {field name: value}; tests start from it.

Every field of emu.vmcs_fields is present (0 unless set below). The values pass every check of
emu.vmentry_checks for the given capabilities; a test breaks one field to exercise one check.
Addresses are small host/guest-physical addresses below 2^MAXPHYADDR.
"""

from __future__ import annotations

from emu.vmcs_fields import FIELDS
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES, VmxCapabilities
from emu.vmx_defs import (
    AR_UNUSABLE, VMCS_LINK_POINTER_NONE, ActivityState, Cr0, Cr4, Efer, EntryControls, ExitControls,
    PinBasedControls, PrimaryProcessorControls, Rflags, SecondaryProcessorControls, make_eptp,
)
from hypervisors.segments import (
    CODE64_ACCESS_RIGHTS, DATA_ACCESS_RIGHTS, DR7_INIT, FLAT_LIMIT, GUEST_GDT_LIMIT, TSS64_BUSY_ACCESS_RIGHTS,
    TSS64_LIMIT,
)

UNUSABLE_ACCESS_RIGHTS = AR_UNUSABLE

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18

EXAMPLE_EPT_PML4 = 0x0010_0000
EXAMPLE_IO_BITMAP_A = 0x0011_0000
EXAMPLE_IO_BITMAP_B = 0x0011_1000
EXAMPLE_HOST_CR3 = 0x0000_1000
EXAMPLE_GUEST_CR3 = 0x0000_2000
EXAMPLE_VPID = 1


def example_valid_vmcs(caps: VmxCapabilities = MACHINE_VMX_CAPABILITIES) -> dict[str, int]:
    """A VMCS that VMLAUNCH accepts on a machine with capabilities `caps`."""
    vmcs = {field.name: 0 for field in FIELDS}
    vmcs.update({
        # VM-execution controls: each value is what a VMM computes with the capability MSRs.
        "PIN_BASED_VM_EXEC_CONTROL": caps.pin_based.adjust(
            PinBasedControls.EXTERNAL_INTERRUPT_EXITING | PinBasedControls.NMI_EXITING),
        "CPU_BASED_VM_EXEC_CONTROL": caps.primary_processor.adjust(
            PrimaryProcessorControls.HLT_EXITING | PrimaryProcessorControls.USE_IO_BITMAPS
            | PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS),
        "SECONDARY_VM_EXEC_CONTROL": caps.secondary_processor.adjust(
            SecondaryProcessorControls.ENABLE_EPT | SecondaryProcessorControls.ENABLE_VPID),
        "VIRTUAL_PROCESSOR_ID": EXAMPLE_VPID,
        "EPT_POINTER": make_eptp(EXAMPLE_EPT_PML4),
        "IO_BITMAP_A": EXAMPLE_IO_BITMAP_A,
        "IO_BITMAP_B": EXAMPLE_IO_BITMAP_B,
        "VM_EXIT_CONTROLS": caps.exit.adjust(
            ExitControls.HOST_ADDRESS_SPACE_SIZE | ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT
            | ExitControls.SAVE_IA32_EFER | ExitControls.LOAD_IA32_EFER),
        "VM_ENTRY_CONTROLS": caps.entry.adjust(
            EntryControls.IA32E_MODE_GUEST | EntryControls.LOAD_IA32_EFER),
        # Host state: 64-bit, paging on, flat GDT with a TSS.
        "HOST_CR0": int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG),
        "HOST_CR3": EXAMPLE_HOST_CR3,
        "HOST_CR4": int(Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.VMXE),
        "HOST_IA32_EFER": int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE),
        "HOST_CS_SELECTOR": CODE_SELECTOR,
        "HOST_SS_SELECTOR": DATA_SELECTOR,
        "HOST_DS_SELECTOR": DATA_SELECTOR,
        "HOST_ES_SELECTOR": DATA_SELECTOR,
        "HOST_TR_SELECTOR": TSS_SELECTOR,
        "HOST_TR_BASE": 0x0000_5000,
        "HOST_GDTR_BASE": 0x0000_3000,
        "HOST_IDTR_BASE": 0x0000_4000,
        "HOST_RSP": 0x0000_8000,
        "HOST_RIP": 0x0040_0000,
        # Guest state: 64-bit code at CPL 0 with paging, entering the active state.
        "GUEST_CR0": int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG),
        "GUEST_CR3": EXAMPLE_GUEST_CR3,
        "GUEST_CR4": int(Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.VMXE),
        "GUEST_IA32_EFER": int(Efer.LME | Efer.LMA),
        "GUEST_DR7": DR7_INIT,
        "GUEST_RFLAGS": int(Rflags.FIXED1),
        "GUEST_RIP": 0x0010_0000,
        "GUEST_RSP": 0x0020_0000,
        "GUEST_CS_SELECTOR": CODE_SELECTOR,
        "GUEST_CS_LIMIT": FLAT_LIMIT,
        "GUEST_CS_AR_BYTES": CODE64_ACCESS_RIGHTS,
        "GUEST_TR_SELECTOR": TSS_SELECTOR,
        "GUEST_TR_BASE": 0x0000_6000,
        "GUEST_TR_LIMIT": TSS64_LIMIT,
        "GUEST_TR_AR_BYTES": TSS64_BUSY_ACCESS_RIGHTS,
        "GUEST_LDTR_AR_BYTES": UNUSABLE_ACCESS_RIGHTS,
        "GUEST_GDTR_BASE": 0x0000_7000,
        "GUEST_GDTR_LIMIT": GUEST_GDT_LIMIT,
        "GUEST_IDTR_BASE": 0x0000_8000,
        "GUEST_IDTR_LIMIT": 0xFFF,
        "GUEST_ACTIVITY_STATE": int(ActivityState.ACTIVE),
        "VMCS_LINK_POINTER": VMCS_LINK_POINTER_NONE,
    })
    for segment in ("SS", "DS", "ES"):
        vmcs[f"GUEST_{segment}_SELECTOR"] = DATA_SELECTOR
        vmcs[f"GUEST_{segment}_LIMIT"] = FLAT_LIMIT
        vmcs[f"GUEST_{segment}_AR_BYTES"] = DATA_ACCESS_RIGHTS
    for segment in ("FS", "GS"):
        vmcs[f"GUEST_{segment}_AR_BYTES"] = UNUSABLE_ACCESS_RIGHTS
    return vmcs
