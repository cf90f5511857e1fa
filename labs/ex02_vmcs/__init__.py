"""Exercise 2: a VMCS and the first VM entry: the VMCS region, controls adjusted by the capability MSRs, guest and host state, VMLAUNCH and its failure."""
from __future__ import annotations

from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import EntryControls, ExitControls, PrimaryProcessorControls, SecondaryProcessorControls
from emu.vmx_defs import VmInstructionError
from tools.lab import checks, material, monitor_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 2
GUEST_RESULT = 0x9000                     # guest-physical: where the guest stores its result
GUEST_MULTIPLIER = 0x9E37_79B9_7F4A_7C15  # the guest's result: rol64((n * M) ^ n, R) for its number n
GUEST_ROTATION = 13
WORD_MASK = (1 << 64) - 1
GUEST = """
    push rdi                          ; the number the monitor left in RDI
    mov rax, rdi
    mov rcx, LAB_GUEST_MULTIPLIER
    imul rax, rcx
    pop rdx
    xor rax, rdx
    rol rax, LAB_GUEST_ROTATION
    mov rbx, LAB_GUEST_RESULT
    mov [rbx], rax
    hlt
"""
SETUP = monitor_run.MonitorSetup(guest=GUEST, constants={
    "LAB_GUEST_RESULT": GUEST_RESULT, "LAB_GUEST_MULTIPLIER": GUEST_MULTIPLIER,
    "LAB_GUEST_ROTATION": GUEST_ROTATION})
# The controls the exercise asks for, before adjustment (monitor.s passes them to write_control).
WANTED_CONTROLS = {
    "PIN_BASED_VM_EXEC_CONTROL": CAPS.pin_based.adjust(0),
    "CPU_BASED_VM_EXEC_CONTROL": CAPS.primary_processor.adjust(
        PrimaryProcessorControls.HLT_EXITING | PrimaryProcessorControls.ACTIVATE_SECONDARY_CONTROLS),
    "SECONDARY_VM_EXEC_CONTROL": CAPS.secondary_processor.adjust(SecondaryProcessorControls.ENABLE_EPT),
    "VM_EXIT_CONTROLS": CAPS.exit.adjust(ExitControls.HOST_ADDRESS_SPACE_SIZE),
    "VM_ENTRY_CONTROLS": CAPS.entry.adjust(EntryControls.IA32E_MODE_GUEST),
}


def guest_result(number: int) -> int:
    """What the guest stores for the number it is given."""
    mixed = ((number * GUEST_MULTIPLIER) & WORD_MASK) ^ number
    return ((mixed << GUEST_ROTATION) | (mixed >> (64 - GUEST_ROTATION))) & WORD_MASK


def _vmcs_made_current(run):
    region = run.values["vmcs_region"]
    found = checks.ram_u32(run, region)
    if found != CAPS.vmcs_revision_id:
        raise Expected(f"the revision identifier {CAPS.vmcs_revision_id:#x} in the first 4 bytes of the VMCS region "
                       f"at {region:#x}", f"{found:#x}")
    order = [event.kind for event in run.events if event.kind in ("vmclear", "vmptrld")
             and event.data["vmcs"] == region]
    if order[:2] != ["vmclear", "vmptrld"]:
        raise Expected(f"VMCLEAR, then VMPTRLD of the VMCS region {region:#x}",
                       " then ".join(order) if order else "neither")


def _controls_adjusted(run):
    region = run.values["vmcs_region"]
    for name, wanted in WANTED_CONTROLS.items():
        found = checks.vmcs_field(run, region, name)
        if found != wanted:
            raise Expected(f"{name} = {wanted:#x}: the controls asked for, with the bits the TRUE capability MSR "
                           f"requires set and those it forbids cleared", f"{found:#x}")
    eptp = checks.vmcs_field(run, region, "EPT_POINTER")
    if eptp != run.values["ept_pointer"]:
        raise Expected(f"EPT_POINTER = {run.values['ept_pointer']:#x} from the lab info block", f"{eptp:#x}")


def _guest_entered(run):
    region = run.values["vmcs_region"]
    checks.guest_entered(run, region, run.values["guest_entry"])
    rsp = checks.vmcs_field(run, region, "GUEST_RSP")
    if rsp != run.values["guest_stack"]:
        raise Expected(f"the guest's RSP back at {run.values['guest_stack']:#x} (LAB_INFO_GUEST_STACK) when it "
                       f"halted: the stack it was given", f"GUEST_RSP = {rsp:#x}")


def _host_state(run):
    region = run.values["vmcs_region"]
    handler = run.extra["image"].symbol("exit_handler")
    wanted = {"HOST_RIP": handler, "HOST_RSP": monitor_run.EXIT_STACK_TOP,
              "HOST_CR0": checks.root_register(run, "cr0"), "HOST_CR3": checks.root_register(run, "cr3"),
              "HOST_CR4": checks.root_register(run, "cr4")}
    for name, value in wanted.items():
        found = checks.vmcs_field(run, region, name)
        if found != value:
            raise Expected(f"{name} = {value:#x}", f"{found:#x}")


def _guest_result(run):
    wanted = guest_result(run.values["challenge"])
    checks.console_matches(run, rf"^guest result: {wanted:#018x}$",
                           f"'guest result: {wanted:#018x}': what the guest makes of the challenge "
                           f"{run.values['challenge']:#x} it finds in RDI")


def _launch_failure_reported(run):
    failures = [event.data["error"] for event in run.events_of("vmfail")]
    if not failures:
        raise Expected("a VMLAUNCH that failed with VMfailValid, reported (exit_handler launches a second time)",
                       run.summary())
    error = failures[-1]
    checks.console_matches(run, rf"^VMLAUNCH failed: VM-instruction error {error:#018x}$",
                           f"'VMLAUNCH failed: VM-instruction error {error:#018x}': the VM-instruction error the "
                           f"failed VMLAUNCH left ({VmInstructionError(error).name})")


EXERCISE = Exercise(
    number=NUMBER, slug="vmcs", title="A VMCS and the first VM entry",
    summary="the VMCS region, controls from the capability MSRs, guest and host state, VMLAUNCH and its errors",
    files=(monitor_run.SOURCE_FILE,),
    holes=(
        Hole(1, "Make the VMCS region the current VMCS", "SDM 25.1, 25.2, 31.3 VMCLEAR, VMPTRLD", """
A VMCS region needs the revision identifier in its first 4 bytes, as the VMXON region did (SDM
25.2); VMPTRLD fails with VM-instruction error 11 without it. "The VMLAUNCH instruction requires a
VMCS whose launch state is 'clear'" and "VMCLEAR X always makes X inactive and not current and
makes its launch state 'clear'" (SDM 25.1). Then "VMPTRLD X always makes X current and active":
every VMREAD and VMWRITE after it reads and writes this VMCS. Both take a memory operand holding
the address: [r15 + LAB_INFO_VMCS_REGION]. On failure (CF or ZF set: jbe) jump to vmcs_failed."""),
        Hole(2, "Adjust a control field by its capability MSR", "SDM A.1, A.3-A.5, 26.2.1", """
Each control field has a capability MSR: bits 31:0 are the allowed 0-settings (a 1 there means the
control must be 1), bits 63:32 the allowed 1-settings (a 0 there means it must be 0) (SDM A.3).
So: RDMSR, then EBX |= EAX and EBX &= EDX. If IA32_VMX_BASIC bit 55 (VMX_BASIC_TRUE_CONTROLS) is
1, the pin-based, primary, exit and entry controls are governed by the TRUE MSRs 0x48D-0x490
(IA32_VMX_TRUE_PINBASED_CTLS = IA32_VMX_PINBASED_CTLS + 0xC, and so on), which let you clear
default1 bits the old MSRs report as fixed (SDM A.2). The secondary controls have no TRUE MSR.
Then VMWRITE the result into field EAX. A control the MSRs forbid makes VMLAUNCH fail with error 7
(SDM 26.2.1)."""),
        Hole(3, "Write the guest-state area: a 64-bit guest", "SDM 25.4, 27.3.1", """
VM entry checks the guest state (SDM 27.3.1) and loads it. The guest is 64-bit with paging:
GUEST_CR0/CR3/CR4 and GUEST_IA32_EFER from LAB_GUEST_CR0, LAB_GUEST_CR3, LAB_GUEST_CR4,
LAB_GUEST_EFER; CS = GUEST_CODE_SELECTOR with access rights SEGMENT_CODE64_ACCESS_RIGHTS (L = 1)
and limit SEGMENT_FLAT_LIMIT; SS = GUEST_DATA_SELECTOR, SEGMENT_DATA_ACCESS_RIGHTS; DS, ES, FS, GS
and LDTR unusable (AR_UNUSABLE, bit 16); TR = GUEST_TSS_SELECTOR, a busy 64-bit TSS
(SEGMENT_TSS64_BUSY_ACCESS_RIGHTS, limit SEGMENT_TSS64_LIMIT, base LAB_GUEST_TSS); GDTR at
LAB_GUEST_GDT (limit SEGMENT_GUEST_GDT_LIMIT), IDTR at LAB_GUEST_IDT (LAB_GUEST_IDT_LIMIT); RFLAGS
= RFLAGS_FIXED1 (bit 1 is always 1); DR7 = DR7_INIT; the VMCS link pointer all ones
(VMCS_LINK_POINTER_NONE); RIP and RSP from LAB_INFO_GUEST_ENTRY and LAB_INFO_GUEST_STACK. The
VMWRITE_FIELD macro at the top of monitor.s writes one field. A wrong value makes the entry fail:
`hhr lab run` then prints the check the machine found broken."""),
        Hole(4, "Write the host-state area", "SDM 25.5, 27.2.2, 27.2.3, 28.5", """
At every VM exit the processor loads the host state (SDM 28.5): HOST_CR0, HOST_CR3 and HOST_CR4
(copy the current control registers), HOST_RSP (the exit handler's stack: LAB_EXIT_STACK_TOP) and
HOST_RIP (where root code continues: the address of exit_handler, `lea rcx, [rip +
exit_handler]`). The host CS and TR selectors must not be 0 (SDM 27.2.3). This machine's root code
has no GDT and an exit loads no selectors (docs/machine.md 7.9.3), so give the guest's:
GUEST_CODE_SELECTOR for CS, GUEST_DATA_SELECTOR for SS, GUEST_TSS_SELECTOR for TR. The
VMWRITE_FIELD macro changes RAX and RBX: keep values in another register."""),
        Hole(5, "VMLAUNCH, and on failure read the VM-instruction error", "SDM 31.3 VMLAUNCH, 31.4, 27.1", """
VM entry loads no general register (SDM 27.3): the guest starts with whatever is in them. The
guest reads its number from RDI: put [r15 + LAB_INFO_CHALLENGE] there, then VMLAUNCH. A VMLAUNCH
that succeeds never falls through: the next instruction runs only when it failed. CF = 1 is
VMfailInvalid (no current VMCS: jump to launch_failed_invalid); ZF = 1 is VMfailValid and the
reason is in the VM_INSTRUCTION_ERROR field (VMCS_FIELD_VM_INSTRUCTION_ERROR, SDM 31.4): VMREAD it
into RAX (`vmread rax, rcx` with the field's encoding in RCX) and jump to launch_failed, which
prints it. (A guest-state check failure is not a VMfail: the processor "exits" to HOST_RIP with
bit 31 of the exit reason set, SDM 27.8.)"""),
    ),
    tests=(
        Test("vmcs", 10, "E#2-1", "VMCS region: revision, VMCLEAR, VMPTRLD", _vmcs_made_current),
        Test("controls", 10, "E#2-2", "controls adjusted by the TRUE capability MSRs", _controls_adjusted),
        Test("guest-state", 10, "E#2-3", "VMLAUNCH entered the 64-bit guest", _guest_entered),
        Test("host-state", 10, "E#2-4", "host state: exits come to exit_handler", _host_state),
        Test("guest-result", 10, "E#2-5", "the guest got its number in RDI", _guest_result),
        Test("error-reported", 5, "E#2-5", "a failed VMLAUNCH reports its error", _launch_failure_reported),
    ),
    mistakes=(
        Mistake("E#2-1", "    vmclear [r15 + LAB_INFO_VMCS_REGION]\n    jbe vmcs_failed\n", "", ("vmcs",),
                "VMPTRLD without VMCLEAR first"),
        Mistake("E#2-2", "    add ecx, IA32_VMX_TRUE_PINBASED_CTLS - IA32_VMX_PINBASED_CTLS\n", "", ("controls",),
                "the old capability MSRs although IA32_VMX_BASIC bit 55 is 1: default1 exits stay set"),
        Mistake("E#2-2", "    or ebx, eax ", "    or ebx, 0 ", ("controls", "guest-state", "guest-result"),
                "the bits the capability MSR requires left out: VMLAUNCH fails with error 7"),
        Mistake("E#2-3", "VMCS_FIELD_GUEST_RSP, [r15 + LAB_INFO_GUEST_STACK]",
                "VMCS_FIELD_GUEST_RSP, [r15 + LAB_INFO_GUEST_ENTRY]", ("guest-state",),
                "the guest's stack pointer taken from the wrong field"),
        Mistake("E#2-3", "SEGMENT_TSS64_BUSY_ACCESS_RIGHTS", "SEGMENT_TSS64_AVAILABLE_ACCESS_RIGHTS",
                ("guest-state", "guest-result", "error-reported"),
                "an available TSS in TR: the entry fails a guest-state check"),
        Mistake("E#2-4", "VMCS_FIELD_HOST_RSP, LAB_EXIT_STACK_TOP", "VMCS_FIELD_HOST_RSP, rsp", ("host-state",),
                "the exit handler given the monitor's own stack"),
        Mistake("E#2-5", "mov rdi, [r15 + LAB_INFO_CHALLENGE]", "mov rdi, [r15 + LAB_INFO_SEED]", ("guest-result",),
                "the guest given the seed instead of the challenge"),
        Mistake("E#2-5", "mov ecx, VMCS_FIELD_VM_INSTRUCTION_ERROR", "mov ecx, VMCS_FIELD_VM_EXIT_REASON",
                ("error-reported",), "the exit reason read instead of the VM-instruction error"),
    ),
    prepare=material.prepare_monitor,
    run=lambda exercise, directory, seed: monitor_run.run(exercise, directory, seed, SETUP),
    includes=("support.inc", "vmx_on.inc"),
)
