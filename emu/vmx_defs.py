"""Named VMX architectural constants: control bits, exit reasons, VM-instruction errors, field formats.

Everything here is a number the Intel SDM defines, given the SDM's name, plus what our machine
adds (exit reasons VMCALLR = 96 and GUEST_CANNOT_CONTINUE = 97). Bit definitions are IntEnum members, so `value & Cr0.PG` and
`value & ~Cr0.PG` are plain integer arithmetic (an IntFlag's `~` would drop undefined bits).
Section numbers cite the current SDM (Vol. 3C: VMCS = Chapter 25, VM entries = 27, VM exits = 28,
EPT = 29, VMX instructions = 31; Vol. 3D appendices).
Run `python -m emu.vmx_defs --markdown` for the exit-reason and error tables.
"""

from __future__ import annotations

import enum
import sys


def bit_names(value: int, flags: type[enum.IntEnum]) -> str:
    """Space-separated names of the members of `flags` set in `value` ("PE NE PG")."""
    return " ".join(member.name for member in flags if member.value & value)


def unnamed_bits(value: int, flags: type[enum.IntEnum]) -> int:
    """The bits of `value` that no member of `flags` names."""
    return value & ~sum(member.value for member in flags)


# --- Operand widths (SDM Vol. 1 4.1): the masks of a word, a doubleword and a quadword ---------

U16_MASK = 0xFFFF
U32_MASK = 0xFFFF_FFFF
U64_MASK = 0xFFFF_FFFF_FFFF_FFFF


# --- VM-execution, VM-exit and VM-entry controls (SDM Vol. 3C 25.6, 25.7, 25.8) ----------------

class PinBasedControls(enum.IntEnum):
    """Pin-based VM-execution controls. See: SDM Vol. 3C 25.6.1."""

    EXTERNAL_INTERRUPT_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    ACTIVATE_VMX_PREEMPTION_TIMER = 1 << 6
    PROCESS_POSTED_INTERRUPTS = 1 << 7


class PrimaryProcessorControls(enum.IntEnum):
    """Primary processor-based VM-execution controls. See: SDM Vol. 3C 25.6.2."""

    INTERRUPT_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    USE_TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCONDITIONAL_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryProcessorControls(enum.IntEnum):
    """Secondary processor-based VM-execution controls. See: SDM Vol. 3C 25.6.2."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESCRIPTOR_TABLE_EXITING = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC_MODE = 1 << 4
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRTUALIZATION = 1 << 8
    VIRTUAL_INTERRUPT_DELIVERY = 1 << 9
    PAUSE_LOOP_EXITING = 1 << 10
    RDRAND_EXITING = 1 << 11
    ENABLE_INVPCID = 1 << 12
    ENABLE_VM_FUNCTIONS = 1 << 13
    VMCS_SHADOWING = 1 << 14
    ENABLE_ENCLS_EXITING = 1 << 15
    RDSEED_EXITING = 1 << 16
    ENABLE_PML = 1 << 17
    EPT_VIOLATION_VE = 1 << 18
    CONCEAL_VMX_FROM_PT = 1 << 19
    ENABLE_XSAVES_XRSTORS = 1 << 20
    MODE_BASED_EXECUTE_CONTROL_FOR_EPT = 1 << 22
    SUB_PAGE_WRITE_PERMISSIONS_FOR_EPT = 1 << 23
    PT_USES_GUEST_PHYSICAL_ADDRESSES = 1 << 24
    USE_TSC_SCALING = 1 << 25
    ENABLE_USER_WAIT_AND_PAUSE = 1 << 26


class ExitControls(enum.IntEnum):
    """Primary VM-exit controls. See: SDM Vol. 3C 25.7.1."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDRESS_SPACE_SIZE = 1 << 9
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12
    ACKNOWLEDGE_INTERRUPT_ON_EXIT = 1 << 15
    SAVE_IA32_PAT = 1 << 18
    LOAD_IA32_PAT = 1 << 19
    SAVE_IA32_EFER = 1 << 20
    LOAD_IA32_EFER = 1 << 21
    SAVE_VMX_PREEMPTION_TIMER_VALUE = 1 << 22
    CLEAR_IA32_BNDCFGS = 1 << 23
    CONCEAL_VMX_FROM_PT = 1 << 24


class EntryControls(enum.IntEnum):
    """VM-entry controls. See: SDM Vol. 3C 25.8.1."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE_GUEST = 1 << 9
    ENTRY_TO_SMM = 1 << 10
    DEACTIVATE_DUAL_MONITOR_TREATMENT = 1 << 11
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_IA32_PAT = 1 << 14
    LOAD_IA32_EFER = 1 << 15
    LOAD_IA32_BNDCFGS = 1 << 16
    CONCEAL_VMX_FROM_PT = 1 << 17


# "Default1" controls: reported as must-be-1 by the non-TRUE capability MSRs. See: SDM Appendix A.2.
PIN_BASED_DEFAULT1 = 0x0000_0016
PRIMARY_PROCESSOR_DEFAULT1 = 0x0401_E172
EXIT_DEFAULT1 = 0x0003_6DFF
ENTRY_DEFAULT1 = 0x0000_11FF


# --- Basic exit reasons (SDM Vol. 3D Appendix C) ----------------------------------------------

class ExitReason(enum.IntEnum):
    """Basic exit reasons (bits 15:0 of the exit-reason field). See: SDM Vol. 3D Appendix C."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT = 3
    SIPI = 4
    IO_SMI = 5
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMXOFF = 26
    VMXON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    RDMSR = 31
    WRMSR = 32
    INVALID_GUEST_STATE = 33
    MSR_LOADING = 34
    MWAIT = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR = 39
    PAUSE = 40
    MACHINE_CHECK_DURING_ENTRY = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    VIRTUALIZED_EOI = 45
    GDTR_IDTR_ACCESS = 46
    LDTR_TR_ACCESS = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64
    PCONFIG = 65
    SPP_EVENT = 66
    UMWAIT = 67
    TPAUSE = 68
    LOADIWKEY = 69
    # Machine-specific: VMCALLR (inverse hypercall) executed in VMX non-root operation.
    VMCALLR = 96
    # Machine-specific: the emulator cannot go on with this guest (qualification: Unicorn's error).
    GUEST_CANNOT_CONTINUE = 97


EXIT_REASON_DESCRIPTIONS: dict[ExitReason, str] = {
    ExitReason.EXCEPTION_NMI: "Exception or non-maskable interrupt (NMI)",
    ExitReason.EXTERNAL_INTERRUPT: "External interrupt",
    ExitReason.TRIPLE_FAULT: "Triple fault",
    ExitReason.INIT: "INIT signal",
    ExitReason.SIPI: "Start-up IPI (SIPI)",
    ExitReason.IO_SMI: "I/O system-management interrupt (SMI)",
    ExitReason.OTHER_SMI: "Other SMI",
    ExitReason.INTERRUPT_WINDOW: "Interrupt window",
    ExitReason.NMI_WINDOW: "NMI window",
    ExitReason.TASK_SWITCH: "Task switch",
    ExitReason.CPUID: "CPUID",
    ExitReason.GETSEC: "GETSEC",
    ExitReason.HLT: "HLT",
    ExitReason.INVD: "INVD",
    ExitReason.INVLPG: "INVLPG",
    ExitReason.RDPMC: "RDPMC",
    ExitReason.RDTSC: "RDTSC",
    ExitReason.RSM: "RSM in SMM",
    ExitReason.VMCALL: "VMCALL",
    ExitReason.VMCLEAR: "VMCLEAR",
    ExitReason.VMLAUNCH: "VMLAUNCH",
    ExitReason.VMPTRLD: "VMPTRLD",
    ExitReason.VMPTRST: "VMPTRST",
    ExitReason.VMREAD: "VMREAD",
    ExitReason.VMRESUME: "VMRESUME",
    ExitReason.VMWRITE: "VMWRITE",
    ExitReason.VMXOFF: "VMXOFF",
    ExitReason.VMXON: "VMXON",
    ExitReason.CR_ACCESS: "Control-register accesses",
    ExitReason.DR_ACCESS: "MOV DR",
    ExitReason.IO_INSTRUCTION: "I/O instruction",
    ExitReason.RDMSR: "RDMSR",
    ExitReason.WRMSR: "WRMSR",
    ExitReason.INVALID_GUEST_STATE: "VM-entry failure due to invalid guest state",
    ExitReason.MSR_LOADING: "VM-entry failure due to MSR loading",
    ExitReason.MWAIT: "MWAIT",
    ExitReason.MONITOR_TRAP_FLAG: "Monitor trap flag",
    ExitReason.MONITOR: "MONITOR",
    ExitReason.PAUSE: "PAUSE",
    ExitReason.MACHINE_CHECK_DURING_ENTRY: "VM-entry failure due to machine-check event",
    ExitReason.TPR_BELOW_THRESHOLD: "TPR below threshold",
    ExitReason.APIC_ACCESS: "APIC access",
    ExitReason.VIRTUALIZED_EOI: "Virtualized EOI",
    ExitReason.GDTR_IDTR_ACCESS: "Access to GDTR or IDTR",
    ExitReason.LDTR_TR_ACCESS: "Access to LDTR or TR",
    ExitReason.EPT_VIOLATION: "EPT violation",
    ExitReason.EPT_MISCONFIG: "EPT misconfiguration",
    ExitReason.INVEPT: "INVEPT",
    ExitReason.RDTSCP: "RDTSCP",
    ExitReason.PREEMPTION_TIMER: "VMX-preemption timer expired",
    ExitReason.INVVPID: "INVVPID",
    ExitReason.WBINVD: "WBINVD or WBNOINVD",
    ExitReason.XSETBV: "XSETBV",
    ExitReason.APIC_WRITE: "APIC write",
    ExitReason.RDRAND: "RDRAND",
    ExitReason.INVPCID: "INVPCID",
    ExitReason.VMFUNC: "VMFUNC",
    ExitReason.ENCLS: "ENCLS",
    ExitReason.RDSEED: "RDSEED",
    ExitReason.PML_FULL: "Page-modification log full",
    ExitReason.XSAVES: "XSAVES",
    ExitReason.XRSTORS: "XRSTORS",
    ExitReason.PCONFIG: "PCONFIG",
    ExitReason.SPP_EVENT: "SPP-related event",
    ExitReason.UMWAIT: "UMWAIT",
    ExitReason.TPAUSE: "TPAUSE",
    ExitReason.LOADIWKEY: "LOADIWKEY",
    ExitReason.VMCALLR: "VMCALLR (inverse hypercall) in VMX non-root operation (machine-specific)",
    ExitReason.GUEST_CANNOT_CONTINUE: "the emulator cannot continue the guest; qualification = Unicorn "
                                      "error number (machine-specific)",
}

# Exit-reason field format. See: SDM Vol. 3C 25.9.1.
# The MSR bitmap (SDM Vol. 3C 25.6.9): four 1 KiB parts, read then write, each with a bit per MSR
# of 00000000H-00001FFFH (low) or C0000000H-C0001FFFH (high).
MSR_BITMAP_RANGE = 0x2000
MSR_BITMAP_LOW_FIRST = 0x0000_0000
MSR_BITMAP_HIGH_FIRST = 0xC000_0000
MSR_BITMAP_LOW_PART = 0
MSR_BITMAP_HIGH_PART = 1024
MSR_BITMAP_WRITE_PARTS = 2048

# Machine-specific VM-instruction errors of VMCALLR (above Intel's 1..28; docs/machine.md 8.4).
VMCALLR_NOT_LAUNCHED = 64
VMCALLR_NO_ENTRY_POINT = 65
VMCALLR_ALREADY_IN_PROGRESS = 66
VMCALLR_ENDED_BY_VM_EXIT = 67

EXIT_REASON_BASIC_MASK = 0xFFFF
EXIT_REASON_VM_ENTRY_FAILURE = 1 << 31


# --- VM-instruction error numbers (SDM Vol. 3C 31.4) ------------------------------------------

class VmInstructionError(enum.IntEnum):
    """VM-instruction error numbers. See: SDM Vol. 3C 31.4."""

    VMCALL_IN_VMX_ROOT = 1
    VMCLEAR_INVALID_ADDRESS = 2
    VMCLEAR_VMXON_POINTER = 3
    VMLAUNCH_NONCLEAR_VMCS = 4
    VMRESUME_NONLAUNCHED_VMCS = 5
    VMRESUME_AFTER_VMXOFF = 6
    ENTRY_INVALID_CONTROL_FIELD = 7
    ENTRY_INVALID_HOST_STATE_FIELD = 8
    VMPTRLD_INVALID_ADDRESS = 9
    VMPTRLD_VMXON_POINTER = 10
    VMPTRLD_INCORRECT_REVISION_ID = 11
    UNSUPPORTED_VMCS_COMPONENT = 12
    VMWRITE_READ_ONLY_COMPONENT = 13
    RESERVED_14 = 14
    VMXON_IN_VMX_ROOT = 15
    ENTRY_INVALID_EXECUTIVE_VMCS_POINTER = 16
    ENTRY_NONLAUNCHED_EXECUTIVE_VMCS = 17
    ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER = 18
    VMCALL_NONCLEAR_VMCS = 19
    VMCALL_INVALID_EXIT_CONTROL_FIELDS = 20
    RESERVED_21 = 21
    VMCALL_INCORRECT_MSEG_REVISION_ID = 22
    VMXOFF_UNDER_DUAL_MONITOR = 23
    VMCALL_INVALID_SMM_MONITOR_FEATURES = 24
    ENTRY_INVALID_EXECUTIVE_VMCS_CONTROLS = 25
    ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26
    RESERVED_27 = 27
    INVALID_INVEPT_INVVPID_OPERAND = 28

    @property
    def message(self) -> str:
        return VM_INSTRUCTION_ERROR_MESSAGES[self]


VM_INSTRUCTION_ERROR_MESSAGES: dict[VmInstructionError, str] = {
    VmInstructionError.VMCALL_IN_VMX_ROOT: "VMCALL executed in VMX root operation",
    VmInstructionError.VMCLEAR_INVALID_ADDRESS: "VMCLEAR with invalid physical address",
    VmInstructionError.VMCLEAR_VMXON_POINTER: "VMCLEAR with VMXON pointer",
    VmInstructionError.VMLAUNCH_NONCLEAR_VMCS: "VMLAUNCH with non-clear VMCS",
    VmInstructionError.VMRESUME_NONLAUNCHED_VMCS: "VMRESUME with non-launched VMCS",
    VmInstructionError.VMRESUME_AFTER_VMXOFF:
        "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)",
    VmInstructionError.ENTRY_INVALID_CONTROL_FIELD: "VM entry with invalid control field(s)",
    VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD: "VM entry with invalid host-state field(s)",
    VmInstructionError.VMPTRLD_INVALID_ADDRESS: "VMPTRLD with invalid physical address",
    VmInstructionError.VMPTRLD_VMXON_POINTER: "VMPTRLD with VMXON pointer",
    VmInstructionError.VMPTRLD_INCORRECT_REVISION_ID: "VMPTRLD with incorrect VMCS revision identifier",
    VmInstructionError.UNSUPPORTED_VMCS_COMPONENT: "VMREAD/VMWRITE from/to unsupported VMCS component",
    VmInstructionError.VMWRITE_READ_ONLY_COMPONENT: "VMWRITE to read-only VMCS component",
    VmInstructionError.RESERVED_14: "Reserved",
    VmInstructionError.VMXON_IN_VMX_ROOT: "VMXON executed in VMX root operation",
    VmInstructionError.ENTRY_INVALID_EXECUTIVE_VMCS_POINTER: "VM entry with invalid executive-VMCS pointer",
    VmInstructionError.ENTRY_NONLAUNCHED_EXECUTIVE_VMCS: "VM entry with non-launched executive VMCS",
    VmInstructionError.ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER:
        "VM entry with executive-VMCS pointer not VMXON pointer (when attempting to deactivate "
        "the dual-monitor treatment of SMIs and SMM)",
    VmInstructionError.VMCALL_NONCLEAR_VMCS:
        "VMCALL with non-clear VMCS (when attempting to activate the dual-monitor treatment of "
        "SMIs and SMM)",
    VmInstructionError.VMCALL_INVALID_EXIT_CONTROL_FIELDS: "VMCALL with invalid VM-exit control fields",
    VmInstructionError.RESERVED_21: "Reserved",
    VmInstructionError.VMCALL_INCORRECT_MSEG_REVISION_ID:
        "VMCALL with incorrect MSEG revision identifier (when attempting to activate the "
        "dual-monitor treatment of SMIs and SMM)",
    VmInstructionError.VMXOFF_UNDER_DUAL_MONITOR: "VMXOFF under dual-monitor treatment of SMIs and SMM",
    VmInstructionError.VMCALL_INVALID_SMM_MONITOR_FEATURES:
        "VMCALL with invalid SMM-monitor features (when attempting to activate the dual-monitor "
        "treatment of SMIs and SMM)",
    VmInstructionError.ENTRY_INVALID_EXECUTIVE_VMCS_CONTROLS:
        "VM entry with invalid VM-execution control fields in executive VMCS (when attempting to "
        "return from SMM)",
    VmInstructionError.ENTRY_EVENTS_BLOCKED_BY_MOV_SS: "VM entry with events blocked by MOV SS",
    VmInstructionError.RESERVED_27: "Reserved",
    VmInstructionError.INVALID_INVEPT_INVVPID_OPERAND: "Invalid operand to INVEPT/INVVPID",
}


# --- Exit qualification of VM-entry failures (SDM Vol. 3C 27.8) --------------------------------

class EntryFailureQualification(enum.IntEnum):
    """Exit qualification of a VM-entry failure due to invalid guest state. See: SDM Vol. 3C 27.8."""

    DEFAULT = 0
    PDPTE_LOADING = 2
    NMI_INJECTION_BLOCKED_BY_STI = 3
    VMCS_LINK_POINTER = 4


# --- Interruption-information format (SDM Vol. 3C 25.8.3, 25.9.2, 25.9.3) ---------------------

INTR_INFO_VECTOR_MASK = 0xFF
INTR_INFO_TYPE_SHIFT = 8
INTR_INFO_TYPE_MASK = 0x7 << INTR_INFO_TYPE_SHIFT
INTR_INFO_DELIVER_ERROR_CODE = 1 << 11
INTR_INFO_NMI_UNBLOCKING_DUE_TO_IRET = 1 << 12     # exit interruption information only
INTR_INFO_VALID = 1 << 31
INTR_INFO_ENTRY_RESERVED_BITS = 0x7FFF_F000        # bits 30:12 of the VM-entry field


class InterruptionType(enum.IntEnum):
    """Interruption type, bits 10:8 of an interruption-information field. See: SDM Vol. 3C 25.8.3."""

    EXTERNAL_INTERRUPT = 0
    RESERVED = 1
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4
    PRIVILEGED_SOFTWARE_EXCEPTION = 5
    SOFTWARE_EXCEPTION = 6
    OTHER_EVENT = 7


def make_interruption_info(vector: int, interruption_type: InterruptionType,
                           deliver_error_code: bool = False, valid: bool = True) -> int:
    """Compose an interruption-information value (VM-entry, VM-exit or IDT-vectoring format)."""
    return ((vector & INTR_INFO_VECTOR_MASK)
            | (int(interruption_type) << INTR_INFO_TYPE_SHIFT)
            | (INTR_INFO_DELIVER_ERROR_CODE if deliver_error_code else 0)
            | (INTR_INFO_VALID if valid else 0))


def interruption_type(info: int) -> InterruptionType:
    return InterruptionType((info & INTR_INFO_TYPE_MASK) >> INTR_INFO_TYPE_SHIFT)


# Exception vectors. See: SDM Vol. 3A "Exception and Interrupt Vectors".
class ExceptionVector(enum.IntEnum):
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20


# Exceptions that push an error code (without CET). See: SDM Vol. 3C 27.2.1.3.
EXCEPTIONS_WITH_ERROR_CODE = frozenset({ExceptionVector.DF, ExceptionVector.TS, ExceptionVector.NP,
                                        ExceptionVector.SS, ExceptionVector.GP, ExceptionVector.PF,
                                        ExceptionVector.AC})
HIGHEST_EXCEPTION_VECTOR = 31
FIRST_DEVICE_VECTOR = HIGHEST_EXCEPTION_VECTOR + 1   # vectors 0-31 are exceptions (SDM Vol. 3A 6.3.1)
MAX_INSTRUCTION_LENGTH = 15


# --- Exit qualifications (SDM Vol. 3C 28.2.1) --------------------------------------------------

# Control-register accesses. See: SDM Table 28-3.
CR_QUAL_REGISTER_MASK = 0xF
CR_QUAL_ACCESS_TYPE_SHIFT = 4
CR_QUAL_ACCESS_TYPE_MASK = 0x3 << CR_QUAL_ACCESS_TYPE_SHIFT
CR_QUAL_LMSW_MEMORY_OPERAND = 1 << 6
CR_QUAL_GPR_SHIFT = 8
CR_QUAL_GPR_MASK = 0xF << CR_QUAL_GPR_SHIFT
CR_QUAL_LMSW_SOURCE_SHIFT = 16


class CrAccessType(enum.IntEnum):
    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


# I/O instructions. See: SDM Table 28-5.
IO_QUAL_SIZE_MASK = 0x7                 # 0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes
IO_QUAL_DIRECTION_IN = 1 << 3           # 0 = OUT, 1 = IN
IO_QUAL_STRING = 1 << 4
IO_QUAL_REP = 1 << 5
IO_QUAL_IMMEDIATE_OPERAND = 1 << 6      # 0 = port in DX, 1 = immediate
IO_QUAL_PORT_SHIFT = 16
IO_QUAL_PORT_MASK = 0xFFFF << IO_QUAL_PORT_SHIFT


def make_io_qualification(port: int, size: int, is_in: bool, string: bool = False,
                          rep: bool = False, immediate: bool = False) -> int:
    """Exit qualification of an I/O-instruction VM exit; `size` is the access size in bytes (1, 2, 4)."""
    return (((size - 1) & IO_QUAL_SIZE_MASK)
            | (IO_QUAL_DIRECTION_IN if is_in else 0)
            | (IO_QUAL_STRING if string else 0)
            | (IO_QUAL_REP if rep else 0)
            | (IO_QUAL_IMMEDIATE_OPERAND if immediate else 0)
            | ((port & 0xFFFF) << IO_QUAL_PORT_SHIFT))


# EPT violations. See: SDM Table 28-7.
EPT_QUAL_DATA_READ = 1 << 0
EPT_QUAL_DATA_WRITE = 1 << 1
EPT_QUAL_INSTRUCTION_FETCH = 1 << 2
EPT_QUAL_READABLE = 1 << 3
EPT_QUAL_WRITEABLE = 1 << 4
EPT_QUAL_EXECUTABLE = 1 << 5
EPT_QUAL_PERMISSIONS_SHIFT = 3          # bits 5:3 = R/W/X of the EPT entries, ANDed over the walk
EPT_QUAL_GUEST_LINEAR_ADDRESS_VALID = 1 << 7
EPT_QUAL_TRANSLATED_ACCESS = 1 << 8     # meaningful if bit 7 is 1: access to the final translation
EPT_QUAL_NMI_UNBLOCKING_DUE_TO_IRET = 1 << 12


# --- Guest non-register state (SDM Vol. 3C 25.4.2) ---------------------------------------------

class ActivityState(enum.IntEnum):
    ACTIVE = 0
    HLT = 1
    SHUTDOWN = 2
    WAIT_FOR_SIPI = 3


class Interruptibility(enum.IntEnum):
    """Interruptibility-state bits. See: SDM Vol. 3C 25.4.2."""

    BLOCKING_BY_STI = 1 << 0
    BLOCKING_BY_MOV_SS = 1 << 1
    BLOCKING_BY_SMI = 1 << 2
    BLOCKING_BY_NMI = 1 << 3
    ENCLAVE_INTERRUPTION = 1 << 4


# Pending debug exceptions. See: SDM Vol. 3C 25.4.2.
PENDING_DBG_B0_B3_MASK = 0xF
PENDING_DBG_ENABLED_BREAKPOINT = 1 << 12
PENDING_DBG_BS = 1 << 14
PENDING_DBG_RTM = 1 << 16

VMCS_LINK_POINTER_NONE = 0xFFFF_FFFF_FFFF_FFFF


# --- Memory types, EPT and EPTP (SDM Vol. 3C 25.6.11, 29.3) -----------------------------------

class MemoryType(enum.IntEnum):
    """Memory types of PAT, MTRRs, EPT and IA32_VMX_BASIC. See: SDM Vol. 3A "Page Attribute Table"."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6
    UC_MINUS = 7   # PAT only


PAT_VALID_MEMORY_TYPES = frozenset(int(memory_type) for memory_type in MemoryType)
PAT_ENTRY_COUNT = 8
PAT_ENTRY_BITS = 8

# EPT paging-structure entries. See: SDM Vol. 3C 29.3.2.
EPT_READ = 1 << 0
EPT_WRITE = 1 << 1
EPT_EXECUTE = 1 << 2
EPT_RWX_MASK = EPT_READ | EPT_WRITE | EPT_EXECUTE
EPT_MEMORY_TYPE_SHIFT = 3
EPT_MEMORY_TYPE_MASK = 0x7 << EPT_MEMORY_TYPE_SHIFT
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE_PAGE = 1 << 7
EPT_ACCESSED = 1 << 8
EPT_DIRTY = 1 << 9
EPT_USER_EXECUTE = 1 << 10
EPT_SUPPRESS_VE = 1 << 63
EPT_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000      # bits 51:12: the next table or the 4 KiB page
EPT_LEVEL_BITS = 9                           # each level translates 9 bits of the address
EPT_PML4_SHIFT = 39                          # bits 47:39 select the PML4 entry

# Extended-page-table pointer. See: SDM Vol. 3C 25.6.11.
EPTP_MEMORY_TYPE_MASK = 0x7
EPTP_WALK_LENGTH_SHIFT = 3
EPTP_WALK_LENGTH_MASK = 0x7 << EPTP_WALK_LENGTH_SHIFT     # page-walk length minus 1
EPTP_AD_ENABLE = 1 << 6
EPTP_RESERVED_LOW_BITS = 0xF80                            # bits 11:7 (no supervisor shadow stacks)
EPT_WALK_LENGTH_4 = 4
PAGE_SIZE = 4096
PAGE_OFFSET_MASK = PAGE_SIZE - 1


def make_eptp(pml4_address: int, memory_type: MemoryType = MemoryType.WB,
              walk_length: int = EPT_WALK_LENGTH_4, accessed_dirty: bool = False) -> int:
    """Compose an EPTP value from the 4 KiB-aligned address of the EPT PML4 table."""
    return ((pml4_address & ~PAGE_OFFSET_MASK)
            | int(memory_type)
            | ((walk_length - 1) << EPTP_WALK_LENGTH_SHIFT)
            | (EPTP_AD_ENABLE if accessed_dirty else 0))


class InveptType(enum.IntEnum):
    SINGLE_CONTEXT = 1
    ALL_CONTEXT = 2


class InvvpidType(enum.IntEnum):
    INDIVIDUAL_ADDRESS = 0
    SINGLE_CONTEXT = 1
    ALL_CONTEXT = 2
    SINGLE_CONTEXT_RETAINING_GLOBALS = 3


# --- Segment selectors and VMCS access-rights format (SDM Vol. 3C 25.4.1) ---------

SELECTOR_RPL_MASK = 0x3
SELECTOR_TI = 1 << 2

AR_TYPE_MASK = 0xF
AR_S = 1 << 4                   # 1 = code or data segment, 0 = system segment
AR_DPL_SHIFT = 5
AR_DPL_MASK = 0x3 << AR_DPL_SHIFT
AR_P = 1 << 7
AR_RESERVED_11_8 = 0xF << 8
AR_AVL = 1 << 12
AR_L = 1 << 13
AR_DB = 1 << 14
AR_G = 1 << 15
AR_UNUSABLE = 1 << 16
AR_RESERVED_31_17 = 0xFFFE_0000

# Type field bits of code/data segments. See: SDM Vol. 3A 3.4.5.1.
SEGMENT_TYPE_ACCESSED = 1 << 0
SEGMENT_TYPE_READABLE_OR_WRITABLE = 1 << 1   # readable (code) / writable (data)
SEGMENT_TYPE_CONFORMING_OR_EXPAND_DOWN = 1 << 2
SEGMENT_TYPE_CODE = 1 << 3
# System-segment types. See: SDM Vol. 3A 3.5.
SYSTEM_TYPE_LDT = 2
SYSTEM_TYPE_BUSY_TSS16 = 3
SYSTEM_TYPE_BUSY_TSS = 11        # 32-bit busy TSS, or 64-bit busy TSS in IA-32e mode

LIMIT_LOW_12_BITS = 0xFFF
LIMIT_HIGH_12_BITS = 0xFFF0_0000
DESCRIPTOR_TABLE_LIMIT_MAX = 0xFFFF


# --- Control registers, EFER and RFLAGS (SDM Vol. 3A 2.5, 2.2.1; Vol. 1 3.4.3) ----------------

class Cr0(enum.IntEnum):
    PE = 1 << 0
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31


class Cr4(enum.IntEnum):
    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23


class Efer(enum.IntEnum):
    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


# Architectural MSR index of IA32_EFER. See: SDM Vol. 4 Table 2-2.
MSR_IA32_EFER = 0xC000_0080


class Rflags(enum.IntEnum):
    CF = 1 << 0
    FIXED1 = 1 << 1
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    IOPL = 3 << 12
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21


# The status flags: VMX instructions report success and failure in them (SDM Vol. 3C 31.2), and
# RDRAND/RDSEED clear all but CF (SDM Vol. 2B RDRAND).
RFLAGS_ARITHMETIC = Rflags.CF | Rflags.PF | Rflags.AF | Rflags.ZF | Rflags.SF | Rflags.OF

# Bits 63:22, 15, 5 and 3 are reserved (0); bit 1 is reserved (1). See: SDM Vol. 3C 27.3.1.4.
RFLAGS_RESERVED_ZERO = 0xFFFF_FFFF_FFC0_8028

IA32_DEBUGCTL_BTF = 1 << 1
DR7_HIGH_MASK = 0xFFFF_FFFF_0000_0000


# --- VMX capability MSRs (SDM Vol. 3D Appendix A) ----------------------------------------------

IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_MISC = 0x485
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR0_FIXED1 = 0x487
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_CR4_FIXED1 = 0x489
IA32_VMX_VMCS_ENUM = 0x48A
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_EPT_VPID_CAP = 0x48C
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
IA32_VMX_VMFUNC = 0x491

# IA32_VMX_BASIC. See: SDM Appendix A.1.
VMX_BASIC_REVISION_MASK = 0x7FFF_FFFF
VMX_BASIC_REGION_SIZE_SHIFT = 32
VMX_BASIC_32BIT_ADDRESSES = 1 << 48
VMX_BASIC_DUAL_MONITOR = 1 << 49
VMX_BASIC_MEMORY_TYPE_SHIFT = 50
VMX_BASIC_INS_OUTS_INFO = 1 << 54
VMX_BASIC_TRUE_CONTROLS = 1 << 55
VMX_BASIC_NO_ERROR_CODE_CHECK = 1 << 56

# IA32_VMX_MISC. See: SDM Appendix A.6.
VMX_MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F
VMX_MISC_SAVES_EFER_LMA = 1 << 5
VMX_MISC_ACTIVITY_HLT = 1 << 6
VMX_MISC_ACTIVITY_SHUTDOWN = 1 << 7
VMX_MISC_ACTIVITY_WAIT_FOR_SIPI = 1 << 8
VMX_MISC_CR3_TARGET_COUNT_SHIFT = 16
VMX_MISC_MSR_LIST_LIMIT_SHIFT = 25
VMX_MISC_MSR_LIST_UNIT = 512            # recommended maximum = 512 * (N + 1)
VMX_MISC_VMWRITE_ANY_FIELD = 1 << 29
VMX_MISC_ZERO_LENGTH_INJECTION = 1 << 30

# IA32_VMX_EPT_VPID_CAP. See: SDM Appendix A.10.
EPT_CAP_EXECUTE_ONLY = 1 << 0
EPT_CAP_WALK_LENGTH_4 = 1 << 6
EPT_CAP_WALK_LENGTH_5 = 1 << 7
EPT_CAP_MEMORY_TYPE_UC = 1 << 8
EPT_CAP_MEMORY_TYPE_WB = 1 << 14
EPT_CAP_PDE_2MB_PAGES = 1 << 16
EPT_CAP_PDPTE_1GB_PAGES = 1 << 17
EPT_CAP_INVEPT = 1 << 20
EPT_CAP_ACCESSED_DIRTY = 1 << 21
EPT_CAP_ADVANCED_EXIT_INFO = 1 << 22
EPT_CAP_INVEPT_SINGLE_CONTEXT = 1 << 25
EPT_CAP_INVEPT_ALL_CONTEXT = 1 << 26
VPID_CAP_INVVPID = 1 << 32
VPID_CAP_INDIVIDUAL_ADDRESS = 1 << 40
VPID_CAP_SINGLE_CONTEXT = 1 << 41
VPID_CAP_ALL_CONTEXT = 1 << 42
VPID_CAP_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43


def markdown() -> str:
    """Exit reasons and VM-instruction errors as Markdown tables."""
    lines = ["| exit reason | name | SDM description |", "|---|---|---|"]
    lines += [f"| {int(reason)} | {reason.name} | {EXIT_REASON_DESCRIPTIONS[reason]} |"
              for reason in ExitReason]
    lines += ["", f"A VM-entry failure sets bit 31 (0x{EXIT_REASON_VM_ENTRY_FAILURE:08X}) of the "
              "exit-reason field in addition to the basic reason.", "",
              "| error | name | SDM text |", "|---|---|---|"]
    lines += [f"| {int(error)} | {error.name} | {error.message} |" for error in VmInstructionError]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.stderr.write("usage: python -m emu.vmx_defs --markdown\n")
        sys.exit(2)
    sys.stdout.write(markdown())
