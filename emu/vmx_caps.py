"""What our machine's VMX supports: the values it reports in the VMX capability MSRs 0x480-0x491.

The VM-entry checks (emu.vmentry_checks) test a VMCS against these values, so a hypervisor that
builds its controls from the MSRs (allowed-0 bits forced to 1, bits outside allowed-1 cleared)
gets a VMCS our machine accepts. See: SDM Vol. 3D Appendix A "VMX Capability Reporting Facility".
Run `python -m emu.vmx_caps --markdown` for the documented table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from emu.vmcs_fields import ENCODING_INDEX_SHIFT, HIGHEST_FIELD_INDEX, VMCS_REGION_SIZE
from emu.vmx_defs import (
    U32_MASK,
    ENTRY_DEFAULT1, EXIT_DEFAULT1, PIN_BASED_DEFAULT1, PRIMARY_PROCESSOR_DEFAULT1,
    ActivityState, Cr0, Cr4, Efer, EntryControls, ExitControls, MemoryType, PinBasedControls,
    PrimaryProcessorControls, SecondaryProcessorControls, bit_names, unnamed_bits,
    EPT_CAP_INVEPT, EPT_CAP_INVEPT_ALL_CONTEXT, EPT_CAP_INVEPT_SINGLE_CONTEXT,
    EPT_CAP_MEMORY_TYPE_UC, EPT_CAP_MEMORY_TYPE_WB, EPT_CAP_PDE_2MB_PAGES, EPT_CAP_PDPTE_1GB_PAGES,
    EPT_CAP_WALK_LENGTH_4, EPT_CAP_WALK_LENGTH_5, EPT_CAP_ACCESSED_DIRTY,
    VPID_CAP_ALL_CONTEXT, VPID_CAP_INVVPID, VPID_CAP_SINGLE_CONTEXT,
    IA32_VMX_BASIC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_EXIT_CTLS,
    IA32_VMX_ENTRY_CTLS, IA32_VMX_MISC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1,
    IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1, IA32_VMX_VMCS_ENUM, IA32_VMX_PROCBASED_CTLS2,
    IA32_VMX_EPT_VPID_CAP, IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS,
    IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_VMFUNC,
    VMX_BASIC_MEMORY_TYPE_SHIFT, VMX_BASIC_REGION_SIZE_SHIFT, VMX_BASIC_TRUE_CONTROLS,
    VMX_MISC_ACTIVITY_HLT, VMX_MISC_ACTIVITY_SHUTDOWN, VMX_MISC_ACTIVITY_WAIT_FOR_SIPI,
    VMX_MISC_CR3_TARGET_COUNT_SHIFT, VMX_MISC_MSR_LIST_LIMIT_SHIFT, VMX_MISC_MSR_LIST_UNIT,
    VMX_MISC_PREEMPTION_TIMER_RATE_MASK, VMX_MISC_SAVES_EFER_LMA, VMX_MISC_ZERO_LENGTH_INJECTION,
)

CONTROL_MSR_HIGH_SHIFT = 32

# Our machine's physical- and linear-address widths (CPUID 80000008H:EAX[7:0] and [15:8]).
MACHINE_MAXPHYADDR = 39
MACHINE_LINEAR_ADDRESS_WIDTH = 48
# "RHH\0" in the low bytes: our VMCS revision identifier (bit 31 must be 0, SDM Appendix A.1).
MACHINE_VMCS_REVISION_ID = 0x0048_4852


@dataclass(frozen=True)
class ControlCapability:
    """Allowed settings of one 32-bit VMX control field, with TRUE-MSR semantics.

    `must_be_one` is the allowed-0 half (bit X = 1: control X must be 1); `may_be_one` is the
    allowed-1 half (bit X = 0: control X must be 0). See: SDM Appendix A.3.
    """

    must_be_one: int
    may_be_one: int

    def __post_init__(self) -> None:
        assert self.must_be_one & ~self.may_be_one == 0, "a must-be-1 control must be allowed to be 1"

    def msr_value(self, default1: int = 0) -> int:
        """The capability MSR value; `default1` forces those bits to 1 (the non-TRUE MSRs)."""
        return ((self.must_be_one | default1)
                | ((self.may_be_one | default1) << CONTROL_MSR_HIGH_SHIFT))

    def missing_ones(self, value: int) -> int:
        """Bits that must be 1 but are 0 in `value` (allowed-0 violation)."""
        return self.must_be_one & ~value & U32_MASK

    def forbidden_ones(self, value: int) -> int:
        """Bits that are 1 in `value` but must be 0 (allowed-1 violation)."""
        return value & ~self.may_be_one & U32_MASK

    def adjust(self, desired: int) -> int:
        """`desired` with must-be-1 bits set and unsupported bits cleared (what a VMM should write)."""
        return (desired | self.must_be_one) & self.may_be_one

    def supports(self, control: int) -> bool:
        return self.may_be_one & control == control


# Default1 bits that carry no function stay must-be-1 in the TRUE MSRs, as on real processors;
# the functional default1 controls (CR3-load/-store exiting, save/load debug controls) are
# unsupported by our machine, so their TRUE allowed-0 and allowed-1 bits are both 0.
_PIN_RESERVED_DEFAULT1 = PIN_BASED_DEFAULT1
_PRIMARY_RESERVED_DEFAULT1 = PRIMARY_PROCESSOR_DEFAULT1 & ~(
    PrimaryProcessorControls.CR3_LOAD_EXITING | PrimaryProcessorControls.CR3_STORE_EXITING)
_EXIT_RESERVED_DEFAULT1 = EXIT_DEFAULT1 & ~ExitControls.SAVE_DEBUG_CONTROLS
_ENTRY_RESERVED_DEFAULT1 = ENTRY_DEFAULT1 & ~EntryControls.LOAD_DEBUG_CONTROLS


def _control(must_be_one: int, optional: int) -> ControlCapability:
    return ControlCapability(must_be_one=int(must_be_one), may_be_one=int(must_be_one | optional))


@dataclass(frozen=True)
class VmxCapabilities:
    """Everything our machine reports about VMX; the VM-entry checks read only this."""

    vmcs_revision_id: int = MACHINE_VMCS_REVISION_ID
    vmcs_region_size: int = VMCS_REGION_SIZE
    vmcs_memory_type: MemoryType = MemoryType.WB
    pin_based: ControlCapability = field(default_factory=lambda: _control(
        _PIN_RESERVED_DEFAULT1,
        PinBasedControls.EXTERNAL_INTERRUPT_EXITING | PinBasedControls.NMI_EXITING
        | PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER))
    primary_processor: ControlCapability = field(default_factory=lambda: _control(
        _PRIMARY_RESERVED_DEFAULT1 | PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS,
        PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING | PrimaryProcessorControls.HLT_EXITING
        | PrimaryProcessorControls.RDTSC_EXITING | PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING
        | PrimaryProcessorControls.USE_IO_BITMAPS | PrimaryProcessorControls.CR3_LOAD_EXITING
        | PrimaryProcessorControls.CR3_STORE_EXITING | PrimaryProcessorControls.USE_MSR_BITMAPS))
    secondary_processor: ControlCapability = field(default_factory=lambda: _control(
        SecondaryProcessorControls.ENABLE_EPT, SecondaryProcessorControls.ENABLE_VPID))
    exit: ControlCapability = field(default_factory=lambda: _control(
        _EXIT_RESERVED_DEFAULT1 | ExitControls.HOST_ADDRESS_SPACE_SIZE,
        ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT | ExitControls.SAVE_IA32_EFER
        | ExitControls.LOAD_IA32_EFER | ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE
        | ExitControls.SAVE_DEBUG_CONTROLS))
    entry: ControlCapability = field(default_factory=lambda: _control(
        _ENTRY_RESERVED_DEFAULT1 | EntryControls.IA32E_MODE_GUEST,
        EntryControls.LOAD_IA32_EFER | EntryControls.LOAD_DEBUG_CONTROLS))
    # IA32_VMX_MISC: rate X = 0, the VMX-preemption timer counts down once per unit of the
    # machine's virtual time, i.e. once per retired guest instruction. See: SDM 26.5.1.
    preemption_timer_rate: int = 0
    saves_efer_lma: bool = True
    activity_states: frozenset[ActivityState] = frozenset({ActivityState.ACTIVE, ActivityState.HLT})
    cr3_target_count: int = 0
    msr_list_limit_code: int = 0
    zero_length_instruction_injection: bool = False
    # Fixed bits of CR0/CR4 in VMX operation. See: SDM Appendix A.7, A.8.
    cr0_fixed0: int = int(Cr0.PE | Cr0.NE | Cr0.PG)
    cr0_fixed1: int = int(Cr0.PE | Cr0.MP | Cr0.EM | Cr0.TS | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.AM
                          | Cr0.NW | Cr0.CD | Cr0.PG)
    cr4_fixed0: int = int(Cr4.VMXE)
    cr4_fixed1: int = int(Cr4.VME | Cr4.PVI | Cr4.TSD | Cr4.DE | Cr4.PSE | Cr4.PAE | Cr4.MCE
                          | Cr4.PGE | Cr4.PCE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.VMXE
                          | Cr4.FSGSBASE | Cr4.OSXSAVE | Cr4.SMEP | Cr4.SMAP)
    ept_vpid_cap: int = (EPT_CAP_WALK_LENGTH_4 | EPT_CAP_MEMORY_TYPE_WB | EPT_CAP_PDE_2MB_PAGES
                         | EPT_CAP_PDPTE_1GB_PAGES | EPT_CAP_INVEPT | EPT_CAP_INVEPT_SINGLE_CONTEXT
                         | EPT_CAP_INVEPT_ALL_CONTEXT | VPID_CAP_INVVPID | VPID_CAP_SINGLE_CONTEXT
                         | VPID_CAP_ALL_CONTEXT)
    vm_functions: int = 0
    efer_supported: int = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)
    maxphyaddr: int = MACHINE_MAXPHYADDR
    linear_address_width: int = MACHINE_LINEAR_ADDRESS_WIDTH

    # --- derived facts used by the entry checks ---

    @property
    def physical_address_mask(self) -> int:
        return (1 << self.maxphyaddr) - 1

    @property
    def ept_memory_types(self) -> frozenset[MemoryType]:
        types = set()
        if self.ept_vpid_cap & EPT_CAP_MEMORY_TYPE_UC:
            types.add(MemoryType.UC)
        if self.ept_vpid_cap & EPT_CAP_MEMORY_TYPE_WB:
            types.add(MemoryType.WB)
        return frozenset(types)

    @property
    def ept_walk_lengths(self) -> frozenset[int]:
        lengths = set()
        if self.ept_vpid_cap & EPT_CAP_WALK_LENGTH_4:
            lengths.add(4)
        if self.ept_vpid_cap & EPT_CAP_WALK_LENGTH_5:
            lengths.add(5)
        return frozenset(lengths)

    @property
    def ept_accessed_dirty(self) -> bool:
        return bool(self.ept_vpid_cap & EPT_CAP_ACCESSED_DIRTY)

    @property
    def monitor_trap_flag(self) -> bool:
        return self.primary_processor.supports(PrimaryProcessorControls.MONITOR_TRAP_FLAG)

    @property
    def msr_list_recommended_maximum(self) -> int:
        return VMX_MISC_MSR_LIST_UNIT * (self.msr_list_limit_code + 1)

    # --- MSR values ---

    def ia32_vmx_basic(self) -> int:
        """See: SDM Appendix A.1. Bit 48 = 0 (64-bit addresses), bit 49 = 0 (no dual-monitor SMM)."""
        return (self.vmcs_revision_id
                | (self.vmcs_region_size << VMX_BASIC_REGION_SIZE_SHIFT)
                | (int(self.vmcs_memory_type) << VMX_BASIC_MEMORY_TYPE_SHIFT)
                | VMX_BASIC_TRUE_CONTROLS)

    def ia32_vmx_misc(self) -> int:
        """See: SDM Appendix A.6."""
        value = (self.preemption_timer_rate & VMX_MISC_PREEMPTION_TIMER_RATE_MASK)
        value |= VMX_MISC_SAVES_EFER_LMA if self.saves_efer_lma else 0
        value |= VMX_MISC_ACTIVITY_HLT if ActivityState.HLT in self.activity_states else 0
        value |= VMX_MISC_ACTIVITY_SHUTDOWN if ActivityState.SHUTDOWN in self.activity_states else 0
        value |= (VMX_MISC_ACTIVITY_WAIT_FOR_SIPI
                  if ActivityState.WAIT_FOR_SIPI in self.activity_states else 0)
        value |= self.cr3_target_count << VMX_MISC_CR3_TARGET_COUNT_SHIFT
        value |= self.msr_list_limit_code << VMX_MISC_MSR_LIST_LIMIT_SHIFT
        value |= VMX_MISC_ZERO_LENGTH_INJECTION if self.zero_length_instruction_injection else 0
        return value

    def msr_values(self) -> dict[int, int]:
        """Every VMX capability MSR (0x480-0x491) and the value RDMSR returns for it."""
        return {
            IA32_VMX_BASIC: self.ia32_vmx_basic(),
            IA32_VMX_PINBASED_CTLS: self.pin_based.msr_value(PIN_BASED_DEFAULT1),
            IA32_VMX_PROCBASED_CTLS: self.primary_processor.msr_value(PRIMARY_PROCESSOR_DEFAULT1),
            IA32_VMX_EXIT_CTLS: self.exit.msr_value(EXIT_DEFAULT1),
            IA32_VMX_ENTRY_CTLS: self.entry.msr_value(ENTRY_DEFAULT1),
            IA32_VMX_MISC: self.ia32_vmx_misc(),
            IA32_VMX_CR0_FIXED0: self.cr0_fixed0,
            IA32_VMX_CR0_FIXED1: self.cr0_fixed1,
            IA32_VMX_CR4_FIXED0: self.cr4_fixed0,
            IA32_VMX_CR4_FIXED1: self.cr4_fixed1,
            IA32_VMX_VMCS_ENUM: HIGHEST_FIELD_INDEX << ENCODING_INDEX_SHIFT,
            IA32_VMX_PROCBASED_CTLS2: self.secondary_processor.msr_value(),
            IA32_VMX_EPT_VPID_CAP: self.ept_vpid_cap,
            IA32_VMX_TRUE_PINBASED_CTLS: self.pin_based.msr_value(),
            IA32_VMX_TRUE_PROCBASED_CTLS: self.primary_processor.msr_value(),
            IA32_VMX_TRUE_EXIT_CTLS: self.exit.msr_value(),
            IA32_VMX_TRUE_ENTRY_CTLS: self.entry.msr_value(),
            IA32_VMX_VMFUNC: self.vm_functions,
        }


MACHINE_VMX_CAPABILITIES = VmxCapabilities()


def msr_values(caps: VmxCapabilities = MACHINE_VMX_CAPABILITIES) -> dict[int, int]:
    """The machine's VMX capability MSRs, keyed by MSR index."""
    return caps.msr_values()


_MSR_NAMES = {
    IA32_VMX_BASIC: "IA32_VMX_BASIC", IA32_VMX_PINBASED_CTLS: "IA32_VMX_PINBASED_CTLS",
    IA32_VMX_PROCBASED_CTLS: "IA32_VMX_PROCBASED_CTLS", IA32_VMX_EXIT_CTLS: "IA32_VMX_EXIT_CTLS",
    IA32_VMX_ENTRY_CTLS: "IA32_VMX_ENTRY_CTLS", IA32_VMX_MISC: "IA32_VMX_MISC",
    IA32_VMX_CR0_FIXED0: "IA32_VMX_CR0_FIXED0", IA32_VMX_CR0_FIXED1: "IA32_VMX_CR0_FIXED1",
    IA32_VMX_CR4_FIXED0: "IA32_VMX_CR4_FIXED0", IA32_VMX_CR4_FIXED1: "IA32_VMX_CR4_FIXED1",
    IA32_VMX_VMCS_ENUM: "IA32_VMX_VMCS_ENUM", IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
    IA32_VMX_EPT_VPID_CAP: "IA32_VMX_EPT_VPID_CAP",
    IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
    IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
    IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS",
    IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS", IA32_VMX_VMFUNC: "IA32_VMX_VMFUNC",
}


def markdown(caps: VmxCapabilities = MACHINE_VMX_CAPABILITIES) -> str:
    """The capability MSRs and the control policy, as Markdown."""
    lines = ["| MSR | name | value |", "|---|---|---|"]
    lines += [f"| 0x{index:03X} | {_MSR_NAMES[index]} | 0x{value:016X} |"
              for index, value in caps.msr_values().items()]
    lines += ["", "| control field | must be 1 (allowed-0) | may be 1 (allowed-1) |", "|---|---|---|"]
    for label, capability, flags in (
            ("pin-based", caps.pin_based, PinBasedControls),
            ("primary processor-based", caps.primary_processor, PrimaryProcessorControls),
            ("secondary processor-based", caps.secondary_processor, SecondaryProcessorControls),
            ("VM-exit", caps.exit, ExitControls),
            ("VM-entry", caps.entry, EntryControls)):
        must_parts = [bit_names(capability.must_be_one, flags)]
        reserved_must = unnamed_bits(capability.must_be_one, flags)
        if reserved_must:
            must_parts.append(f"reserved default1 bits 0x{reserved_must:08X}")
        must_names = " + ".join(part for part in must_parts if part) or "-"
        optional = capability.may_be_one & ~capability.must_be_one
        lines.append(f"| {label} | 0x{capability.must_be_one:08X}: {must_names} | "
                     f"0x{capability.may_be_one:08X}: optional {bit_names(optional, flags) or '-'} |")
    lines += [
        "",
        f"- VMCS revision identifier 0x{caps.vmcs_revision_id:08X}, region size "
        f"{caps.vmcs_region_size} bytes, memory type {caps.vmcs_memory_type.name}, TRUE controls.",
        f"- MAXPHYADDR {caps.maxphyaddr}, linear-address width {caps.linear_address_width}.",
        f"- VMX-preemption timer rate {caps.preemption_timer_rate}: one tick per retired guest "
        "instruction.",
        f"- Activity states: {', '.join(state.name for state in sorted(caps.activity_states))}.",
        f"- CR3-target count {caps.cr3_target_count}; MSR-list limit code "
        f"{caps.msr_list_limit_code} (architectural recommendation "
        f"{caps.msr_list_recommended_maximum} entries, the most a VM-entry MSR-load list may hold "
        "here); this machine implements no VM-exit MSR lists: their two counts must be 0.",
        f"- CR0 fixed0 0x{caps.cr0_fixed0:08X} ({bit_names(caps.cr0_fixed0, Cr0)}), fixed1 "
        f"0x{caps.cr0_fixed1:08X} ({bit_names(caps.cr0_fixed1, Cr0)}).",
        f"- CR4 fixed0 0x{caps.cr4_fixed0:08X} ({bit_names(caps.cr4_fixed0, Cr4)}), fixed1 "
        f"0x{caps.cr4_fixed1:08X} ({bit_names(caps.cr4_fixed1, Cr4)}).",
        f"- EPT: memory types {', '.join(t.name for t in sorted(caps.ept_memory_types))}; page-walk "
        f"length {', '.join(str(n) for n in sorted(caps.ept_walk_lengths))}; 2 MiB and 1 GiB pages; "
        f"INVEPT single-context and all-context; accessed/dirty flags "
        f"{'supported' if caps.ept_accessed_dirty else 'not supported'}; INVVPID single-context "
        "and all-context.",
        f"- IA32_EFER bits that exist: {bit_names(caps.efer_supported, Efer)}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.stderr.write("usage: python -m emu.vmx_caps --markdown\n")
        sys.exit(2)
    sys.stdout.write(markdown())
