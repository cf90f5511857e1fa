"""Tests of the VM-entry checks: the valid example VMCS passes, each check catches its one broken field."""

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from emu import vmentry_checks as checks
from tests.vmcs_examples import example_valid_vmcs
from emu.vmcs_fields import FIELDS
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as MACHINE, ControlCapability, msr_values
from emu.vmx_defs import (
    AR_DB, AR_G, AR_L, AR_P, AR_S, AR_UNUSABLE, ActivityState, Cr0, Cr4, Efer, EntryControls,
    ExceptionVector, ExitControls, InterruptionType, MemoryType, PinBasedControls,
    PrimaryProcessorControls, Rflags, SecondaryProcessorControls, make_eptp, make_interruption_info,
)

U64 = 0xFFFF_FFFF_FFFF_FFFF
NON_CANONICAL = 0x0000_8000_0000_0000
IF_ = int(Rflags.IF)
LDT_AR = AR_P | 0x2


def _extend(capability: ControlCapability, optional: int = 0, drop_must: int = 0) -> ControlCapability:
    must = capability.must_be_one & ~int(drop_must)
    return ControlCapability(must_be_one=must, may_be_one=capability.may_be_one | int(optional))


# A machine with more VMX features, to reach checks whose controls our machine does not offer.
PERMISSIVE = dataclasses.replace(
    MACHINE,
    pin_based=_extend(MACHINE.pin_based, PinBasedControls.VIRTUAL_NMIS),
    primary_processor=_extend(MACHINE.primary_processor,
                              PrimaryProcessorControls.NMI_WINDOW_EXITING
                              | PrimaryProcessorControls.MONITOR_TRAP_FLAG),
    secondary_processor=_extend(MACHINE.secondary_processor,
                                SecondaryProcessorControls.UNRESTRICTED_GUEST,
                                drop_must=SecondaryProcessorControls.ENABLE_EPT),
    exit=_extend(MACHINE.exit, ExitControls.LOAD_IA32_PAT),
    entry=_extend(MACHINE.entry, EntryControls.LOAD_IA32_PAT | EntryControls.LOAD_DEBUG_CONTROLS),
)
# A machine that can also run 32-bit hosts and guests (VM entry from outside IA-32e mode).
LEGACY = dataclasses.replace(
    MACHINE,
    exit=_extend(MACHINE.exit, drop_must=ExitControls.HOST_ADDRESS_SPACE_SIZE),
    entry=_extend(MACHINE.entry, drop_must=EntryControls.IA32E_MODE_GUEST),
    cr4_fixed1=MACHINE.cr4_fixed1 | Cr4.PCIDE,
)
ALL_CAPS = {"machine": MACHINE, "permissive": PERMISSIVE, "legacy": LEGACY}


# --- mutation helpers: each returns a function that breaks a valid VMCS dict in place --------

def set_(**values):
    return lambda vmcs: vmcs.update(values)


def or_(name, bits):
    return lambda vmcs: vmcs.__setitem__(name, vmcs[name] | int(bits))


def clear(name, bits):
    return lambda vmcs: vmcs.__setitem__(name, vmcs[name] & ~int(bits))


def chain(*mutations):
    def apply(vmcs):
        for mutation in mutations:
            mutation(vmcs)
    return apply


def inject(vector, kind, error_code=False, **more):
    return set_(VM_ENTRY_INTR_INFO_FIELD=make_interruption_info(vector, kind, error_code), **more)


# A 32-bit host (for LEGACY, from outside IA-32e mode): no host address-space size, no EFER load.
LEGACY_HOST = chain(clear("VM_EXIT_CONTROLS", ExitControls.HOST_ADDRESS_SPACE_SIZE
                          | ExitControls.LOAD_IA32_EFER),
                    clear("VM_ENTRY_CONTROLS", EntryControls.IA32E_MODE_GUEST))
UNRESTRICTED = or_("SECONDARY_VM_EXEC_CONTROL", SecondaryProcessorControls.UNRESTRICTED_GUEST)
# SS and CS at DPL 3 and RPL 3, consistent with each other.
RING3_STACK = chain(or_("GUEST_CS_AR_BYTES", 3 << 5), or_("GUEST_SS_AR_BYTES", 3 << 5),
                    set_(GUEST_CS_SELECTOR=0x0B, GUEST_SS_SELECTOR=0x13))

# (check id, mutation, capabilities, processor in IA-32e mode)
FAILING_CASES = [
    # 27.2.1.1 VM-execution controls
    ("controls.pin.allowed0", set_(PIN_BASED_VM_EXEC_CONTROL=0), "machine", True),
    ("controls.pin.allowed1", or_("PIN_BASED_VM_EXEC_CONTROL", PinBasedControls.VIRTUAL_NMIS),
     "machine", True),
    ("controls.proc.allowed0", clear("CPU_BASED_VM_EXEC_CONTROL",
                                     PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS), "machine", True),
    ("controls.proc.allowed1", or_("CPU_BASED_VM_EXEC_CONTROL", PrimaryProcessorControls.MONITOR_TRAP_FLAG),
     "machine", True),
    ("controls.proc2.allowed0", clear("SECONDARY_VM_EXEC_CONTROL", SecondaryProcessorControls.ENABLE_EPT),
     "machine", True),
    ("controls.proc2.allowed1", UNRESTRICTED, "machine", True),
    ("controls.cr3_target_count", set_(CR3_TARGET_COUNT=1), "machine", True),
    ("controls.io_bitmap", set_(IO_BITMAP_A=0x0011_0800), "machine", True),
    ("controls.io_bitmap", set_(IO_BITMAP_B=1 << 39), "machine", True),
    ("controls.msr_bitmap", chain(or_("CPU_BASED_VM_EXEC_CONTROL", PrimaryProcessorControls.USE_MSR_BITMAPS),
                                  set_(MSR_BITMAP=0x0012_0123)), "machine", True),
    ("controls.virtual_nmis", chain(clear("PIN_BASED_VM_EXEC_CONTROL", PinBasedControls.NMI_EXITING),
                                    or_("PIN_BASED_VM_EXEC_CONTROL", PinBasedControls.VIRTUAL_NMIS)),
     "permissive", True),
    ("controls.nmi_window", or_("CPU_BASED_VM_EXEC_CONTROL", PrimaryProcessorControls.NMI_WINDOW_EXITING),
     "permissive", True),
    ("controls.vpid", set_(VIRTUAL_PROCESSOR_ID=0), "machine", True),
    ("controls.ept.memory_type", set_(EPT_POINTER=make_eptp(0x10_0000, MemoryType.UC)), "machine", True),
    ("controls.ept.memory_type", set_(EPT_POINTER=0x10_0000 | (3 << 3) | 2), "machine", True),
    ("controls.ept.walk_length", set_(EPT_POINTER=make_eptp(0x10_0000, walk_length=5)), "machine", True),
    ("controls.ept.walk_length", set_(EPT_POINTER=make_eptp(0x10_0000, walk_length=1)), "machine", True),
    ("controls.ept.accessed_dirty", set_(EPT_POINTER=make_eptp(0x10_0000, accessed_dirty=True)),
     "machine", True),
    ("controls.ept.reserved", or_("EPT_POINTER", 1 << 7), "machine", True),
    ("controls.ept.reserved", or_("EPT_POINTER", 1 << 39), "machine", True),
    ("controls.unrestricted_guest", set_(SECONDARY_VM_EXEC_CONTROL=int(
        SecondaryProcessorControls.UNRESTRICTED_GUEST)), "permissive", True),
    # 27.2.1.2 VM-exit controls
    ("controls.exit.allowed0", clear("VM_EXIT_CONTROLS", ExitControls.HOST_ADDRESS_SPACE_SIZE),
     "machine", True),
    ("controls.exit.allowed0", set_(VM_EXIT_CONTROLS=int(ExitControls.HOST_ADDRESS_SPACE_SIZE)),
     "machine", True),
    ("controls.exit.allowed1", or_("VM_EXIT_CONTROLS", ExitControls.LOAD_IA32_PAT), "machine", True),
    ("controls.exit.preemption_timer", or_("VM_EXIT_CONTROLS", ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE),
     "machine", True),
    ("controls.exit.msr_store_count", set_(VM_EXIT_MSR_STORE_COUNT=513), "machine", True),
    ("controls.exit.msr_store_address", set_(VM_EXIT_MSR_STORE_COUNT=1, VM_EXIT_MSR_STORE_ADDR=0x1008),
     "machine", True),
    ("controls.exit.msr_load_count", set_(VM_EXIT_MSR_LOAD_COUNT=600), "machine", True),
    ("controls.exit.msr_load_address", set_(VM_EXIT_MSR_LOAD_COUNT=2, VM_EXIT_MSR_LOAD_ADDR=1 << 39),
     "machine", True),
    # 27.2.1.3 VM-entry controls
    ("controls.entry.allowed0", clear("VM_ENTRY_CONTROLS", EntryControls.IA32E_MODE_GUEST), "machine", True),
    ("controls.entry.allowed1", or_("VM_ENTRY_CONTROLS", EntryControls.LOAD_IA32_PAT), "machine", True),
    ("controls.event.type", inject(0x20, InterruptionType.RESERVED), "machine", True),
    ("controls.event.type", inject(0, InterruptionType.OTHER_EVENT), "machine", True),
    ("controls.event.vector", inject(3, InterruptionType.NMI), "machine", True),
    ("controls.event.vector", inject(32, InterruptionType.HARDWARE_EXCEPTION), "machine", True),
    ("controls.event.vector", inject(1, InterruptionType.OTHER_EVENT), "permissive", True),
    ("controls.event.deliver_error_code", inject(ExceptionVector.GP, InterruptionType.HARDWARE_EXCEPTION),
     "machine", True),
    ("controls.event.deliver_error_code", inject(ExceptionVector.UD, InterruptionType.HARDWARE_EXCEPTION,
                                                 True), "machine", True),
    ("controls.event.deliver_error_code", inject(0x20, InterruptionType.EXTERNAL_INTERRUPT, True),
     "machine", True),
    ("controls.event.reserved", set_(VM_ENTRY_INTR_INFO_FIELD=make_interruption_info(
        0x20, InterruptionType.EXTERNAL_INTERRUPT) | (1 << 12)), "machine", True),
    ("controls.event.error_code", inject(ExceptionVector.GP, InterruptionType.HARDWARE_EXCEPTION, True,
                                         VM_ENTRY_EXCEPTION_ERROR_CODE=0x1_0000), "machine", True),
    ("controls.event.instruction_length", inject(0x80, InterruptionType.SOFTWARE_INTERRUPT,
                                                 VM_ENTRY_INSTRUCTION_LEN=0), "machine", True),
    ("controls.event.instruction_length", inject(ExceptionVector.BP, InterruptionType.SOFTWARE_EXCEPTION,
                                                 VM_ENTRY_INSTRUCTION_LEN=16), "machine", True),
    ("controls.entry.msr_load_count", set_(VM_ENTRY_MSR_LOAD_COUNT=513), "machine", True),
    ("controls.entry.msr_load_address", set_(VM_ENTRY_MSR_LOAD_COUNT=1, VM_ENTRY_MSR_LOAD_ADDR=0x1008),
     "machine", True),
    ("controls.entry.msr_load_address", set_(VM_ENTRY_MSR_LOAD_COUNT=2, VM_ENTRY_MSR_LOAD_ADDR=(1 << 39) - 16),
     "machine", True),
    # 27.2.2 host control registers and MSRs
    ("host.cr0.fixed0", set_(HOST_CR0=0x11), "machine", True),
    ("host.cr0.fixed1", or_("HOST_CR0", 1 << 6), "machine", True),
    ("host.cr0.fixed1", or_("HOST_CR0", 1 << 32), "machine", True),
    ("host.cr4.fixed0", clear("HOST_CR4", Cr4.VMXE), "machine", True),
    ("host.cr4.fixed1", or_("HOST_CR4", Cr4.LA57), "machine", True),
    ("host.cr3", set_(HOST_CR3=1 << 39), "machine", True),
    ("host.sysenter.canonical", set_(HOST_IA32_SYSENTER_EIP=NON_CANONICAL), "machine", True),
    ("host.sysenter.canonical", set_(HOST_IA32_SYSENTER_ESP=0xFFFF_0000_0000_0000), "machine", True),
    ("host.pat", chain(or_("VM_EXIT_CONTROLS", ExitControls.LOAD_IA32_PAT),
                       set_(HOST_IA32_PAT=0x0007_0406_0007_0206)), "permissive", True),
    ("host.efer.reserved", or_("HOST_IA32_EFER", 1 << 9), "machine", True),
    ("host.efer.lma_lme", clear("HOST_IA32_EFER", Efer.LMA), "machine", True),
    ("host.efer.lma_lme", clear("HOST_IA32_EFER", Efer.LME), "machine", True),
    # 27.2.3 host segment and descriptor-table registers
    ("host.selector.rpl_ti", set_(HOST_DS_SELECTOR=0x13), "machine", True),
    ("host.selector.rpl_ti", set_(HOST_TR_SELECTOR=0x1C), "machine", True),
    ("host.cs.null", set_(HOST_CS_SELECTOR=0), "machine", True),
    ("host.tr.null", set_(HOST_TR_SELECTOR=0), "machine", True),
    ("host.ss.null", chain(LEGACY_HOST, set_(HOST_SS_SELECTOR=0)), "legacy", False),
    ("host.base.canonical", set_(HOST_GS_BASE=NON_CANONICAL), "machine", True),
    ("host.base.canonical", set_(HOST_TR_BASE=NON_CANONICAL), "machine", True),
    # 27.2.4 address-space size
    ("host.address_space.ia32e", clear("VM_EXIT_CONTROLS", ExitControls.HOST_ADDRESS_SPACE_SIZE
                                       | ExitControls.LOAD_IA32_EFER), "legacy", True),
    ("host.address_space.legacy", set_(), "legacy", False),
    ("host.address_space.legacy", clear("VM_EXIT_CONTROLS", ExitControls.HOST_ADDRESS_SPACE_SIZE
                                        | ExitControls.LOAD_IA32_EFER), "legacy", False),
    ("host.cr4.pcide", chain(LEGACY_HOST, or_("HOST_CR4", Cr4.PCIDE)), "legacy", False),
    ("host.rip.high", chain(LEGACY_HOST, set_(HOST_RIP=1 << 32)), "legacy", False),
    ("host.cr4.pae", clear("HOST_CR4", Cr4.PAE), "machine", True),
    ("host.rip.canonical", set_(HOST_RIP=NON_CANONICAL), "machine", True),
    # 27.3.1.1 guest control registers, debug registers, MSRs
    ("guest.cr0.fixed0", clear("GUEST_CR0", Cr0.NE), "machine", True),
    ("guest.cr0.fixed0", clear("GUEST_CR0", Cr0.PE), "machine", True),
    ("guest.cr0.fixed1", or_("GUEST_CR0", 1 << 6), "machine", True),
    ("guest.cr0.pg_without_pe", chain(UNRESTRICTED, clear("GUEST_CR0", Cr0.PE)), "permissive", True),
    ("guest.cr4.fixed0", clear("GUEST_CR4", Cr4.VMXE), "machine", True),
    ("guest.cr4.fixed1", or_("GUEST_CR4", Cr4.PCIDE), "machine", True),
    ("guest.ia32e.cr0_pg", chain(UNRESTRICTED, clear("GUEST_CR0", Cr0.PG)), "permissive", True),
    ("guest.ia32e.cr4_pae", clear("GUEST_CR4", Cr4.PAE), "machine", True),
    ("guest.cr4.pcide", chain(clear("VM_ENTRY_CONTROLS", EntryControls.IA32E_MODE_GUEST),
                              or_("GUEST_CR4", Cr4.PCIDE)), "legacy", True),
    ("guest.cr3", set_(GUEST_CR3=1 << 40), "machine", True),
    ("guest.dr7", chain(or_("VM_ENTRY_CONTROLS", EntryControls.LOAD_DEBUG_CONTROLS),
                        set_(GUEST_DR7=(1 << 32) | 0x400)), "permissive", True),
    ("guest.sysenter.canonical", set_(GUEST_SYSENTER_ESP=0xFFFF_0000_0000_0000), "machine", True),
    ("guest.sysenter.canonical", set_(GUEST_SYSENTER_EIP=NON_CANONICAL), "machine", True),
    ("guest.pat", chain(or_("VM_ENTRY_CONTROLS", EntryControls.LOAD_IA32_PAT),
                        set_(GUEST_IA32_PAT=0x0007_0406_0007_0402)), "permissive", True),
    ("guest.efer.reserved", or_("GUEST_IA32_EFER", 1 << 1), "machine", True),
    ("guest.efer.lma", clear("GUEST_IA32_EFER", Efer.LMA), "machine", True),
    ("guest.efer.lme", clear("GUEST_IA32_EFER", Efer.LME), "machine", True),
    # 27.3.1.2 guest segment registers
    ("guest.tr.ti", set_(GUEST_TR_SELECTOR=0x1C), "machine", True),
    ("guest.ldtr.ti", set_(GUEST_LDTR_SELECTOR=0x24, GUEST_LDTR_AR_BYTES=LDT_AR, GUEST_LDTR_LIMIT=0xFF),
     "machine", True),
    ("guest.ss.rpl", set_(GUEST_SS_SELECTOR=0x13), "machine", True),
    ("guest.base.canonical", set_(GUEST_FS_BASE=NON_CANONICAL), "machine", True),
    ("guest.base.canonical", set_(GUEST_TR_BASE=NON_CANONICAL), "machine", True),
    ("guest.base.canonical", set_(GUEST_LDTR_AR_BYTES=LDT_AR, GUEST_LDTR_BASE=NON_CANONICAL), "machine", True),
    ("guest.base.high", set_(GUEST_CS_BASE=1 << 32), "machine", True),
    ("guest.base.high", set_(GUEST_DS_BASE=1 << 32), "machine", True),
    ("guest.cs.type", clear("GUEST_CS_AR_BYTES", 1), "machine", True),
    ("guest.cs.type", set_(GUEST_CS_AR_BYTES=AR_G | AR_L | AR_P | AR_S | 0x3), "machine", True),
    ("guest.ss.type", set_(GUEST_SS_AR_BYTES=AR_G | AR_DB | AR_P | AR_S | 0x1), "machine", True),
    ("guest.seg.type", clear("GUEST_DS_AR_BYTES", 1), "machine", True),
    ("guest.seg.type", set_(GUEST_ES_AR_BYTES=AR_G | AR_DB | AR_P | AR_S | 0x9), "machine", True),
    ("guest.seg.s", clear("GUEST_DS_AR_BYTES", AR_S), "machine", True),
    ("guest.seg.s", clear("GUEST_CS_AR_BYTES", AR_S), "machine", True),
    ("guest.cs.dpl", or_("GUEST_CS_AR_BYTES", 3 << 5), "machine", True),
    ("guest.cs.dpl", set_(GUEST_CS_AR_BYTES=AR_G | AR_L | AR_P | AR_S | 0xF | (3 << 5)), "machine", True),
    ("guest.cs.dpl", chain(UNRESTRICTED, set_(GUEST_CS_AR_BYTES=AR_G | AR_DB | AR_P | AR_S | 0x3 | (1 << 5))),
     "permissive", True),
    ("guest.ss.dpl", chain(or_("GUEST_CS_AR_BYTES", 3 << 5), or_("GUEST_SS_AR_BYTES", 3 << 5)),
     "machine", True),
    ("guest.ss.dpl", chain(UNRESTRICTED, set_(GUEST_CS_AR_BYTES=AR_G | AR_L | AR_P | AR_S | 0x3),
                           or_("GUEST_SS_AR_BYTES", 3 << 5)), "permissive", True),
    ("guest.seg.dpl", set_(GUEST_DS_SELECTOR=0x13), "machine", True),
    ("guest.seg.present", clear("GUEST_DS_AR_BYTES", AR_P), "machine", True),
    ("guest.seg.present", clear("GUEST_CS_AR_BYTES", AR_P), "machine", True),
    ("guest.seg.reserved", or_("GUEST_DS_AR_BYTES", 1 << 8), "machine", True),
    ("guest.seg.reserved", or_("GUEST_CS_AR_BYTES", 1 << 17), "machine", True),
    ("guest.cs.l_db", or_("GUEST_CS_AR_BYTES", AR_DB), "machine", True),
    ("guest.seg.granularity", set_(GUEST_SS_LIMIT=0xFFFF_F000), "machine", True),
    ("guest.seg.granularity", clear("GUEST_ES_AR_BYTES", AR_G), "machine", True),
    ("guest.tr.type", set_(GUEST_TR_AR_BYTES=AR_P | 0x9), "machine", True),
    ("guest.tr.type", set_(GUEST_TR_AR_BYTES=AR_P | 0x3), "machine", True),
    ("guest.tr.s", or_("GUEST_TR_AR_BYTES", AR_S), "machine", True),
    ("guest.tr.present", clear("GUEST_TR_AR_BYTES", AR_P), "machine", True),
    ("guest.tr.reserved", or_("GUEST_TR_AR_BYTES", 1 << 9), "machine", True),
    ("guest.tr.granularity", or_("GUEST_TR_AR_BYTES", AR_G), "machine", True),
    ("guest.tr.unusable", or_("GUEST_TR_AR_BYTES", AR_UNUSABLE), "machine", True),
    ("guest.ldtr.type", set_(GUEST_LDTR_AR_BYTES=AR_P | 0x3), "machine", True),
    ("guest.ldtr.s", set_(GUEST_LDTR_AR_BYTES=LDT_AR | AR_S), "machine", True),
    ("guest.ldtr.present", set_(GUEST_LDTR_AR_BYTES=0x2), "machine", True),
    ("guest.ldtr.reserved", set_(GUEST_LDTR_AR_BYTES=LDT_AR | (1 << 10)), "machine", True),
    ("guest.ldtr.granularity", set_(GUEST_LDTR_AR_BYTES=LDT_AR | AR_G, GUEST_LDTR_LIMIT=0), "machine", True),
    # 27.3.1.3 descriptor-table registers
    ("guest.gdtr.base", set_(GUEST_GDTR_BASE=NON_CANONICAL), "machine", True),
    ("guest.idtr.base", set_(GUEST_IDTR_BASE=0x0000_FFFF_FFFF_F000 + (1 << 48)), "machine", True),
    ("guest.gdtr.limit", set_(GUEST_GDTR_LIMIT=0x1_0000), "machine", True),
    ("guest.idtr.limit", set_(GUEST_IDTR_LIMIT=0xFFFF_FFFF), "machine", True),
    # 27.3.1.4 RIP and RFLAGS
    ("guest.rip.high", chain(clear("GUEST_CS_AR_BYTES", AR_L), set_(GUEST_RIP=1 << 32)), "machine", True),
    ("guest.rip.linear_width", set_(GUEST_RIP=1 << 48), "machine", True),
    ("guest.rip.linear_width", set_(GUEST_RIP=0x7FFF_0000_0000_0000), "machine", True),
    ("guest.rflags.reserved", or_("GUEST_RFLAGS", 1 << 3), "machine", True),
    ("guest.rflags.reserved", or_("GUEST_RFLAGS", 1 << 22), "machine", True),
    ("guest.rflags.bit1", set_(GUEST_RFLAGS=0), "machine", True),
    ("guest.rflags.vm", or_("GUEST_RFLAGS", Rflags.VM), "machine", True),
    ("guest.rflags.if", inject(0x20, InterruptionType.EXTERNAL_INTERRUPT), "machine", True),
    # 27.3.1.5 non-register state
    ("guest.activity.valid", set_(GUEST_ACTIVITY_STATE=4), "machine", True),
    ("guest.activity.supported", set_(GUEST_ACTIVITY_STATE=int(ActivityState.SHUTDOWN)), "machine", True),
    ("guest.activity.supported", set_(GUEST_ACTIVITY_STATE=int(ActivityState.WAIT_FOR_SIPI)), "machine", True),
    ("guest.activity.hlt_dpl", chain(RING3_STACK, set_(GUEST_ACTIVITY_STATE=int(ActivityState.HLT))),
     "machine", True),
    ("guest.activity.blocking", set_(GUEST_ACTIVITY_STATE=int(ActivityState.HLT),
                                     GUEST_INTERRUPTIBILITY_INFO=1, GUEST_RFLAGS=0x2 | IF_), "machine", True),
    ("guest.activity.injection", inject(ExceptionVector.GP, InterruptionType.HARDWARE_EXCEPTION, True,
                                        GUEST_ACTIVITY_STATE=int(ActivityState.HLT)), "machine", True),
    ("guest.activity.injection", inject(0x80, InterruptionType.SOFTWARE_INTERRUPT,
                                        VM_ENTRY_INSTRUCTION_LEN=2,
                                        GUEST_ACTIVITY_STATE=int(ActivityState.HLT)), "machine", True),
    ("guest.interruptibility.reserved", set_(GUEST_INTERRUPTIBILITY_INFO=1 << 4), "machine", True),
    ("guest.interruptibility.sti_and_mov_ss", set_(GUEST_INTERRUPTIBILITY_INFO=3, GUEST_RFLAGS=0x2 | IF_),
     "machine", True),
    ("guest.interruptibility.sti_without_if", set_(GUEST_INTERRUPTIBILITY_INFO=1), "machine", True),
    ("guest.interruptibility.external_interrupt", inject(0x20, InterruptionType.EXTERNAL_INTERRUPT,
                                                         GUEST_RFLAGS=0x2 | IF_, GUEST_INTERRUPTIBILITY_INFO=2),
     "machine", True),
    ("guest.interruptibility.nmi_mov_ss", inject(2, InterruptionType.NMI, GUEST_INTERRUPTIBILITY_INFO=2),
     "machine", True),
    ("guest.interruptibility.nmi_sti", inject(2, InterruptionType.NMI, GUEST_INTERRUPTIBILITY_INFO=1,
                                              GUEST_RFLAGS=0x2 | IF_), "machine", True),
    ("guest.interruptibility.smi", set_(GUEST_INTERRUPTIBILITY_INFO=1 << 2), "machine", True),
    ("guest.interruptibility.virtual_nmi", chain(or_("PIN_BASED_VM_EXEC_CONTROL", PinBasedControls.VIRTUAL_NMIS),
                                                 inject(2, InterruptionType.NMI, GUEST_INTERRUPTIBILITY_INFO=8)),
     "permissive", True),
    ("guest.pending_dbg.reserved", set_(GUEST_PENDING_DBG_EXCEPTIONS=1 << 4), "machine", True),
    ("guest.pending_dbg.reserved", set_(GUEST_PENDING_DBG_EXCEPTIONS=1 << 16), "machine", True),
    ("guest.pending_dbg.bs", set_(GUEST_INTERRUPTIBILITY_INFO=1, GUEST_RFLAGS=0x2 | IF_ | int(Rflags.TF)),
     "machine", True),
    ("guest.pending_dbg.bs", set_(GUEST_ACTIVITY_STATE=int(ActivityState.HLT),
                                  GUEST_PENDING_DBG_EXCEPTIONS=1 << 14), "machine", True),
    ("guest.vmcs_link_pointer", set_(VMCS_LINK_POINTER=0), "machine", True),
    ("guest.vmcs_link_pointer", set_(VMCS_LINK_POINTER=0x0000_3000), "machine", True),
]


def expected_outcome(check_id):
    """What the SDM says each stage of checks reports (independent of the module's registry)."""
    if check_id.startswith("controls."):
        return "VMfailValid", 7, None, 0
    if check_id.startswith("host."):
        return "VMfailValid", 8, None, 0
    qualification = {"guest.vmcs_link_pointer": 4, "guest.interruptibility.nmi_sti": 3}.get(check_id, 0)
    return "entry-failure", None, 33, qualification


def run(vmcs, caps=MACHINE, in_ia32e_mode=True):
    return checks.check_vm_entry(vmcs.__getitem__, caps, launching=True, in_ia32e_mode=in_ia32e_mode)


@pytest.mark.parametrize("caps_name,in_ia32e_mode", [
    ("machine", True), ("permissive", True), ("legacy", True), ("legacy", False)])
def test_valid_example_passes(caps_name, in_ia32e_mode):
    caps = ALL_CAPS[caps_name]
    vmcs = example_valid_vmcs(caps)
    if not in_ia32e_mode:
        LEGACY_HOST(vmcs)
        clear("VM_ENTRY_CONTROLS", EntryControls.LOAD_IA32_EFER)(vmcs)
    assert run(vmcs, caps, in_ia32e_mode) is None
    assert list(checks.iter_failures(checks.EntryState(vmcs.__getitem__, caps, in_ia32e_mode))) == []


def test_valid_example_sets_every_field():
    assert set(example_valid_vmcs()) == {field.name for field in FIELDS}


@pytest.mark.parametrize("check_id,mutate,caps_name,in_ia32e_mode", [
    pytest.param(*case, id=f"{case[0]}-{index}") for index, case in enumerate(FAILING_CASES)])
def test_each_check_catches_its_broken_field(check_id, mutate, caps_name, in_ia32e_mode):
    caps = ALL_CAPS[caps_name]
    vmcs = example_valid_vmcs(caps)
    mutate(vmcs)
    failure = run(vmcs, caps, in_ia32e_mode)
    assert failure is not None, check_id
    assert failure.check == check_id, failure.message
    kind, error, exit_reason, qualification = expected_outcome(check_id)
    assert failure.kind == kind
    assert failure.error == error
    assert failure.exit_reason == exit_reason
    assert failure.qualification == qualification
    assert failure.sdm == checks.CHECKS_BY_ID[check_id].sdm
    assert failure.sdm.startswith("27.2" if kind == "VMfailValid" else "27.3.1")
    assert failure.message.startswith("VMFAIL" if kind == "VMfailValid" else "VMENTER FAIL")
    if exit_reason is not None:
        assert failure.exit_reason_field == 0x8000_0021


def test_every_registered_check_has_a_failing_case():
    covered = {case[0] for case in FAILING_CASES} | {case[0] for case in LAUNCH_STATE_CASES}
    assert covered == set(checks.CHECKS_BY_ID)


def test_messages_from_the_reference():
    vmcs = example_valid_vmcs()
    vmcs["HOST_CR0"] = 0x11
    assert run(vmcs).message == "VMFAIL: VMCS host state invalid CR0 0x00000011 (bits 0x80000021 must be 1: PE NE PG)"
    vmcs = example_valid_vmcs()
    vmcs["GUEST_RFLAGS"] = 0
    assert run(vmcs).message == "VMENTER FAIL: VMCS guest state invalid RFLAGS 0x0 (bit 1 must be 1)"


def test_messages_name_the_offending_control_bits():
    vmcs = example_valid_vmcs()
    vmcs["CPU_BASED_VM_EXEC_CONTROL"] |= PrimaryProcessorControls.MONITOR_TRAP_FLAG
    assert "MONITOR_TRAP_FLAG" in run(vmcs).message
    vmcs = example_valid_vmcs()
    vmcs["PIN_BASED_VM_EXEC_CONTROL"] = 0
    assert "missing 0x00000016" in run(vmcs).message


def test_checks_run_in_sdm_order_controls_then_host_then_guest():
    vmcs = example_valid_vmcs()
    vmcs.update(PIN_BASED_VM_EXEC_CONTROL=0, HOST_CR0=0, GUEST_RFLAGS=0)
    assert run(vmcs).check == "controls.pin.allowed0"
    vmcs["PIN_BASED_VM_EXEC_CONTROL"] = example_valid_vmcs()["PIN_BASED_VM_EXEC_CONTROL"]
    assert run(vmcs).check == "host.cr0.fixed0"
    vmcs["HOST_CR0"] = example_valid_vmcs()["HOST_CR0"]
    assert run(vmcs).check == "guest.rflags.bit1"


def test_secondary_controls_ignored_when_not_activated():
    caps = dataclasses.replace(
        PERMISSIVE, primary_processor=_extend(PERMISSIVE.primary_processor,
                                              drop_must=PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS))
    vmcs = example_valid_vmcs(caps)
    vmcs["CPU_BASED_VM_EXEC_CONTROL"] &= ~PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS
    vmcs["SECONDARY_VM_EXEC_CONTROL"] = 0xFFFF_FFFF      # would fail allowed-1 if it were read
    vmcs["EPT_POINTER"] = 0                              # EPT is off, so no EPTP checks
    assert run(vmcs, caps) is None


def test_guest_cr0_nw_cd_are_not_checked_but_host_cr0_is():
    caps = dataclasses.replace(MACHINE, cr0_fixed1=MACHINE.cr0_fixed1 & ~(Cr0.NW | Cr0.CD))
    vmcs = example_valid_vmcs(caps)
    vmcs["GUEST_CR0"] |= Cr0.NW | Cr0.CD
    assert run(vmcs, caps) is None
    vmcs["HOST_CR0"] |= Cr0.CD
    assert run(vmcs, caps).check == "host.cr0.fixed1"


def test_guest_rip_checks_bits_63_48_only():
    # SDM 27.3.1.4 checks bits 63:N; a RIP with only bit 47 set enters and faults on the fetch.
    for rip in (NON_CANONICAL, 0xFFFF_8000_0000_0000, 0xFFFF_0000_0000_0000):
        vmcs = example_valid_vmcs()
        vmcs["GUEST_RIP"] = rip
        assert run(vmcs) is None, hex(rip)


def test_injections_allowed_in_hlt_pass():
    for vector, kind in ((0x20, InterruptionType.EXTERNAL_INTERRUPT), (2, InterruptionType.NMI),
                         (ExceptionVector.DB, InterruptionType.HARDWARE_EXCEPTION),
                         (ExceptionVector.MC, InterruptionType.HARDWARE_EXCEPTION)):
        vmcs = example_valid_vmcs()
        vmcs.update(GUEST_ACTIVITY_STATE=int(ActivityState.HLT), GUEST_RFLAGS=0x2 | IF_,
                    VM_ENTRY_INTR_INFO_FIELD=make_interruption_info(vector, kind))
        assert run(vmcs) is None, (vector, kind)


def test_valid_event_injections_pass():
    for info, extra in (
            (make_interruption_info(ExceptionVector.PF, InterruptionType.HARDWARE_EXCEPTION, True),
             {"VM_ENTRY_EXCEPTION_ERROR_CODE": 0xFFFF}),
            (make_interruption_info(ExceptionVector.BP, InterruptionType.SOFTWARE_EXCEPTION),
             {"VM_ENTRY_INSTRUCTION_LEN": 1}),
            (make_interruption_info(0x80, InterruptionType.SOFTWARE_INTERRUPT),
             {"VM_ENTRY_INSTRUCTION_LEN": 15}),
            (make_interruption_info(0x20, InterruptionType.EXTERNAL_INTERRUPT), {"GUEST_RFLAGS": 0x2 | IF_}),
            (make_interruption_info(0x20, InterruptionType.EXTERNAL_INTERRUPT, valid=False), {})):
        vmcs = example_valid_vmcs()
        vmcs.update(VM_ENTRY_INTR_INFO_FIELD=info, **extra)
        assert run(vmcs) is None, hex(info)


# --- 27.1 basic checks ------------------------------------------------------------------------

LAUNCH_STATE_CASES = [
    ("basic.mov_ss_blocking", 0, True, True, 26),
    ("basic.vmlaunch_not_clear", 1, True, False, 4),
    ("basic.vmresume_not_launched", 0, False, False, 5),
]


@pytest.mark.parametrize("check_id,launch_state,launching,mov_ss,error", LAUNCH_STATE_CASES)
def test_launch_state_checks(check_id, launch_state, launching, mov_ss, error):
    failure = checks.check_launch_state(launch_state, launching=launching, blocked_by_mov_ss=mov_ss)
    assert (failure.check, failure.kind, failure.error, failure.sdm) == (check_id, "VMfailValid", error, "27.1")


def test_launch_state_checks_pass():
    assert checks.check_launch_state(0, launching=True) is None
    assert checks.check_launch_state(1, launching=False) is None


# --- Robustness: any VMCS content gives None or a registered failure, never an exception ------

FIELD_NAMES = [field.name for field in FIELDS]
ANY_U64 = st.integers(min_value=0, max_value=U64)


def _assert_well_formed(failure):
    if failure is None:
        return
    registered = checks.CHECKS_BY_ID[failure.check]
    assert failure.kind == registered.kind
    assert failure.sdm == registered.sdm
    if failure.kind == "entry-failure":
        assert failure.exit_reason == 33 and failure.error is None
        assert failure.qualification in (0, 3, 4)
    else:
        assert failure.error in (7, 8) and failure.exit_reason is None


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({name: ANY_U64 for name in FIELD_NAMES}),
       caps_name=st.sampled_from(sorted(ALL_CAPS)), in_ia32e_mode=st.booleans())
def test_random_vmcs_never_raises(values, caps_name, in_ia32e_mode):
    _assert_well_formed(checks.check_vm_entry(values.__getitem__, ALL_CAPS[caps_name], launching=True,
                                              in_ia32e_mode=in_ia32e_mode))


@settings(max_examples=500, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELD_NAMES),
                               st.one_of(ANY_U64, st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 3, U64])),
                               max_size=4),
       caps_name=st.sampled_from(sorted(ALL_CAPS)))
def test_near_valid_vmcs_never_raises(changes, caps_name):
    vmcs = example_valid_vmcs(ALL_CAPS[caps_name])
    vmcs.update(changes)
    failure = run(vmcs, ALL_CAPS[caps_name])
    _assert_well_formed(failure)
    if not changes:
        assert failure is None


@settings(max_examples=200, deadline=None)
@given(pin=ANY_U64, proc=ANY_U64, exit_=ANY_U64, entry=ANY_U64)
def test_adjusted_controls_always_pass_the_allowed_settings(pin, proc, exit_, entry):
    vmcs = example_valid_vmcs()
    vmcs.update(PIN_BASED_VM_EXEC_CONTROL=MACHINE.pin_based.adjust(pin & 0xFFFF_FFFF),
                CPU_BASED_VM_EXEC_CONTROL=MACHINE.primary_processor.adjust(proc & 0xFFFF_FFFF),
                VM_EXIT_CONTROLS=MACHINE.exit.adjust(exit_ & 0xFFFF_FFFF),
                VM_ENTRY_CONTROLS=MACHINE.entry.adjust(entry & 0xFFFF_FFFF))
    failure = run(vmcs)
    assert failure is None or not failure.check.endswith((".allowed0", ".allowed1"))


# --- The capabilities the checks consume --------------------------------------------------------

def test_capability_msrs_cover_0x480_to_0x491():
    values = msr_values()
    assert sorted(values) == list(range(0x480, 0x492))
    basic = values[0x480]
    assert basic & 0x7FFF_FFFF == MACHINE.vmcs_revision_id and not basic & (1 << 31)
    assert (basic >> 32) & 0x1FFF == 4096
    assert (basic >> 50) & 0xF == 6                     # write-back
    assert basic & (1 << 55) and not basic & (1 << 48)


def test_capability_policy():
    values = msr_values()
    assert values[0x48B] & SecondaryProcessorControls.ENABLE_EPT            # EPT must be 1
    assert values[0x48E] & PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS
    assert values[0x48F] & ExitControls.HOST_ADDRESS_SPACE_SIZE
    assert values[0x490] & EntryControls.IA32E_MODE_GUEST
    assert not (values[0x48E] >> 32) & PrimaryProcessorControls.MONITOR_TRAP_FLAG
    assert (values[0x48E] >> 32) & PrimaryProcessorControls.USE_MSR_BITMAPS
    cr3_exiting = PrimaryProcessorControls.CR3_LOAD_EXITING | PrimaryProcessorControls.CR3_STORE_EXITING
    assert (values[0x48E] >> 32) & cr3_exiting == cr3_exiting and not values[0x48E] & cr3_exiting
    assert not (values[0x48B] >> 32) & SecondaryProcessorControls.UNRESTRICTED_GUEST
    assert (values[0x48B] >> 32) & SecondaryProcessorControls.ENABLE_VPID
    assert values[0x486] == Cr0.PE | Cr0.NE | Cr0.PG and values[0x488] == Cr4.VMXE
    misc = values[0x485]
    assert misc & 0x1F == 0 and misc & (1 << 6) and not misc & (3 << 7)   # rate 0; HLT only
    assert (misc >> 16) & 0x1FF == 0                                          # no CR3 targets
    ept = values[0x48C]
    assert ept & (1 << 6) and ept & (1 << 14) and not ept & (1 << 8)        # 4 levels, WB only
    assert ept & (1 << 16) and ept & (1 << 17)                                # 2 MiB, 1 GiB pages
    assert ept & (1 << 25) and ept & (1 << 26) and not ept & (1 << 21)       # INVEPT types; no A/D
    assert values[0x48A] == 0x19 << 1


def test_non_true_control_msrs_report_default1_bits():
    values = msr_values()
    for plain, true, default1 in ((0x481, 0x48D, 0x16), (0x482, 0x48E, 0x0401_E172),
                                  (0x483, 0x48F, 0x0003_6DFF), (0x484, 0x490, 0x0000_11FF)):
        assert values[plain] & 0xFFFF_FFFF == (values[true] & 0xFFFF_FFFF) | default1
        assert values[true] & 0xFFFF_FFFF & ~(values[true] >> 32) == 0       # must-1 may be 1


def test_markdown_tables_list_every_check():
    text = checks.markdown()
    for check in checks.ENTRY_CHECKS + checks.LOAD_CHECKS:
        assert f"| {check.id} | {check.sdm} |" in text


def test_the_reference_lists_the_checks_as_the_module_does():
    reference = (Path(__file__).resolve().parent.parent / "docs" / "vmx-reference.md").read_text()
    begin = "<!-- BEGIN GENERATED: python -m emu.vmentry_checks --markdown -->\n"
    table = reference[reference.index(begin) + len(begin):]
    assert table[:table.index("<!-- END GENERATED -->")] == checks.markdown(), \
        "docs/vmx-reference.md section 4 is stale: paste `python -m emu.vmentry_checks --markdown` there"


NON_TRUE_CONTROL_MSRS = {"PIN_BASED_VM_EXEC_CONTROL": 0x481, "CPU_BASED_VM_EXEC_CONTROL": 0x482,
                         "VM_EXIT_CONTROLS": 0x483, "VM_ENTRY_CONTROLS": 0x484}
CONTROL_MSR_HIGH_SHIFT = 32
CONTROL_MSR_LOW_MASK = 0xFFFF_FFFF


def test_controls_built_from_the_non_true_msrs_pass_the_entry_checks():
    """A VMM that ignores IA32_VMX_BASIC bit 55 adjusts its controls with 0x481-0x484, which report
    every default1 control as must-be-1 (SDM Appendix A.2): the machine must accept the result."""
    values = msr_values()
    vmcs = example_valid_vmcs()
    for name, msr in NON_TRUE_CONTROL_MSRS.items():
        allowed0, allowed1 = values[msr] & CONTROL_MSR_LOW_MASK, values[msr] >> CONTROL_MSR_HIGH_SHIFT
        vmcs[name] = (vmcs[name] | allowed0) & allowed1
    assert vmcs["CPU_BASED_VM_EXEC_CONTROL"] & PrimaryProcessorControls.CR3_LOAD_EXITING
    assert run(vmcs) is None
