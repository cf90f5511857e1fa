"""Exercise 1: enter VMX operation: the VMXON region, CR0 and CR4 fixed bits, VMXON."""
from __future__ import annotations

from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.machine import CR4_AT_START
from emu.vmx_defs import Cr4
from tools.lab import checks, material, monitor_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 1
SETUP = monitor_run.MonitorSetup(harness_ept=False)


def _revision_written(run):
    region = run.values["vmxon_region"]
    found = checks.ram_u32(run, region)
    if found != CAPS.vmcs_revision_id:
        raise Expected(f"the VMCS revision identifier {CAPS.vmcs_revision_id:#x} (IA32_VMX_BASIC bits 30:0) "
                       f"in the first 4 bytes of the VMXON region at {region:#x}", f"{found:#x}")


def _control_registers(run):
    cr4 = checks.root_register(run, "cr4")
    if not cr4 & Cr4.VMXE:
        raise Expected("CR4.VMXE (bit 13) set", f"CR4 = {cr4:#x}")
    initial = CR4_AT_START
    wanted = (initial | CAPS.cr4_fixed0) & CAPS.cr4_fixed1
    if cr4 != wanted:
        raise Expected(f"CR4 = {wanted:#x}: what it held at the start ({initial:#x}) with the bits of "
                       f"IA32_VMX_CR4_FIXED0 set and those clear in IA32_VMX_CR4_FIXED1 cleared, no other change",
                       f"CR4 = {cr4:#x}")
    cr0 = checks.root_register(run, "cr0")
    if (cr0 | CAPS.cr0_fixed0) != cr0 or (cr0 & CAPS.cr0_fixed1) != cr0:
        raise Expected("CR0 within IA32_VMX_CR0_FIXED0/FIXED1", f"CR0 = {cr0:#x}")


def _vmxon_on_the_region(run):
    region = run.values["vmxon_region"]
    executed = checks.events(run, "vmxon")
    if not executed:
        raise Expected(f"VMXON executed with the VMXON region's address {region:#x}", "no VMXON")
    if executed[0].data["region"] != region:
        raise Expected(f"VMXON's operand to hold the VMXON region's address {region:#x}",
                       f"VMXON on {executed[0].data['region']:#x}")


def _outcome_reported(run):
    executed = checks.events(run, "vmxon")
    if not executed:
        raise Expected("VMXON executed and its outcome reported", "no VMXON")
    if executed[0].data["ok"]:
        checks.console_matches(run, r"^VMXON succeeded", "'VMXON succeeded' after a VMXON that succeeded")
        checks.ended_with(run, monitor_run.DONE_VALUE, "the run to end at lab_done")
    else:
        checks.console_matches(run, r"^VMXON failed", "'VMXON failed' after a VMXON that failed (CF = 1)")


EXERCISE = Exercise(
    number=NUMBER, slug="vmxon", title="Enter VMX operation",
    summary="the VMXON region and its revision identifier, CR0/CR4 fixed bits, VMXON and its outcome",
    files=(monitor_run.SOURCE_FILE,),
    holes=(
        Hole(1, "Write the VMCS revision identifier into the VMXON region", "SDM 25.11.5, A.1", """
"Before executing VMXON, software should write the VMCS revision identifier to the VMXON
region" (SDM 25.11.5); VMXON fails with VMfailInvalid otherwise. The identifier is bits 30:0 of
the IA32_VMX_BASIC MSR (SDM A.1): RDMSR with ECX = IA32_VMX_BASIC returns it in EDX:EAX, and
VMX_BASIC_REVISION_MASK keeps bits 30:0. The region's address is at [r15 + LAB_INFO_VMXON_REGION];
memory is mapped 1:1, so write the 4 bytes there. The region holds a canary until you do."""),
        Hole(2, "Set CR0 and CR4 to what VMX operation requires", "SDM 24.8, A.7, A.8", """
"In VMX operation, processors may fix certain bits in CR0 and CR4 to specific values" (SDM 24.8).
A bit set in IA32_VMX_CR0_FIXED0 must be 1 in CR0; a bit clear in IA32_VMX_CR0_FIXED1 must be 0
(SDM A.7); likewise CR4 with IA32_VMX_CR4_FIXED0/FIXED1 (SDM A.8). CR4.VMXE (CR4_VMXE) is one of
the must-be-one bits: VMXON is #UD without it, and with no IDT a #UD stops the machine with a
triple fault. So: new = (old | FIXED0) & FIXED1, for CR0 and for CR4, and change nothing else."""),
        Hole(3, "Execute VMXON and check its outcome", "SDM 31.3 VMXON, 31.2", """
VMXON takes a 64-bit memory operand that holds the VMXON region's physical address (SDM 31.3):
the lab info block already holds it, so `vmxon [r15 + LAB_INFO_VMXON_REGION]` does. VMX
instructions report failure in RFLAGS (SDM 31.2): VMfailInvalid sets CF, VMfailValid sets ZF.
VMXON outside VMX operation can only fail with VMfailInvalid: jump to vmxon_failed when CF is 1."""),
    ),
    tests=(
        Test("revision", 10, "E#1-1", "VMXON region: revision identifier", _revision_written),
        Test("control-registers", 10, "E#1-2", "CR0 and CR4 fixed bits, CR4.VMXE", _control_registers),
        Test("vmxon", 15, "E#1-3", "VMXON on the VMXON region", _vmxon_on_the_region),
        Test("outcome", 5, "E#1-3", "VMXON's outcome checked and reported", _outcome_reported),
    ),
    mistakes=(
        Mistake("E#1-1", "LAB_INFO_VMXON_REGION]\n    mov [rdi]", "LAB_INFO_VMCS_REGION]\n    mov [rdi]",
                ("revision",), "the revision identifier written into the wrong page"),
        Mistake("E#1-2", "mov ecx, IA32_VMX_CR4_FIXED0", "mov ecx, IA32_VMX_CR4_FIXED1", ("control-registers",),
                "CR4 given every bit it may hold instead of those it must hold"),
        Mistake("E#1-3", "vmxon [r15 + LAB_INFO_VMXON_REGION]", "vmxon [r15 + LAB_INFO_VMCS_REGION]",
                ("vmxon",), "VMXON given the VMCS page"),
        Mistake("E#1-3", "jc vmxon_failed", "jnc vmxon_failed", ("outcome",),
                "the outcome tested the wrong way round"),
    ),
    prepare=material.prepare_monitor,
    run=lambda exercise, directory, seed: monitor_run.run(exercise, directory, seed, SETUP),
)
