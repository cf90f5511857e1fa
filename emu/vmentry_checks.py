"""VM-entry checks on the VMCS: VMX controls, host state and guest state (SDM Vol. 3C 27.1-27.3).

`check_vm_entry` runs the checks in the SDM's order and returns the first failure:
checks on VMX controls (27.2.1) and on the host-state area (27.2.2-27.2.4) fail VMLAUNCH/VMRESUME
with VMfailValid (error 7 or 8); checks on the guest-state area (27.3.1) make the VM entry fail
with a VM exit whose basic reason is 33 and whose exit qualification follows SDM 27.8.
Messages follow Bochs (cpu/vmx.cc): "VMFAIL: ..." and "VMENTER FAIL: ...".
Run `python -m emu.vmentry_checks --markdown` for the table of checks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from emu.vmcs_fields import BY_NAME, LAUNCH_STATE_CLEAR, LAUNCH_STATE_LAUNCHED
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES, ControlCapability, VmxCapabilities
from emu.vmx_defs import (
    U32_MASK, U64_MASK,
    AR_DB, AR_DPL_MASK, AR_DPL_SHIFT, AR_G, AR_L, AR_P, AR_RESERVED_11_8, AR_RESERVED_31_17, AR_S,
    AR_TYPE_MASK, AR_UNUSABLE, DESCRIPTOR_TABLE_LIMIT_MAX, DR7_HIGH_MASK, EPTP_AD_ENABLE,
    EPTP_MEMORY_TYPE_MASK, EPTP_RESERVED_LOW_BITS, EPTP_WALK_LENGTH_MASK, EPTP_WALK_LENGTH_SHIFT,
    EXIT_REASON_VM_ENTRY_FAILURE,
    EXCEPTIONS_WITH_ERROR_CODE, HIGHEST_EXCEPTION_VECTOR, IA32_DEBUGCTL_BTF,
    INTR_INFO_DELIVER_ERROR_CODE, INTR_INFO_ENTRY_RESERVED_BITS, INTR_INFO_VALID,
    INTR_INFO_VECTOR_MASK, LIMIT_HIGH_12_BITS, LIMIT_LOW_12_BITS, MAX_INSTRUCTION_LENGTH,
    PAGE_OFFSET_MASK, PAT_ENTRY_BITS, PAT_ENTRY_COUNT, PAT_VALID_MEMORY_TYPES, PENDING_DBG_BS,
    PENDING_DBG_RTM, RFLAGS_RESERVED_ZERO, SEGMENT_TYPE_ACCESSED, SEGMENT_TYPE_CODE,
    SEGMENT_TYPE_CONFORMING_OR_EXPAND_DOWN, SEGMENT_TYPE_READABLE_OR_WRITABLE, SELECTOR_RPL_MASK,
    SELECTOR_TI, SYSTEM_TYPE_BUSY_TSS, SYSTEM_TYPE_BUSY_TSS16, SYSTEM_TYPE_LDT,
    VMCS_LINK_POINTER_NONE, ActivityState, Cr0, Cr4, Efer, EntryControls,
    EntryFailureQualification, ExceptionVector, ExitControls, ExitReason, Interruptibility,
    InterruptionType, PinBasedControls, PrimaryProcessorControls, Rflags,
    SecondaryProcessorControls, VmInstructionError, bit_names, interruption_type, unnamed_bits,
)

VMFAIL_VALID = "VMfailValid"
ENTRY_FAILURE = "entry-failure"

# Our machine's interruptibility state has no enclave-interruption bit (no SGX): bits 31:4 are
# reserved. Pending debug exceptions: bits 11:4, 13, 15 and 63:17 reserved, and bit 16 (RTM)
# too because our machine has no RTM. See: SDM Vol. 3C 27.3.1.5.
INTERRUPTIBILITY_RESERVED_BITS = U32_MASK & ~int(
    Interruptibility.BLOCKING_BY_STI | Interruptibility.BLOCKING_BY_MOV_SS
    | Interruptibility.BLOCKING_BY_SMI | Interruptibility.BLOCKING_BY_NMI)
PENDING_DBG_RESERVED_BITS = 0xFFFF_FFFF_FFFF_AFF0
# CR0.NW and CR0.CD are never checked in the guest CR0 field. See: SDM Vol. 3C 27.3.1.1.
GUEST_CR0_UNCHECKED = int(Cr0.NW | Cr0.CD)
CR3_TARGET_COUNT_ARCHITECTURAL_MAX = 4

SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS")
HOST_SELECTORS = ("ES", "CS", "SS", "DS", "FS", "GS", "TR")


@dataclass(frozen=True)
class EntryCheck:
    """One VM-entry check: a stable id, the SDM section it follows and the rule it enforces."""

    id: str
    sdm: str
    rule: str
    basic_error: Optional[VmInstructionError] = None   # the error of a 27.1 basic check

    @property
    def stage(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def kind(self) -> str:
        return ENTRY_FAILURE if self.stage == "guest" else VMFAIL_VALID

    @property
    def error(self) -> Optional[VmInstructionError]:
        return {"controls": VmInstructionError.ENTRY_INVALID_CONTROL_FIELD,
                "host": VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD,
                "basic": self.basic_error, "guest": None}[self.stage]


@dataclass(frozen=True)
class EntryCheckFailure:
    """Why VMLAUNCH/VMRESUME did not enter the guest, and what the machine must report.

    kind "VMfailValid": set RFLAGS.ZF and write `error` to VM_INSTRUCTION_ERROR.
    kind "entry-failure": load host state and report `exit_reason` (with bit 31 set, see
    `exit_reason_field`) and `qualification` in the VM-exit information fields (SDM 27.8).
    """

    kind: str
    check: str
    sdm: str
    message: str
    error: Optional[VmInstructionError] = None
    exit_reason: Optional[ExitReason] = None
    qualification: int = 0

    @property
    def exit_reason_field(self) -> Optional[int]:
        """The value of the exit-reason field: basic reason with bit 31 ("VM-entry failure") set."""
        if self.exit_reason is None:
            return None
        return int(self.exit_reason) | EXIT_REASON_VM_ENTRY_FAILURE


# Every check, in the order they run. Ids are stable: tests and documentation refer to them.
ENTRY_CHECKS: tuple[EntryCheck, ...] = (
    # 27.1 basic VM-entry checks (check_launch_state)
    EntryCheck("basic.mov_ss_blocking", "27.1", "events must not be blocked by MOV SS at VM entry",
               VmInstructionError.ENTRY_EVENTS_BLOCKED_BY_MOV_SS),
    EntryCheck("basic.vmlaunch_not_clear", "27.1", "VMLAUNCH requires a clear VMCS",
               VmInstructionError.VMLAUNCH_NONCLEAR_VMCS),
    EntryCheck("basic.vmresume_not_launched", "27.1", "VMRESUME requires a launched VMCS",
               VmInstructionError.VMRESUME_NONLAUNCHED_VMCS),
    # 27.2.1.1 VM-execution control fields
    EntryCheck("controls.pin.allowed0", "27.2.1.1", "pin-based controls: allowed-0 bits must be 1"),
    EntryCheck("controls.pin.allowed1", "27.2.1.1", "pin-based controls: bits outside allowed-1 must be 0"),
    EntryCheck("controls.proc.allowed0", "27.2.1.1",
               "primary processor-based controls: allowed-0 bits must be 1"),
    EntryCheck("controls.proc.allowed1", "27.2.1.1",
               "primary processor-based controls: bits outside allowed-1 must be 0"),
    EntryCheck("controls.proc2.allowed0", "27.2.1.1",
               "secondary controls (if activated): allowed-0 bits must be 1"),
    EntryCheck("controls.proc2.allowed1", "27.2.1.1",
               "secondary controls (if activated): bits outside allowed-1 must be 0"),
    EntryCheck("controls.cr3_target_count", "27.2.1.1",
               "CR3-target count must not exceed the count in IA32_VMX_MISC"),
    EntryCheck("controls.io_bitmap", "27.2.1.1",
               "with use I/O bitmaps: I/O-bitmap A and B addresses 4 KiB aligned, below 2^MAXPHYADDR"),
    EntryCheck("controls.msr_bitmap", "27.2.1.1",
               "with use MSR bitmaps: MSR-bitmap address 4 KiB aligned, below 2^MAXPHYADDR"),
    EntryCheck("controls.virtual_nmis", "27.2.1.1", "virtual NMIs requires NMI exiting"),
    EntryCheck("controls.nmi_window", "27.2.1.1", "NMI-window exiting requires virtual NMIs"),
    EntryCheck("controls.vpid", "27.2.1.1", "with enable VPID: VPID must not be 0"),
    EntryCheck("controls.ept.memory_type", "27.2.1.1",
               "EPTP memory type (bits 2:0) must be one IA32_VMX_EPT_VPID_CAP reports (UC or WB)"),
    EntryCheck("controls.ept.walk_length", "27.2.1.1",
               "EPTP bits 5:3 must be a supported page-walk length minus 1 (3 = 4 levels)"),
    EntryCheck("controls.ept.accessed_dirty", "27.2.1.1",
               "EPTP bit 6 (A/D enable) must be 0 unless EPT A/D flags are supported"),
    EntryCheck("controls.ept.reserved", "27.2.1.1",
               "EPTP bits 11:7 and bits 63:MAXPHYADDR must be 0"),
    EntryCheck("controls.unrestricted_guest", "27.2.1.1", "unrestricted guest requires enable EPT"),
    # 27.2.1.2 VM-exit control fields
    EntryCheck("controls.exit.allowed0", "27.2.1.2", "VM-exit controls: allowed-0 bits must be 1"),
    EntryCheck("controls.exit.allowed1", "27.2.1.2",
               "VM-exit controls: bits outside allowed-1 must be 0"),
    EntryCheck("controls.exit.preemption_timer", "27.2.1.2",
               "save VMX-preemption timer value requires activate VMX-preemption timer"),
    EntryCheck("controls.exit.msr_store_count", "27.2.1.2",
               "VM-exit MSR-store count at most the recommended maximum of IA32_VMX_MISC (machine policy)"),
    EntryCheck("controls.exit.msr_store_address", "27.2.1.2",
               "VM-exit MSR-store address: bits 3:0 zero, first and last byte below 2^MAXPHYADDR"),
    EntryCheck("controls.exit.msr_load_count", "27.2.1.2",
               "VM-exit MSR-load count at most the recommended maximum of IA32_VMX_MISC (machine policy)"),
    EntryCheck("controls.exit.msr_load_address", "27.2.1.2",
               "VM-exit MSR-load address: bits 3:0 zero, first and last byte below 2^MAXPHYADDR"),
    # 27.2.1.3 VM-entry control fields
    EntryCheck("controls.entry.allowed0", "27.2.1.3", "VM-entry controls: allowed-0 bits must be 1"),
    EntryCheck("controls.entry.allowed1", "27.2.1.3",
               "VM-entry controls: bits outside allowed-1 must be 0"),
    EntryCheck("controls.event.type", "27.2.1.3",
               "injected event type must not be 1 (reserved), nor 7 without monitor trap flag support"),
    EntryCheck("controls.event.vector", "27.2.1.3",
               "injected NMI has vector 2, hardware exception vector <= 31, other event vector 0"),
    EntryCheck("controls.event.deliver_error_code", "27.2.1.3",
               "deliver-error-code = 1 exactly for hardware exceptions 8, 10-14, 17 in protected mode"),
    EntryCheck("controls.event.reserved", "27.2.1.3",
               "VM-entry interruption-information bits 30:12 must be 0"),
    EntryCheck("controls.event.error_code", "27.2.1.3",
               "when delivering an error code: error-code bits 31:16 must be 0"),
    EntryCheck("controls.event.instruction_length", "27.2.1.3",
               "software interrupt/exception injection: instruction length 1-15 (0 only if "
               "IA32_VMX_MISC[30])"),
    EntryCheck("controls.entry.msr_load_count", "27.2.1.3",
               "VM-entry MSR-load count at most the recommended maximum of IA32_VMX_MISC (machine policy)"),
    EntryCheck("controls.entry.msr_load_address", "27.2.1.3",
               "VM-entry MSR-load address: bits 3:0 zero, first and last byte below 2^MAXPHYADDR"),
    # 27.2.2 host control registers and MSRs
    EntryCheck("host.cr0.fixed0", "27.2.2", "host CR0: IA32_VMX_CR0_FIXED0 bits must be 1"),
    EntryCheck("host.cr0.fixed1", "27.2.2", "host CR0: bits clear in IA32_VMX_CR0_FIXED1 must be 0"),
    EntryCheck("host.cr4.fixed0", "27.2.2", "host CR4: IA32_VMX_CR4_FIXED0 bits must be 1"),
    EntryCheck("host.cr4.fixed1", "27.2.2", "host CR4: bits clear in IA32_VMX_CR4_FIXED1 must be 0"),
    EntryCheck("host.cr3", "27.2.2", "host CR3: bits 63:MAXPHYADDR must be 0"),
    EntryCheck("host.sysenter.canonical", "27.2.2",
               "host IA32_SYSENTER_ESP and IA32_SYSENTER_EIP must be canonical"),
    EntryCheck("host.pat", "27.2.2",
               "with load IA32_PAT: each PAT byte must be 0, 1, 4, 5, 6 or 7"),
    EntryCheck("host.efer.reserved", "27.2.2", "with load IA32_EFER: reserved EFER bits must be 0"),
    EntryCheck("host.efer.lma_lme", "27.2.2",
               "with load IA32_EFER: EFER.LMA and EFER.LME must equal host address-space size"),
    # 27.2.3 host segment and descriptor-table registers
    EntryCheck("host.selector.rpl_ti", "27.2.3",
               "host ES, CS, SS, DS, FS, GS, TR selectors: RPL and TI must be 0"),
    EntryCheck("host.cs.null", "27.2.3", "host CS selector must not be 0"),
    EntryCheck("host.tr.null", "27.2.3", "host TR selector must not be 0"),
    EntryCheck("host.ss.null", "27.2.3", "host SS selector must not be 0 if host address-space size is 0"),
    EntryCheck("host.base.canonical", "27.2.3",
               "host FS, GS, GDTR, IDTR and TR bases must be canonical"),
    # 27.2.4 checks related to address-space size
    EntryCheck("host.address_space.ia32e", "27.2.4",
               "VM entry from IA-32e mode requires host address-space size = 1"),
    EntryCheck("host.address_space.legacy", "27.2.4",
               "VM entry from outside IA-32e mode requires host address-space size = 0 and "
               "IA-32e mode guest = 0"),
    EntryCheck("host.cr4.pcide", "27.2.4", "host address-space size = 0 requires host CR4.PCIDE = 0"),
    EntryCheck("host.rip.high", "27.2.4",
               "host address-space size = 0 requires host RIP bits 63:32 = 0"),
    EntryCheck("host.cr4.pae", "27.2.4", "host address-space size = 1 requires host CR4.PAE = 1"),
    EntryCheck("host.rip.canonical", "27.2.4",
               "host address-space size = 1 requires a canonical host RIP"),
    # 27.3.1.1 guest control registers, debug registers and MSRs
    EntryCheck("guest.cr0.fixed0", "27.3.1.1",
               "guest CR0: IA32_VMX_CR0_FIXED0 bits must be 1 (PE, PG exempt with unrestricted guest)"),
    EntryCheck("guest.cr0.fixed1", "27.3.1.1",
               "guest CR0: bits clear in IA32_VMX_CR0_FIXED1 must be 0 (NW, CD not checked)"),
    EntryCheck("guest.cr0.pg_without_pe", "27.3.1.1", "guest CR0.PG = 1 requires CR0.PE = 1"),
    EntryCheck("guest.cr4.fixed0", "27.3.1.1", "guest CR4: IA32_VMX_CR4_FIXED0 bits must be 1"),
    EntryCheck("guest.cr4.fixed1", "27.3.1.1", "guest CR4: bits clear in IA32_VMX_CR4_FIXED1 must be 0"),
    EntryCheck("guest.ia32e.cr0_pg", "27.3.1.1", "IA-32e mode guest requires guest CR0.PG = 1"),
    EntryCheck("guest.ia32e.cr4_pae", "27.3.1.1", "IA-32e mode guest requires guest CR4.PAE = 1"),
    EntryCheck("guest.cr4.pcide", "27.3.1.1", "guest outside IA-32e mode requires CR4.PCIDE = 0"),
    EntryCheck("guest.cr3", "27.3.1.1", "guest CR3: bits 63:MAXPHYADDR must be 0"),
    EntryCheck("guest.dr7", "27.3.1.1", "with load debug controls: guest DR7 bits 63:32 must be 0"),
    EntryCheck("guest.sysenter.canonical", "27.3.1.1",
               "guest IA32_SYSENTER_ESP and IA32_SYSENTER_EIP must be canonical"),
    EntryCheck("guest.pat", "27.3.1.1", "with load IA32_PAT: each PAT byte must be 0, 1, 4, 5, 6 or 7"),
    EntryCheck("guest.efer.reserved", "27.3.1.1", "with load IA32_EFER: reserved EFER bits must be 0"),
    EntryCheck("guest.efer.lma", "27.3.1.1",
               "with load IA32_EFER: EFER.LMA must equal IA-32e mode guest"),
    EntryCheck("guest.efer.lme", "27.3.1.1",
               "with load IA32_EFER and CR0.PG = 1: EFER.LME must equal EFER.LMA"),
    # 27.3.1.2 guest segment registers
    EntryCheck("guest.tr.ti", "27.3.1.2", "guest TR selector: TI must be 0"),
    EntryCheck("guest.ldtr.ti", "27.3.1.2", "usable guest LDTR: selector TI must be 0"),
    EntryCheck("guest.ss.rpl", "27.3.1.2",
               "guest SS.RPL must equal CS.RPL (unless unrestricted guest)"),
    EntryCheck("guest.base.canonical", "27.3.1.2",
               "guest TR, FS, GS (and usable LDTR) bases must be canonical"),
    EntryCheck("guest.base.high", "27.3.1.2",
               "guest CS (and usable SS, DS, ES) base bits 63:32 must be 0"),
    EntryCheck("guest.cs.type", "27.3.1.2",
               "guest CS type must be 9, 11, 13 or 15 (accessed code; 3 with unrestricted guest)"),
    EntryCheck("guest.ss.type", "27.3.1.2", "usable guest SS type must be 3 or 7 (accessed read/write data)"),
    EntryCheck("guest.seg.type", "27.3.1.2",
               "usable guest DS, ES, FS, GS: accessed type, and readable if code"),
    EntryCheck("guest.seg.s", "27.3.1.2", "guest CS and usable SS, DS, ES, FS, GS: S must be 1"),
    EntryCheck("guest.cs.dpl", "27.3.1.2",
               "guest CS.DPL: = SS.DPL (non-conforming), <= SS.DPL (conforming), 0 (type 3)"),
    EntryCheck("guest.ss.dpl", "27.3.1.2",
               "guest SS.DPL must equal SS.RPL (unless unrestricted guest); 0 if CS type 3 or PE = 0"),
    EntryCheck("guest.seg.dpl", "27.3.1.2",
               "usable guest DS, ES, FS, GS data/non-conforming code: DPL >= RPL (unless "
               "unrestricted guest)"),
    EntryCheck("guest.seg.present", "27.3.1.2", "guest CS and usable SS, DS, ES, FS, GS: P must be 1"),
    EntryCheck("guest.seg.reserved", "27.3.1.2",
               "guest CS and usable SS, DS, ES, FS, GS: access-rights bits 11:8 and 31:17 must be 0"),
    EntryCheck("guest.cs.l_db", "27.3.1.2", "IA-32e mode guest with CS.L = 1 requires CS.D/B = 0"),
    EntryCheck("guest.seg.granularity", "27.3.1.2",
               "guest CS and usable SS, DS, ES, FS, GS: G consistent with the limit"),
    EntryCheck("guest.tr.type", "27.3.1.2",
               "guest TR type must be 11 (busy 64-bit TSS) in IA-32e mode, else 3 or 11"),
    EntryCheck("guest.tr.s", "27.3.1.2", "guest TR: S must be 0"),
    EntryCheck("guest.tr.present", "27.3.1.2", "guest TR: P must be 1"),
    EntryCheck("guest.tr.reserved", "27.3.1.2", "guest TR: access-rights bits 11:8 and 31:17 must be 0"),
    EntryCheck("guest.tr.granularity", "27.3.1.2", "guest TR: G consistent with the limit"),
    EntryCheck("guest.tr.unusable", "27.3.1.2", "guest TR must be usable"),
    EntryCheck("guest.ldtr.type", "27.3.1.2", "usable guest LDTR type must be 2 (LDT)"),
    EntryCheck("guest.ldtr.s", "27.3.1.2", "usable guest LDTR: S must be 0"),
    EntryCheck("guest.ldtr.present", "27.3.1.2", "usable guest LDTR: P must be 1"),
    EntryCheck("guest.ldtr.reserved", "27.3.1.2",
               "usable guest LDTR: access-rights bits 11:8 and 31:17 must be 0"),
    EntryCheck("guest.ldtr.granularity", "27.3.1.2", "usable guest LDTR: G consistent with the limit"),
    # 27.3.1.3 guest descriptor-table registers
    EntryCheck("guest.gdtr.base", "27.3.1.3", "guest GDTR base must be canonical"),
    EntryCheck("guest.idtr.base", "27.3.1.3", "guest IDTR base must be canonical"),
    EntryCheck("guest.gdtr.limit", "27.3.1.3", "guest GDTR limit bits 31:16 must be 0"),
    EntryCheck("guest.idtr.limit", "27.3.1.3", "guest IDTR limit bits 31:16 must be 0"),
    # 27.3.1.4 guest RIP and RFLAGS
    EntryCheck("guest.rip.high", "27.3.1.4",
               "guest RIP bits 63:32 must be 0 unless IA-32e mode guest with CS.L = 1"),
    EntryCheck("guest.rip.linear_width", "27.3.1.4",
               "IA-32e mode guest with CS.L = 1: guest RIP bits 63:N (N = linear-address width, 48) "
               "must be identical"),
    EntryCheck("guest.rflags.reserved", "27.3.1.4", "guest RFLAGS bits 63:22, 15, 5, 3 must be 0"),
    EntryCheck("guest.rflags.bit1", "27.3.1.4", "guest RFLAGS bit 1 must be 1"),
    EntryCheck("guest.rflags.vm", "27.3.1.4",
               "guest RFLAGS.VM must be 0 in an IA-32e mode guest or with CR0.PE = 0"),
    EntryCheck("guest.rflags.if", "27.3.1.4",
               "injecting an external interrupt requires guest RFLAGS.IF = 1"),
    # 27.3.1.5 guest non-register state
    EntryCheck("guest.activity.valid", "27.3.1.5", "activity state must be 0-3"),
    EntryCheck("guest.activity.supported", "27.3.1.5",
               "activity state must be one IA32_VMX_MISC reports (active, HLT)"),
    EntryCheck("guest.activity.hlt_dpl", "27.3.1.5", "HLT activity state requires SS.DPL = 0"),
    EntryCheck("guest.activity.blocking", "27.3.1.5",
               "blocking by STI or MOV SS requires the active state"),
    EntryCheck("guest.activity.injection", "27.3.1.5",
               "an injected event must not be one the activity state blocks"),
    EntryCheck("guest.interruptibility.reserved", "27.3.1.5",
               "interruptibility-state bits 31:4 must be 0"),
    EntryCheck("guest.interruptibility.sti_and_mov_ss", "27.3.1.5",
               "blocking by STI and by MOV SS cannot both be 1"),
    EntryCheck("guest.interruptibility.sti_without_if", "27.3.1.5",
               "blocking by STI requires RFLAGS.IF = 1"),
    EntryCheck("guest.interruptibility.external_interrupt", "27.3.1.5",
               "injecting an external interrupt requires no blocking by STI or MOV SS"),
    EntryCheck("guest.interruptibility.nmi_mov_ss", "27.3.1.5",
               "injecting an NMI requires no blocking by MOV SS"),
    EntryCheck("guest.interruptibility.nmi_sti", "27.3.1.5",
               "injecting an NMI requires no blocking by STI (implementation-specific; "
               "qualification 3)"),
    EntryCheck("guest.interruptibility.smi", "27.3.1.5",
               "blocking by SMI must be 0 outside SMM (our machine has no SMM)"),
    EntryCheck("guest.interruptibility.virtual_nmi", "27.3.1.5",
               "with virtual NMIs, injecting an NMI requires no blocking by NMI"),
    EntryCheck("guest.pending_dbg.reserved", "27.3.1.5",
               "pending debug exceptions bits 11:4, 13, 15, 63:16 must be 0"),
    EntryCheck("guest.pending_dbg.bs", "27.3.1.5",
               "with STI/MOV SS blocking or HLT: BS = 1 iff RFLAGS.TF = 1 and DEBUGCTL.BTF = 0"),
    EntryCheck("guest.vmcs_link_pointer", "27.3.1.5",
               "VMCS link pointer must be 0xFFFFFFFFFFFFFFFF (no VMCS shadowing; qualification 4)"),
)

CHECKS_BY_ID: dict[str, EntryCheck] = {check.id: check for check in ENTRY_CHECKS}
assert len(CHECKS_BY_ID) == len(ENTRY_CHECKS), "duplicate entry-check id"

# Checks this machine makes while it loads guest state into the guest's instance (SDM 27.3.2), after
# the checks above passed: the SDM has no such checks. Unicorn loads the FS and GS selectors through
# their descriptors in guest memory (emu/segment_load.py), where the SDM loads the hidden part of
# every segment register from the VMCS; docs/machine.md 7.7.4 and 10.2.
GUEST_FS_GS_DESCRIPTOR_TRANSLATES = "guest.fs_gs.descriptor_translates"
GUEST_FS_GS_DESCRIPTOR_LOADABLE = "guest.fs_gs.descriptor_loadable"
LOAD_CHECKS: tuple[EntryCheck, ...] = (
    EntryCheck(GUEST_FS_GS_DESCRIPTOR_LOADABLE, "27.3.2",
               "machine-specific: a non-null guest FS or GS selector must select a descriptor within the "
               "guest's GDT (LDT if TI = 1) that MOV to FS/GS at CPL 0 loads: S = 1, readable if code, "
               "DPL >= RPL unless conforming code, P = 1"),
    EntryCheck(GUEST_FS_GS_DESCRIPTOR_TRANSLATES, "27.3.2",
               "machine-specific: that descriptor's 8 bytes must translate for reading through the guest's "
               "paging and EPT, and its high dword for writing too if its accessed bit is 0"),
)
LOAD_CHECKS_BY_ID: dict[str, EntryCheck] = {check.id: check for check in LOAD_CHECKS}
assert not set(LOAD_CHECKS_BY_ID) & set(CHECKS_BY_ID), "duplicate entry-check id"

_GUEST_DEFAULT_QUALIFICATION = {
    "guest.interruptibility.nmi_sti": EntryFailureQualification.NMI_INJECTION_BLOCKED_BY_STI,
    "guest.vmcs_link_pointer": EntryFailureQualification.VMCS_LINK_POINTER,
}


def make_failure(check_id: str, message: str) -> EntryCheckFailure:
    """The failure for check `check_id`: VMfailValid error or VM-entry failure per its stage."""
    check = CHECKS_BY_ID.get(check_id) or LOAD_CHECKS_BY_ID[check_id]
    if check.kind == ENTRY_FAILURE:
        qualification = _GUEST_DEFAULT_QUALIFICATION.get(check_id, EntryFailureQualification.DEFAULT)
        return EntryCheckFailure(kind=ENTRY_FAILURE, check=check_id, sdm=check.sdm, message=message,
                                 exit_reason=ExitReason.INVALID_GUEST_STATE,
                                 qualification=int(qualification))
    return EntryCheckFailure(kind=VMFAIL_VALID, check=check_id, sdm=check.sdm, message=message,
                             error=check.error)


# --- Helpers ----------------------------------------------------------------------------------

def is_canonical(address: int, linear_address_width: int) -> bool:
    """Bits 63:(width-1) all equal. See: SDM Vol. 1 3.3.7.1."""
    top = address >> (linear_address_width - 1)
    return top == 0 or top == (U64_MASK >> (linear_address_width - 1))


def fits_physical_address(address: int, caps: VmxCapabilities) -> bool:
    return address >> caps.maxphyaddr == 0


def is_valid_pat(pat: int) -> bool:
    """Each of the 8 PAT bytes holds a valid memory type. See: SDM Vol. 3C 27.2.2, 27.3.1.1."""
    return all((pat >> (entry * PAT_ENTRY_BITS)) & 0xFF in PAT_VALID_MEMORY_TYPES
               for entry in range(PAT_ENTRY_COUNT))


def _named_bits(mask: int, flags, reserved_label: str = "reserved") -> str:
    names = bit_names(mask, flags)
    unnamed = unnamed_bits(mask, flags)
    if unnamed:
        names = f"{names} {reserved_label} 0x{unnamed:x}".strip()
    return names


@dataclass(frozen=True)
class Segment:
    """A guest segment register as the VMCS holds it (selector, base, limit, access rights)."""

    name: str
    selector: int
    base: int
    limit: int
    access_rights: int

    @property
    def usable(self) -> bool:
        return not self.access_rights & AR_UNUSABLE

    @property
    def type(self) -> int:
        return self.access_rights & AR_TYPE_MASK

    @property
    def dpl(self) -> int:
        return (self.access_rights & AR_DPL_MASK) >> AR_DPL_SHIFT

    @property
    def rpl(self) -> int:
        return self.selector & SELECTOR_RPL_MASK

    def granularity_consistent(self) -> bool:
        """G = 0 if any of limit[11:0] is 0; G = 1 if any of limit[31:20] is 1."""
        if self.access_rights & AR_G:
            return self.limit & LIMIT_LOW_12_BITS == LIMIT_LOW_12_BITS
        return self.limit & LIMIT_HIGH_12_BITS == 0


class EntryState:
    """The VMCS as the checks see it: values read once, masked to their width, plus derived facts."""

    def __init__(self, read: Callable[[str], int], caps: VmxCapabilities, in_ia32e_mode: bool):
        self._read = read
        self._values: dict[str, int] = {}
        self._segments: dict[str, Segment] = {}
        self.caps = caps
        self.in_ia32e_mode = in_ia32e_mode
        self.pin = self["PIN_BASED_VM_EXEC_CONTROL"]
        self.proc = self["CPU_BASED_VM_EXEC_CONTROL"]
        self.secondary_active = bool(self.proc & PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS)
        # See: SDM 25.6.2 (secondary controls act as 0 when not activated).
        self.proc2 = self["SECONDARY_VM_EXEC_CONTROL"] if self.secondary_active else 0
        self.exit = self["VM_EXIT_CONTROLS"]
        self.entry = self["VM_ENTRY_CONTROLS"]
        self.host_64 = bool(self.exit & ExitControls.HOST_ADDRESS_SPACE_SIZE)
        self.ia32e_guest = bool(self.entry & EntryControls.IA32E_MODE_GUEST)
        self.unrestricted = bool(self.proc2 & SecondaryProcessorControls.UNRESTRICTED_GUEST)
        self.event = self["VM_ENTRY_INTR_INFO_FIELD"]
        self.injecting = bool(self.event & INTR_INFO_VALID)
        self.event_type = interruption_type(self.event)
        self.event_vector = self.event & INTR_INFO_VECTOR_MASK

    def __getitem__(self, name: str) -> int:
        value = self._values.get(name)
        if value is None:
            value = self._values[name] = int(self._read(name)) & BY_NAME[name].mask
        return value

    def canonical(self, address: int) -> bool:
        return is_canonical(address, self.caps.linear_address_width)

    def segment(self, name: str) -> Segment:
        segment = self._segments.get(name)
        if segment is None:
            segment = self._segments[name] = Segment(
                name, self[f"GUEST_{name}_SELECTOR"], self[f"GUEST_{name}_BASE"],
                self[f"GUEST_{name}_LIMIT"], self[f"GUEST_{name}_AR_BYTES"])
        return segment

    def injecting_type(self, event_type: InterruptionType) -> bool:
        return self.injecting and self.event_type == event_type


CheckResult = Optional[EntryCheckFailure]
_CTRL = "VMFAIL: VMCS EXEC CTRL:"
_HOST = "VMFAIL: VMCS host state invalid"
_GUEST = "VMENTER FAIL: VMCS guest state invalid"


def guest_state_message(detail: str) -> str:
    """The message of a failed guest-state check: the common prefix, then what failed and why."""
    return f"{_GUEST} {detail}"


# --- 27.1 Basic VM-entry checks ---------------------------------------------------------------

def check_launch_state(launch_state: int, *, launching: bool,
                       blocked_by_mov_ss: bool = False) -> CheckResult:
    """Checks the caller runs before `check_vm_entry`: MOV-SS blocking and the VMCS launch state.

    `launch_state` is the word at VMCS_LAUNCH_STATE_OFFSET of the current VMCS region.
    See: SDM Vol. 3C 27.1 (VMfailValid 26, 4 or 5).
    """
    if blocked_by_mov_ss:
        return make_failure("basic.mov_ss_blocking", "VMFAIL: VM entry with events blocked by MOV SS")
    if launching and launch_state != LAUNCH_STATE_CLEAR:
        return make_failure("basic.vmlaunch_not_clear",
                            f"VMFAIL: VMLAUNCH with non-clear VMCS (launch state {launch_state}; "
                            "use VMRESUME, or VMCLEAR and VMPTRLD it first)")
    if not launching and launch_state != LAUNCH_STATE_LAUNCHED:
        return make_failure("basic.vmresume_not_launched",
                            f"VMFAIL: VMRESUME with non-launched VMCS (launch state {launch_state}; "
                            "use VMLAUNCH first)")
    return None


# --- 27.2.1.1 VM-execution control fields -----------------------------------------------------

def _check_allowed_settings(prefix: str, label: str, value: int, capability: ControlCapability,
                            flags) -> CheckResult:
    missing = capability.missing_ones(value)
    if missing:
        return make_failure(f"{prefix}.allowed0",
                            f"{_CTRL} {label} controls 0x{value:08x} (bits 0x{capability.must_be_one:08x} "
                            f"must be 1; missing 0x{missing:08x}: "
                            f"{_named_bits(missing, flags, 'reserved default1')})")
    forbidden = capability.forbidden_ones(value)
    if forbidden:
        return make_failure(f"{prefix}.allowed1",
                            f"{_CTRL} {label} controls 0x{value:08x} (bits 0x{forbidden:08x} not "
                            f"supported, must be 0: {_named_bits(forbidden, flags)})")
    return None


def check_pin_based_controls(v: EntryState) -> CheckResult:
    return _check_allowed_settings("controls.pin", "pin-based", v.pin, v.caps.pin_based,
                                   PinBasedControls)


def check_primary_processor_controls(v: EntryState) -> CheckResult:
    return _check_allowed_settings("controls.proc", "primary processor-based", v.proc,
                                   v.caps.primary_processor, PrimaryProcessorControls)


def check_secondary_processor_controls(v: EntryState) -> CheckResult:
    if not v.secondary_active:
        return None
    return _check_allowed_settings("controls.proc2", "secondary processor-based", v.proc2,
                                   v.caps.secondary_processor, SecondaryProcessorControls)


def check_cr3_target_count(v: EntryState) -> CheckResult:
    count = v["CR3_TARGET_COUNT"]
    limit = min(v.caps.cr3_target_count, CR3_TARGET_COUNT_ARCHITECTURAL_MAX)
    if count > limit:
        return make_failure("controls.cr3_target_count",
                            f"{_CTRL} too many CR3 targets {count} (at most {limit})")
    return None


def _page_address_problem(address: int, caps: VmxCapabilities) -> Optional[str]:
    if address & PAGE_OFFSET_MASK:
        return "not 4 KiB aligned"
    if not fits_physical_address(address, caps):
        return f"beyond MAXPHYADDR {caps.maxphyaddr}"
    return None


def check_io_bitmaps(v: EntryState) -> CheckResult:
    if not v.proc & PrimaryProcessorControls.USE_IO_BITMAPS:
        return None
    for name in ("IO_BITMAP_A", "IO_BITMAP_B"):
        problem = _page_address_problem(v[name], v.caps)
        if problem:
            return make_failure("controls.io_bitmap",
                                f"{_CTRL} {name} address 0x{v[name]:x} malformed ({problem})")
    return None


def check_msr_bitmap(v: EntryState) -> CheckResult:
    if not v.proc & PrimaryProcessorControls.USE_MSR_BITMAPS:
        return None
    problem = _page_address_problem(v["MSR_BITMAP"], v.caps)
    if problem:
        return make_failure("controls.msr_bitmap",
                            f"{_CTRL} MSR_BITMAP address 0x{v['MSR_BITMAP']:x} malformed ({problem})")
    return None


def check_nmi_controls(v: EntryState) -> CheckResult:
    virtual_nmis = bool(v.pin & PinBasedControls.VIRTUAL_NMIS)
    if virtual_nmis and not v.pin & PinBasedControls.NMI_EXITING:
        return make_failure("controls.virtual_nmis",
                            f"{_CTRL} misconfigured virtual NMI control (virtual NMIs requires NMI exiting)")
    if not virtual_nmis and v.proc & PrimaryProcessorControls.NMI_WINDOW_EXITING:
        return make_failure("controls.nmi_window",
                            f"{_CTRL} misconfigured virtual NMI control (NMI-window exiting requires "
                            "virtual NMIs)")
    return None


def check_ept_pointer(v: EntryState) -> CheckResult:
    if not v.proc2 & SecondaryProcessorControls.ENABLE_EPT:
        return None
    eptp = v["EPT_POINTER"]
    memory_type = eptp & EPTP_MEMORY_TYPE_MASK
    if memory_type not in {int(t) for t in v.caps.ept_memory_types}:
        supported = " or ".join(f"{t.name} ({int(t)})" for t in sorted(v.caps.ept_memory_types))
        return make_failure("controls.ept.memory_type",
                            f"{_CTRL} invalid EPTPTR 0x{eptp:x} (memory type {memory_type}; must be "
                            f"{supported})")
    walk_length = ((eptp & EPTP_WALK_LENGTH_MASK) >> EPTP_WALK_LENGTH_SHIFT) + 1
    if walk_length not in v.caps.ept_walk_lengths:
        return make_failure("controls.ept.walk_length",
                            f"{_CTRL} invalid EPTPTR 0x{eptp:x} (page-walk length {walk_length}; bits 5:3 "
                            f"must be {min(v.caps.ept_walk_lengths) - 1} for a "
                            f"{min(v.caps.ept_walk_lengths)}-level walk)")
    if eptp & EPTP_AD_ENABLE and not v.caps.ept_accessed_dirty:
        return make_failure("controls.ept.accessed_dirty",
                            f"{_CTRL} invalid EPTPTR 0x{eptp:x} (bit 6 enables EPT accessed/dirty flags, "
                            "which this machine does not support)")
    reserved = (eptp & EPTP_RESERVED_LOW_BITS) | (eptp & ~v.caps.physical_address_mask)
    if reserved:
        return make_failure("controls.ept.reserved",
                            f"{_CTRL} invalid EPTPTR 0x{eptp:x} (reserved bits 0x{reserved:x} set: bits 11:7 "
                            f"and 63:{v.caps.maxphyaddr} must be 0)")
    return None


def check_unrestricted_guest(v: EntryState) -> CheckResult:
    if v.unrestricted and not v.proc2 & SecondaryProcessorControls.ENABLE_EPT:
        return make_failure("controls.unrestricted_guest", f"{_CTRL} unrestricted guest without EPT")
    return None


def check_vpid(v: EntryState) -> CheckResult:
    if v.proc2 & SecondaryProcessorControls.ENABLE_VPID and v["VIRTUAL_PROCESSOR_ID"] == 0:
        return make_failure("controls.vpid", f"{_CTRL} guest VPID == 0 (VPID 0 belongs to the host)")
    return None


# --- 27.2.1.2 VM-exit control fields ----------------------------------------------------------

def check_exit_controls(v: EntryState) -> CheckResult:
    return _check_allowed_settings("controls.exit", "VM-exit", v.exit, v.caps.exit, ExitControls)


def check_preemption_timer_save(v: EntryState) -> CheckResult:
    if (v.exit & ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE
            and not v.pin & PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER):
        return make_failure("controls.exit.preemption_timer",
                            f"{_CTRL} save VMX-preemption timer value is set but activate "
                            "VMX-preemption timer is clear")
    return None


def check_exit_msr_lists(v: EntryState) -> CheckResult:
    for kind in ("STORE", "LOAD"):
        failure = _msr_list_failure(v, f"VM_EXIT_MSR_{kind}_COUNT", f"VM_EXIT_MSR_{kind}_ADDR",
                                    f"controls.exit.msr_{kind.lower()}")
        if failure is not None:
            return failure
    return None


# --- 27.2.1.3 VM-entry control fields ---------------------------------------------------------

def check_entry_controls(v: EntryState) -> CheckResult:
    return _check_allowed_settings("controls.entry", "VM-entry", v.entry, v.caps.entry, EntryControls)


def check_event_injection(v: EntryState) -> CheckResult:
    if not v.injecting:
        return None
    info, kind, vector = v.event, v.event_type, v.event_vector
    where = f"VMENTRY interruption info 0x{info:08x}"
    if kind == InterruptionType.RESERVED or (kind == InterruptionType.OTHER_EVENT
                                             and not v.caps.monitor_trap_flag):
        return make_failure("controls.event.type", f"VMFAIL: {where}: bad injected event type {int(kind)}")
    if ((kind == InterruptionType.NMI and vector != ExceptionVector.NMI)
            or (kind == InterruptionType.HARDWARE_EXCEPTION and vector > HIGHEST_EXCEPTION_VECTOR)
            or (kind == InterruptionType.OTHER_EVENT and vector != 0)):
        return make_failure("controls.event.vector",
                            f"VMFAIL: {where}: bad injected event vector {vector} for type {kind.name}")
    protected_mode = not v.unrestricted or bool(v["GUEST_CR0"] & Cr0.PE)
    should_deliver = (kind == InterruptionType.HARDWARE_EXCEPTION and protected_mode
                      and vector in EXCEPTIONS_WITH_ERROR_CODE)
    delivers = bool(info & INTR_INFO_DELIVER_ERROR_CODE)
    if delivers != should_deliver:
        return make_failure("controls.event.deliver_error_code",
                            f"VMFAIL: {where}: injected event vector {vector} broken error code "
                            f"(deliver-error-code bit 11 must be {int(should_deliver)})")
    if info & INTR_INFO_ENTRY_RESERVED_BITS:
        return make_failure("controls.event.reserved",
                            f"VMFAIL: {where}: broken interruption info field (bits 30:12 must be 0)")
    error_code = v["VM_ENTRY_EXCEPTION_ERROR_CODE"]
    if delivers and error_code >> 16:
        return make_failure("controls.event.error_code",
                            f"VMFAIL: {where}: bad error code 0x{error_code:08x} for injected event "
                            f"{vector} (bits 31:16 must be 0)")
    if kind in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
                InterruptionType.SOFTWARE_EXCEPTION):
        length = v["VM_ENTRY_INSTRUCTION_LEN"]
        minimum = 0 if v.caps.zero_length_instruction_injection else 1
        if not minimum <= length <= MAX_INSTRUCTION_LENGTH:
            return make_failure("controls.event.instruction_length",
                                f"VMFAIL: {where}: bad injected event instr length {length} (must be "
                                f"{minimum}-{MAX_INSTRUCTION_LENGTH})")
    return None


MSR_LIST_ENTRY_SIZE = 16            # SDM Vol. 3C 25.7.2, Table 25-15
MSR_LIST_ALIGNMENT_MASK = 0xF


def _msr_list_failure(v: EntryState, count_field: str, address_field: str, check_prefix: str) -> CheckResult:
    """An MSR list's count and address (SDM Vol. 3C 27.2.1.2, 27.2.1.3): the count at most the
    recommended maximum (machine policy), the address 16-byte aligned with the whole list below
    2^MAXPHYADDR."""
    count = v[count_field]
    if not count:
        return None
    if count > v.caps.msr_list_recommended_maximum:
        return make_failure(f"{check_prefix}_count",
                            f"{_CTRL} {count_field} {count} (at most "
                            f"{v.caps.msr_list_recommended_maximum} on this machine)")
    address = v[address_field]
    last = address + count * MSR_LIST_ENTRY_SIZE - 1
    if address & MSR_LIST_ALIGNMENT_MASK or (address | last) & ~v.caps.physical_address_mask:
        return make_failure(f"{check_prefix}_address",
                            f"{_CTRL} {address_field} 0x{address:x} with {count} entries (bits 3:0 must "
                            "be 0, and the list must lie below 2^MAXPHYADDR)")
    return None


def check_entry_msr_list(v: EntryState) -> CheckResult:
    return _msr_list_failure(v, "VM_ENTRY_MSR_LOAD_COUNT", "VM_ENTRY_MSR_LOAD_ADDR", "controls.entry.msr_load")


# --- 27.2.2 Host control registers and MSRs ---------------------------------------------------

def _fixed_bits_failure(prefix: str, stage_text: str, register: str, value: int, fixed0: int,
                        fixed1: int, flags, unchecked: int = 0) -> CheckResult:
    required = fixed0 & ~unchecked
    if ~value & required:
        return make_failure(f"{prefix}.fixed0",
                            f"{stage_text} {register} 0x{value:08x} (bits 0x{required:08x} must be 1: "
                            f"{bit_names(required, flags)})")
    forbidden = value & ~fixed1 & ~unchecked
    if forbidden:
        return make_failure(f"{prefix}.fixed1",
                            f"{stage_text} {register} 0x{value:08x} (bits 0x{forbidden:x} must be 0 in VMX "
                            f"operation: {_named_bits(forbidden, flags)})")
    return None


def check_host_control_registers(v: EntryState) -> CheckResult:
    caps = v.caps
    failure = _fixed_bits_failure("host.cr0", _HOST, "CR0", v["HOST_CR0"], caps.cr0_fixed0,
                                  caps.cr0_fixed1, Cr0)
    failure = failure or _fixed_bits_failure("host.cr4", _HOST, "CR4", v["HOST_CR4"],
                                             caps.cr4_fixed0, caps.cr4_fixed1, Cr4)
    if failure:
        return failure
    if not fits_physical_address(v["HOST_CR3"], caps):
        return make_failure("host.cr3", f"{_HOST} CR3 0x{v['HOST_CR3']:x} (bits 63:{caps.maxphyaddr} "
                            "must be 0)")
    return None


def check_host_sysenter(v: EntryState) -> CheckResult:
    for name in ("HOST_IA32_SYSENTER_ESP", "HOST_IA32_SYSENTER_EIP"):
        if not v.canonical(v[name]):
            return make_failure("host.sysenter.canonical",
                                f"{_HOST} {name[5:]} 0x{v[name]:x} non canonical")
    return None


def check_host_pat(v: EntryState) -> CheckResult:
    if v.exit & ExitControls.LOAD_IA32_PAT and not is_valid_pat(v["HOST_IA32_PAT"]):
        return make_failure("host.pat", f"{_HOST} IA32_PAT 0x{v['HOST_IA32_PAT']:016x} (invalid memory "
                            "type: each byte must be 0, 1, 4, 5, 6 or 7)")
    return None


def check_host_efer(v: EntryState) -> CheckResult:
    if not v.exit & ExitControls.LOAD_IA32_EFER:
        return None
    efer = v["HOST_IA32_EFER"]
    reserved = efer & ~v.caps.efer_supported
    if reserved:
        return make_failure("host.efer.reserved",
                            f"{_HOST} IA32_EFER 0x{efer:x} (reserved bits 0x{reserved:x} set)")
    lma, lme = bool(efer & Efer.LMA), bool(efer & Efer.LME)
    if lma != v.host_64 or lme != v.host_64:
        return make_failure("host.efer.lma_lme",
                            f"{_HOST} IA32_EFER 0x{efer:x} (LMA and LME must both be {int(v.host_64)}, "
                            "the host address-space size exit control)")
    return None


# --- 27.2.3 Host segment and descriptor-table registers ---------------------------------------

def check_host_selectors(v: EntryState) -> CheckResult:
    for register in HOST_SELECTORS:
        selector = v[f"HOST_{register}_SELECTOR"]
        if selector & (SELECTOR_RPL_MASK | SELECTOR_TI):
            return make_failure("host.selector.rpl_ti",
                                f"{_HOST} {register} selector 0x{selector:04x} (TI and RPL must be 0)")
    if v["HOST_CS_SELECTOR"] == 0:
        return make_failure("host.cs.null", f"{_HOST} CS selector 0")
    if v["HOST_TR_SELECTOR"] == 0:
        return make_failure("host.tr.null", f"{_HOST} TR selector 0 (the host needs a TSS)")
    if not v.host_64 and v["HOST_SS_SELECTOR"] == 0:
        return make_failure("host.ss.null", f"{_HOST} SS selector 0 with a 32-bit host")
    return None


def check_host_bases(v: EntryState) -> CheckResult:
    for name in ("HOST_FS_BASE", "HOST_GS_BASE", "HOST_GDTR_BASE", "HOST_IDTR_BASE", "HOST_TR_BASE"):
        if not v.canonical(v[name]):
            return make_failure("host.base.canonical", f"{_HOST} {name[5:]} 0x{v[name]:x} non canonical")
    return None


# --- 27.2.4 Checks related to address-space size ----------------------------------------------

def check_address_space_size(v: EntryState) -> CheckResult:
    if v.in_ia32e_mode and not v.host_64:
        return make_failure("host.address_space.ia32e",
                            f"{_HOST}: VM entry from IA-32e mode requires the host address-space size "
                            "VM-exit control")
    if not v.in_ia32e_mode and (v.host_64 or v.ia32e_guest):
        return make_failure("host.address_space.legacy",
                            f"{_HOST}: VM entry from outside IA-32e mode with x86-64 guest({int(v.ia32e_guest)})"
                            f"/host({int(v.host_64)}) controls")
    rip, cr4 = v["HOST_RIP"], v["HOST_CR4"]
    # On a 64-bit processor "host address-space size = 0 => IA-32e mode guest = 0" is implied by
    # the two checks above, so it needs no check of its own.
    if not v.host_64:
        if cr4 & Cr4.PCIDE:
            return make_failure("host.cr4.pcide", f"{_HOST} CR4 0x{cr4:08x} (PCIDE set with a 32-bit host)")
        if rip >> 32:
            return make_failure("host.rip.high", f"{_HOST} RIP 0x{rip:x} > 32 bit")
        return None
    if not cr4 & Cr4.PAE:
        return make_failure("host.cr4.pae", f"{_HOST} CR4 0x{cr4:08x} (PAE must be 1 with an x86-64 host)")
    if not v.canonical(rip):
        return make_failure("host.rip.canonical", f"{_HOST} RIP 0x{rip:x} non canonical")
    return None


# --- 27.3.1.1 Guest control registers, debug registers and MSRs -------------------------------

def check_guest_control_registers(v: EntryState) -> CheckResult:
    caps = v.caps
    cr0, cr4 = v["GUEST_CR0"], v["GUEST_CR4"]
    exempt = GUEST_CR0_UNCHECKED | (int(Cr0.PE | Cr0.PG) if v.unrestricted else 0)
    failure = _fixed_bits_failure("guest.cr0", _GUEST, "CR0", cr0, caps.cr0_fixed0, caps.cr0_fixed1,
                                  Cr0, unchecked=exempt)
    if failure:
        return failure
    if cr0 & Cr0.PG and not cr0 & Cr0.PE:
        return make_failure("guest.cr0.pg_without_pe", f"{_GUEST} CR0 0x{cr0:08x} (PG set without PE)")
    failure = _fixed_bits_failure("guest.cr4", _GUEST, "CR4", cr4, caps.cr4_fixed0, caps.cr4_fixed1, Cr4)
    if failure:
        return failure
    if v.ia32e_guest:
        if not cr0 & Cr0.PG:
            return make_failure("guest.ia32e.cr0_pg",
                                f"{_GUEST} CR0 0x{cr0:08x} (PG must be 1 for an IA-32e mode guest)")
        if not cr4 & Cr4.PAE:
            return make_failure("guest.ia32e.cr4_pae",
                                f"{_GUEST} CR4 0x{cr4:08x} (PAE must be 1 for an IA-32e mode guest)")
    elif cr4 & Cr4.PCIDE:
        return make_failure("guest.cr4.pcide", f"{_GUEST} CR4 0x{cr4:08x} (PCIDE set in a 32-bit guest)")
    if not fits_physical_address(v["GUEST_CR3"], caps):
        return make_failure("guest.cr3", f"{_GUEST} CR3 0x{v['GUEST_CR3']:x} (bits 63:{caps.maxphyaddr} "
                            "must be 0)")
    return None


def check_guest_dr7_and_msrs(v: EntryState) -> CheckResult:
    if v.entry & EntryControls.LOAD_DEBUG_CONTROLS and v["GUEST_DR7"] & DR7_HIGH_MASK:
        return make_failure("guest.dr7", f"{_GUEST} DR7 0x{v['GUEST_DR7']:x} (bits 63:32 must be 0)")
    for name in ("GUEST_SYSENTER_ESP", "GUEST_SYSENTER_EIP"):
        if not v.canonical(v[name]):
            return make_failure("guest.sysenter.canonical", f"{_GUEST} {name[6:]} 0x{v[name]:x} non canonical")
    if v.entry & EntryControls.LOAD_IA32_PAT and not is_valid_pat(v["GUEST_IA32_PAT"]):
        return make_failure("guest.pat", f"{_GUEST} IA32_PAT 0x{v['GUEST_IA32_PAT']:016x} (invalid memory "
                            "type: each byte must be 0, 1, 4, 5, 6 or 7)")
    return None


def check_guest_efer(v: EntryState) -> CheckResult:
    if not v.entry & EntryControls.LOAD_IA32_EFER:
        return None
    efer = v["GUEST_IA32_EFER"]
    reserved = efer & ~v.caps.efer_supported
    if reserved:
        return make_failure("guest.efer.reserved",
                            f"{_GUEST} IA32_EFER 0x{efer:x} (reserved bits 0x{reserved:x} set)")
    lma, lme = bool(efer & Efer.LMA), bool(efer & Efer.LME)
    if lma != v.ia32e_guest:
        return make_failure("guest.efer.lma",
                            f"{_GUEST} IA32_EFER 0x{efer:x} (LMA must be {int(v.ia32e_guest)}, the IA-32e "
                            "mode guest entry control)")
    if v["GUEST_CR0"] & Cr0.PG and lme != lma:
        return make_failure("guest.efer.lme",
                            f"{_GUEST} IA32_EFER 0x{efer:x} (LME must equal LMA when CR0.PG = 1)")
    return None


# --- 27.3.1.2 Guest segment registers ---------------------------------------------------------
# Our machine only enters IA-32e mode guests, so RFLAGS.VM = 1 always fails (guest.rflags.vm);
# the virtual-8086 variants of these checks are not implemented.

def check_guest_selectors(v: EntryState) -> CheckResult:
    tr, ldtr = v.segment("TR"), v.segment("LDTR")
    if tr.selector & SELECTOR_TI:
        return make_failure("guest.tr.ti", f"{_GUEST} TR selector 0x{tr.selector:04x} (TI set)")
    if ldtr.usable and ldtr.selector & SELECTOR_TI:
        return make_failure("guest.ldtr.ti", f"{_GUEST} LDTR selector 0x{ldtr.selector:04x} (TI set)")
    cs, ss = v.segment("CS"), v.segment("SS")
    if not v.unrestricted and ss.rpl != cs.rpl:
        return make_failure("guest.ss.rpl", f"{_GUEST} SS selector 0x{ss.selector:04x}: SS.RPL {ss.rpl} != "
                            f"CS.RPL {cs.rpl}")
    return None


def check_guest_segment_bases(v: EntryState) -> CheckResult:
    for name in ("TR", "FS", "GS", "LDTR"):
        segment = v.segment(name)
        if name == "LDTR" and not segment.usable:
            continue
        if not v.canonical(segment.base):
            return make_failure("guest.base.canonical", f"{_GUEST} {name}.BASE 0x{segment.base:x} non canonical")
    for name in ("CS", "SS", "DS", "ES"):
        segment = v.segment(name)
        if (name == "CS" or segment.usable) and segment.base >> 32:
            return make_failure("guest.base.high", f"{_GUEST} {name}.BASE 0x{segment.base:x} > 32 bit")
    return None


def _code_data_segment_failure(v: EntryState, segment: Segment, ss: Segment) -> CheckResult:
    name, kind, ar = segment.name, segment.type, segment.access_rights
    where = f"{_GUEST} {name}.AR 0x{ar:x}"
    code = bool(kind & SEGMENT_TYPE_CODE)
    if name == "CS":
        allowed = {9, 11, 13, 15} | ({3} if v.unrestricted else set())
        if kind not in allowed:
            return make_failure("guest.cs.type", f"{where} (CS type {kind}; must be an accessed code segment: "
                                f"{', '.join(str(t) for t in sorted(allowed))})")
    elif name == "SS":
        if kind not in (3, 7):
            return make_failure("guest.ss.type", f"{where} (SS type {kind}; must be 3 or 7, accessed "
                                "read/write data)")
    else:
        if not kind & SEGMENT_TYPE_ACCESSED:
            return make_failure("guest.seg.type", f"{where} ({name} type {kind} not ACCESSED)")
        if code and not kind & SEGMENT_TYPE_READABLE_OR_WRITABLE:
            return make_failure("guest.seg.type", f"{where} (CODE segment {name} not READABLE)")
    if not ar & AR_S:
        return make_failure("guest.seg.s", f"{where} ({name} is not a code/data segment: S must be 1)")
    if name == "CS":
        if kind in (9, 11) and segment.dpl != ss.dpl:
            return make_failure("guest.cs.dpl", f"{where} (non-conforming CS.DPL {segment.dpl} != "
                                f"SS.DPL {ss.dpl})")
        if kind in (13, 15) and segment.dpl > ss.dpl:
            return make_failure("guest.cs.dpl", f"{where} (conforming CS.DPL {segment.dpl} > SS.DPL {ss.dpl})")
        if kind == 3 and segment.dpl != 0:
            return make_failure("guest.cs.dpl", f"{where} (CS type 3 requires DPL 0)")
    elif name != "SS" and not v.unrestricted and (not code or not kind & SEGMENT_TYPE_CONFORMING_OR_EXPAND_DOWN):
        if segment.dpl < segment.rpl:
            return make_failure("guest.seg.dpl", f"{where} ({name}.DPL {segment.dpl} < {name}.RPL "
                                f"{segment.rpl})")
    if not ar & AR_P:
        return make_failure("guest.seg.present", f"{where} ({name} not present)")
    if ar & (AR_RESERVED_11_8 | AR_RESERVED_31_17):
        return make_failure("guest.seg.reserved", f"{where} ({name} reserved bits 11:8 or 31:17 set)")
    if name == "CS" and v.ia32e_guest and ar & AR_L and ar & AR_DB:
        return make_failure("guest.cs.l_db", f"{where} (x86_64 guest wrong CS.D_B/L: D/B must be 0 when L = 1)")
    if not segment.granularity_consistent():
        return make_failure("guest.seg.granularity", f"{where} ({name}.AR/LIMIT malformed: limit "
                            f"0x{segment.limit:x} with G = {int(bool(ar & AR_G))})")
    return None


def check_guest_code_data_segments(v: EntryState) -> CheckResult:
    cs, ss = v.segment("CS"), v.segment("SS")
    for name in SEGMENTS:
        segment = v.segment(name)
        if name != "CS" and not segment.usable:
            continue
        failure = _code_data_segment_failure(v, segment, ss)
        if failure:
            return failure
    if not v.unrestricted and ss.dpl != ss.rpl:
        return make_failure("guest.ss.dpl", f"{_GUEST} SS.AR 0x{ss.access_rights:x} (SS.DPL {ss.dpl} != "
                            f"SS.RPL {ss.rpl})")
    if (cs.type == 3 or not v["GUEST_CR0"] & Cr0.PE) and ss.dpl != 0:
        return make_failure("guest.ss.dpl", f"{_GUEST} SS.AR 0x{ss.access_rights:x} (SS.DPL must be 0 with CS "
                            "type 3 or CR0.PE = 0)")
    return None


def _system_segment_failure(segment: Segment, allowed_types: tuple[int, ...],
                            type_text: str) -> CheckResult:
    prefix = f"guest.{segment.name.lower()}"
    ar = segment.access_rights
    where = f"{_GUEST} {segment.name}.AR 0x{ar:x}"
    if segment.type not in allowed_types:
        return make_failure(f"{prefix}.type", f"{where} (incorrect {segment.name} type {segment.type}; "
                            f"must be {type_text})")
    if ar & AR_S:
        return make_failure(f"{prefix}.s", f"{where} ({segment.name} is not a system segment: S must be 0)")
    if not ar & AR_P:
        return make_failure(f"{prefix}.present", f"{where} ({segment.name} not present)")
    if ar & (AR_RESERVED_11_8 | AR_RESERVED_31_17):
        return make_failure(f"{prefix}.reserved", f"{where} ({segment.name} reserved bits 11:8 or 31:17 set)")
    if not segment.granularity_consistent():
        return make_failure(f"{prefix}.granularity", f"{where} ({segment.name}.AR/LIMIT malformed: limit "
                            f"0x{segment.limit:x} with G = {int(bool(ar & AR_G))})")
    return None


def check_guest_tr(v: EntryState) -> CheckResult:
    tr = v.segment("TR")
    if v.ia32e_guest:
        failure = _system_segment_failure(tr, (SYSTEM_TYPE_BUSY_TSS,), "11, a busy 64-bit TSS")
    else:
        failure = _system_segment_failure(tr, (SYSTEM_TYPE_BUSY_TSS16, SYSTEM_TYPE_BUSY_TSS),
                                          "3 or 11, a busy TSS")
    if failure:
        return failure
    if not tr.usable:
        return make_failure("guest.tr.unusable", f"{_GUEST} TR.AR 0x{tr.access_rights:x} (TR unusable)")
    return None


def check_guest_ldtr(v: EntryState) -> CheckResult:
    ldtr = v.segment("LDTR")
    if not ldtr.usable:
        return None
    return _system_segment_failure(ldtr, (SYSTEM_TYPE_LDT,), "2, an LDT")


# --- 27.3.1.3 Guest descriptor-table registers ------------------------------------------------

def check_guest_descriptor_tables(v: EntryState) -> CheckResult:
    for table in ("GDTR", "IDTR"):
        base = v[f"GUEST_{table}_BASE"]
        if not v.canonical(base):
            return make_failure(f"guest.{table.lower()}.base", f"{_GUEST} {table}.BASE 0x{base:x} non canonical")
    for table in ("GDTR", "IDTR"):
        limit = v[f"GUEST_{table}_LIMIT"]
        if limit > DESCRIPTOR_TABLE_LIMIT_MAX:
            return make_failure(f"guest.{table.lower()}.limit", f"{_GUEST} {table}.LIMIT 0x{limit:x} > 0xFFFF")
    return None


# --- 27.3.1.4 Guest RIP and RFLAGS ------------------------------------------------------------

def check_guest_rip(v: EntryState) -> CheckResult:
    rip = v["GUEST_RIP"]
    long_mode_code = v.ia32e_guest and bool(v["GUEST_CS_AR_BYTES"] & AR_L)
    if not long_mode_code and rip >> 32:
        return make_failure("guest.rip.high", f"{_GUEST} RIP 0x{rip:x} > 32 bit (not 64-bit code: IA-32e "
                            "mode guest and CS.L are needed for a 64-bit RIP)")
    # Only bits 63:N are checked, not bit N-1: a non-canonical RIP faults on the first fetch.
    width = v.caps.linear_address_width
    if long_mode_code and rip >> width not in (0, U64_MASK >> width):
        return make_failure("guest.rip.linear_width",
                            f"{_GUEST} RIP 0x{rip:x} (bits 63:{width} must be identical)")
    return None


def check_guest_rflags(v: EntryState) -> CheckResult:
    rflags = v["GUEST_RFLAGS"]
    if rflags & RFLAGS_RESERVED_ZERO:
        return make_failure("guest.rflags.reserved",
                            f"{_GUEST} RFLAGS 0x{rflags:x} (reserved bits 0x{rflags & RFLAGS_RESERVED_ZERO:x} "
                            "set: bits 63:22, 15, 5, 3 must be 0)")
    if not rflags & Rflags.FIXED1:
        return make_failure("guest.rflags.bit1", f"{_GUEST} RFLAGS 0x{rflags:x} (bit 1 must be 1)")
    if rflags & Rflags.VM and (v.ia32e_guest or not v["GUEST_CR0"] & Cr0.PE):
        return make_failure("guest.rflags.vm", f"{_GUEST} RFLAGS 0x{rflags:x} (VM must be 0 in an IA-32e mode "
                            "guest or with CR0.PE = 0)")
    if v.injecting_type(InterruptionType.EXTERNAL_INTERRUPT) and not rflags & Rflags.IF:
        return make_failure("guest.rflags.if", f"{_GUEST} RFLAGS 0x{rflags:x} (IF must be 1 to inject an "
                            "external interrupt)")
    return None


# --- 27.3.1.5 Guest non-register state --------------------------------------------------------

def _injection_allowed_in(activity: ActivityState, kind: InterruptionType, vector: int) -> bool:
    """Events VM entry may inject into each activity state. See: SDM Vol. 3C 27.3.1.5."""
    if activity == ActivityState.ACTIVE:
        return True
    if activity == ActivityState.HLT:
        return (kind in (InterruptionType.EXTERNAL_INTERRUPT, InterruptionType.NMI)
                or (kind == InterruptionType.HARDWARE_EXCEPTION
                    and vector in (ExceptionVector.DB, ExceptionVector.MC))
                or (kind == InterruptionType.OTHER_EVENT and vector == 0))
    if activity == ActivityState.SHUTDOWN:
        return kind == InterruptionType.NMI or (kind == InterruptionType.HARDWARE_EXCEPTION
                                               and vector == ExceptionVector.MC)
    return False


def check_guest_activity_state(v: EntryState) -> CheckResult:
    value = v["GUEST_ACTIVITY_STATE"]
    if value > max(ActivityState):
        return make_failure("guest.activity.valid", f"{_GUEST} activity state {value} (must be 0-3)")
    activity = ActivityState(value)
    if activity not in v.caps.activity_states:
        supported = ", ".join(f"{int(s)} {s.name}" for s in sorted(v.caps.activity_states))
        return make_failure("guest.activity.supported",
                            f"{_GUEST} activity state {value} {activity.name} not supported ({supported})")
    ss_dpl = v.segment("SS").dpl
    if activity == ActivityState.HLT and ss_dpl != 0:
        return make_failure("guest.activity.hlt_dpl", f"{_GUEST} HLT state with SS.DPL={ss_dpl}")
    blocking = v["GUEST_INTERRUPTIBILITY_INFO"] & (Interruptibility.BLOCKING_BY_STI
                                                   | Interruptibility.BLOCKING_BY_MOV_SS)
    if blocking and activity != ActivityState.ACTIVE:
        return make_failure("guest.activity.blocking",
                            f"{_GUEST} interruptibility state 0x{v['GUEST_INTERRUPTIBILITY_INFO']:x} blocks by "
                            f"STI/MOV SS when entering non active CPU state {value}")
    if v.injecting and not _injection_allowed_in(activity, v.event_type, v.event_vector):
        return make_failure("guest.activity.injection",
                            f"{_GUEST} activity state {activity.name} blocks the injected event "
                            f"{v.event_type.name} vector {v.event_vector}")
    return None


def check_guest_interruptibility(v: EntryState) -> CheckResult:
    state = v["GUEST_INTERRUPTIBILITY_INFO"]
    where = f"{_GUEST} interruptibility state 0x{state:x}"
    sti = bool(state & Interruptibility.BLOCKING_BY_STI)
    mov_ss = bool(state & Interruptibility.BLOCKING_BY_MOV_SS)
    if state & INTERRUPTIBILITY_RESERVED_BITS:
        return make_failure("guest.interruptibility.reserved", f"{where} (reserved bits 31:4 set)")
    if sti and mov_ss:
        return make_failure("guest.interruptibility.sti_and_mov_ss",
                            f"{where} (blocking by both STI and MOV SS)")
    if sti and not v["GUEST_RFLAGS"] & Rflags.IF:
        return make_failure("guest.interruptibility.sti_without_if",
                            f"{where} (interrupts can't be blocked by STI when EFLAGS.IF = 0)")
    if v.injecting_type(InterruptionType.EXTERNAL_INTERRUPT) and (sti or mov_ss):
        return make_failure("guest.interruptibility.external_interrupt",
                            f"{where} (interrupts blocked when injecting external interrupt)")
    if v.injecting_type(InterruptionType.NMI) and mov_ss:
        return make_failure("guest.interruptibility.nmi_mov_ss",
                            f"{where} (blocking by MOV SS when injecting NMI)")
    if v.injecting_type(InterruptionType.NMI) and sti:
        return make_failure("guest.interruptibility.nmi_sti",
                            f"{where} (blocking by STI when injecting NMI)")
    if state & Interruptibility.BLOCKING_BY_SMI:
        return make_failure("guest.interruptibility.smi", f"{where} (SMI blocked when not in SMM)")
    if (v.pin & PinBasedControls.VIRTUAL_NMIS and v.injecting_type(InterruptionType.NMI)
            and state & Interruptibility.BLOCKING_BY_NMI):
        return make_failure("guest.interruptibility.virtual_nmi",
                            f"{where} (blocking by NMI when injecting a virtual NMI)")
    return None


def check_guest_pending_debug_exceptions(v: EntryState) -> CheckResult:
    pending = v["GUEST_PENDING_DBG_EXCEPTIONS"]
    reserved = pending & (PENDING_DBG_RESERVED_BITS | PENDING_DBG_RTM)
    if reserved:
        return make_failure("guest.pending_dbg.reserved",
                            f"{_GUEST} pending debug exceptions 0x{pending:x} (reserved bits 0x{reserved:x} set)")
    blocked = v["GUEST_INTERRUPTIBILITY_INFO"] & (Interruptibility.BLOCKING_BY_STI
                                                  | Interruptibility.BLOCKING_BY_MOV_SS)
    if blocked or v["GUEST_ACTIVITY_STATE"] == ActivityState.HLT:
        single_step = (bool(v["GUEST_RFLAGS"] & Rflags.TF)
                       and not v["GUEST_IA32_DEBUGCTL"] & IA32_DEBUGCTL_BTF)
        if bool(pending & PENDING_DBG_BS) != single_step:
            return make_failure("guest.pending_dbg.bs",
                                f"{_GUEST} pending debug exceptions 0x{pending:x} (BS must be "
                                f"{int(single_step)}: RFLAGS.TF = 1 and DEBUGCTL.BTF = 0 "
                                "exactly when a single-step trap is pending)")
    return None


def check_vmcs_link_pointer(v: EntryState) -> CheckResult:
    pointer = v["VMCS_LINK_POINTER"]
    if pointer != VMCS_LINK_POINTER_NONE:
        return make_failure("guest.vmcs_link_pointer",
                            f"VMENTER FAIL: VMCS link pointer 0x{pointer:x} malformed (must be "
                            "0xffffffffffffffff: this machine has no VMCS shadowing)")
    return None


# --- Driver -----------------------------------------------------------------------------------

CONTROL_CHECKS = (
    check_pin_based_controls, check_primary_processor_controls, check_secondary_processor_controls,
    check_cr3_target_count, check_io_bitmaps, check_msr_bitmap, check_nmi_controls,
    check_vpid, check_ept_pointer, check_unrestricted_guest,
    check_exit_controls, check_preemption_timer_save, check_exit_msr_lists,
    check_entry_controls, check_event_injection, check_entry_msr_list,
)
HOST_CHECKS = (
    check_host_control_registers, check_host_sysenter, check_host_pat, check_host_efer,
    check_host_selectors, check_host_bases, check_address_space_size,
)
GUEST_CHECKS = (
    check_guest_control_registers, check_guest_dr7_and_msrs, check_guest_efer,
    check_guest_selectors, check_guest_segment_bases, check_guest_code_data_segments,
    check_guest_tr, check_guest_ldtr, check_guest_descriptor_tables,
    check_guest_rip, check_guest_rflags,
    check_guest_activity_state, check_guest_interruptibility,
    check_guest_pending_debug_exceptions, check_vmcs_link_pointer,
)


def iter_failures(v: EntryState) -> Iterator[EntryCheckFailure]:
    """Failures of every check function, in SDM order (each function reports its first failure)."""
    for check in CONTROL_CHECKS + HOST_CHECKS + GUEST_CHECKS:
        failure = check(v)
        if failure is not None:
            yield failure


def check_vm_entry(read: Callable[[str], int], caps: VmxCapabilities = MACHINE_VMX_CAPABILITIES, *,
                   launching: bool, in_ia32e_mode: bool = True) -> CheckResult:
    """Run the checks of SDM Vol. 3C 27.2 and 27.3.1 on the current VMCS; None if all pass.

    `read(name)` returns a VMCS field by its name in emu.vmcs_fields. `launching` is True for
    VMLAUNCH and False for VMRESUME (the launch-state checks of 27.1 are `check_launch_state`);
    `in_ia32e_mode` is IA32_EFER.LMA of the processor executing the instruction.
    """
    del launching  # the checks of 27.2 and 27.3.1 are the same for VMLAUNCH and VMRESUME
    return next(iter_failures(EntryState(read, caps, in_ia32e_mode)), None)


def markdown() -> str:
    """Every check with its id, SDM section, outcome and rule, as Markdown."""
    lines = ["| check id | SDM (Vol. 3C) | on failure | rule |", "|---|---|---|---|"]
    for check in ENTRY_CHECKS + LOAD_CHECKS:
        if check.kind == ENTRY_FAILURE:
            qualification = int(_GUEST_DEFAULT_QUALIFICATION.get(check.id, EntryFailureQualification.DEFAULT))
            outcome = f"exit {int(ExitReason.INVALID_GUEST_STATE)}, qual. {qualification}"
        else:
            outcome = f"VMfailValid({int(check.error)})"
        lines.append(f"| {check.id} | {check.sdm} | {outcome} | {check.rule} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.stderr.write("usage: python -m emu.vmentry_checks --markdown\n")
        sys.exit(2)
    sys.stdout.write(markdown())
