"""Enters generated guest-state areas with VMLAUNCH, one per line of JSON on stdin, and says how each ended.

Run as `python -m tests.guest_state_worker` by tests/test_guest_state_entry.py, so that a crash of the
emulator kills this process and fails the test instead of killing pytest. A case (JSON object) holds:

    fields       VMCS field name -> value, written over a valid 64-bit guest (tests.machine_programs)
    gdt          quadwords written at the guest's GDT (guest-physical GUEST_GDT, or gdt_at; the
                 bytes that fall outside guest RAM are left out)
    guest_memory [guest-physical, quadword] pairs written through the guest's EPT (page tables, ...)
    ept          [guest-physical, EPT permission bits] pairs: that page is mapped with 4 KiB pages and
                 these permissions (0: not present)
    resume_fields  fields written at the first VM exit before VMRESUME (the entry that loads only
                 what software wrote)
    fix_gdt_after_failure  after a failed entry, set P in GDT entry 2 (in memory) and VMLAUNCH again
    code         machine code (hex) the guest runs instead of GUEST_CODE's instructions

The guest runs a few instructions that use its segments, under a short VMX-preemption timer, so every
entry that succeeds ends in a VM exit. The answer (one line of JSON) is:

    outcome      "exit" (entered, then a VM exit), "vmfail" (VMLAUNCH or VMRESUME failed with
                 VMfailValid or VMfailInvalid), "entry-failure" (exit reason with bit 31), or
                 "no-outcome" (the run ended any other way) or "traceback" (Python raised)
    detail       the exit reasons, VM-instruction error, failed checks and their messages, the
                 run's stop, the guest's FS and GS selectors in the VMCS at the end; or a traceback
"""
from __future__ import annotations

import json
import sys
import traceback

from emu.machine import Machine
from emu.vmx_defs import AR_P, EPT_RWX_MASK, EXIT_REASON_VM_ENTRY_FAILURE, PinBasedControls
from tests.machine_programs import (
    EXIT_LAUNCH_FAILED, EXIT_LOG_FULL, EXIT_RESUME_FAILED, EXIT_STOPPED_ON_EXIT, GUEST_CODE as GUEST_CODE_ADDRESS,
    GUEST_GDT, PAGE_2M, PAGE_SIZE, QWORD, RFLAGS_CF, RFLAGS_ZF, SLOT_LAUNCH_ERROR, SLOT_LAUNCH_FLAGS,
    SLOT_RESUME_ERROR, SLOT_RESUME_FLAGS, VMCS_REGION, build_guest, debug_exit, default_controls, events_of,
    exit_log, exit_logger, exit_status, lines, result, run_root, vmread, vmwrite, vmx_program,
)

INSTRUCTION_LIMIT = 200_000          # far more than two entries, a few guest instructions and the timer need
PREEMPTION_TIMER_TICKS = 64          # the guest runs at most this long before a VM exit
EXITS_BEFORE_STOP = 2                # the first exit resumes (after resume_fields), the second stops
ENTRY_FAILURE_BIT = EXIT_REASON_VM_ENTRY_FAILURE.bit_length() - 1   # a failed entry stops at once
DATA_INDEX = 2                       # the GDT entry of the data segment (tests.machine_programs.gdt_quads)
DESCRIPTOR_ACCESS_BYTE = 5           # the byte of a descriptor with type, S, DPL and P (SDM Vol. 3A Figure 3-8)
# A few instructions that use every data segment, reload FS and GS through their descriptors (inside the
# run, where a fault is the guest's), then exit.
GUEST_CODE = lines(
    "mov rax, qword ptr fs:[0x10]", "mov rbx, qword ptr gs:[0x10]",
    "mov ax, ds", "mov es, ax", "mov ax, fs", "mov fs, ax", "mov ax, gs", "mov gs, ax",
    "push rax", "pop rax", "cpuid", "vmcall", "hlt")


def _controls() -> dict[str, int]:
    return default_controls(pin=PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER)


def _remap_page(guest, gpa: int, permissions: int) -> None:
    """Splits the 2 MiB EPT page holding `gpa` into 4 KiB pages and gives `gpa`'s page `permissions`."""
    ept = guest.ept
    large = gpa - gpa % PAGE_2M
    host = guest.hpa(large)
    pde = ept.entry_address(large, 2)
    guest.machine.ram.write_u64(pde, 0)
    for offset in range(0, PAGE_2M, PAGE_SIZE):
        ept.map(large + offset, host + offset, PAGE_SIZE)
    page = gpa - gpa % PAGE_SIZE
    leaf = ept.entry_address(page, 1)
    entry = guest.machine.ram.read_u64(leaf)
    guest.machine.ram.write_u64(leaf, (entry & ~EPT_RWX_MASK) | (permissions & EPT_RWX_MASK))


def run_case(case: dict) -> dict:
    machine = Machine(record_events=True)
    guest = build_guest(machine, GUEST_CODE, controls=_controls(),
                        fields={"VMX_PREEMPTION_TIMER_VALUE": PREEMPTION_TIMER_TICKS})
    guest.fields.update(case.get("fields", {}))
    if "code" in case:
        guest.write(GUEST_CODE_ADDRESS, bytes.fromhex(case["code"]))
    gdt_at = case.get("gdt_at", GUEST_GDT)
    for index, quad in enumerate(case.get("gdt", [])):
        for offset, byte in enumerate(quad.to_bytes(QWORD, "little")):
            if guest.ept.translate(gdt_at + index * QWORD + offset) is not None:   # a GDT may run off guest RAM
                guest.write(gdt_at + index * QWORD + offset, bytes([byte]))
    for gpa, value in case.get("guest_memory", []):
        guest.write_u64(gpa, value)
    for gpa, permissions in case.get("ept", []):
        _remap_page(guest, gpa, permissions)
    resume_writes = lines(*(vmwrite(name, value) for name, value in case.get("resume_fields", {}).items()))
    after_failure = "vm_exit_stop"
    fix = ""
    if case.get("fix_gdt_after_failure"):
        # The hypervisor repairs the descriptor of GDT entry DATA_INDEX (sets P) and launches again.
        present_byte = guest.hpa(GUEST_GDT + DATA_INDEX * QWORD + DESCRIPTOR_ACCESS_BYTE)
        after_failure = "fix_gdt"
        fix = lines("fix_gdt:", f"mov rax, {present_byte:#x}", f"or byte ptr [rax], {AR_P:#x}", "vmlaunch",
                    debug_exit(EXIT_LAUNCH_FAILED))
    on_exit = lines(f"cmp rcx, {EXITS_BEFORE_STOP}", "jae vm_exit_stop",
                    vmread("rbx", "VM_EXIT_REASON"), f"bt rbx, {ENTRY_FAILURE_BIT}", f"jc {after_failure}",
                    resume_writes)
    run = run_root(machine, vmx_program(guest, exit_logger(on_exit=on_exit), after_exit_code=fix), INSTRUCTION_LIMIT)
    status = run.stop.exit_status
    reasons = [record.reason for record in exit_log(machine)]
    failures = events_of(machine, "vm-entry-failed")
    detail = {"exit_reasons": reasons, "checks": [event.data["check"] for event in failures],
              "messages": [event.data["message"] for event in failures], "stop": run.stop.reason}
    vmcs = machine.active_vmcs.get(VMCS_REGION)
    if vmcs is not None:
        detail.update(fs_selector=vmcs.read("GUEST_FS_SELECTOR"), gs_selector=vmcs.read("GUEST_GS_SELECTOR"))
    if status in (exit_status(EXIT_LAUNCH_FAILED), exit_status(EXIT_RESUME_FAILED)):
        launch = status == exit_status(EXIT_LAUNCH_FAILED)
        flags = result(machine, SLOT_LAUNCH_FLAGS if launch else SLOT_RESUME_FLAGS)
        detail["error"] = result(machine, SLOT_LAUNCH_ERROR if launch else SLOT_RESUME_ERROR)
        detail["instruction"] = "vmlaunch" if launch else "vmresume"
        vmfail = flags & (RFLAGS_CF | RFLAGS_ZF) in (RFLAGS_CF, RFLAGS_ZF)
        return {"outcome": "vmfail" if vmfail else "no-outcome", "detail": detail}
    if status == exit_status(EXIT_STOPPED_ON_EXIT) and reasons:
        failed = reasons[-1] & EXIT_REASON_VM_ENTRY_FAILURE
        return {"outcome": "entry-failure" if failed else "exit", "detail": detail}
    if status == exit_status(EXIT_LOG_FULL):
        detail["log"] = "full"
    return {"outcome": "no-outcome", "detail": detail}


def main() -> None:
    for line in sys.stdin:
        try:
            answer = run_case(json.loads(line))
        except Exception:   # noqa: BLE001 - any Python exception is a finding, reported to the test
            answer = {"outcome": "traceback", "detail": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
