"""Malformed inputs: VM-entry check failures through real VMLAUNCH, and property tests with random VMCS
regions, VMCS fields and EPT entries that must never raise a Python exception out of Machine.run."""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, strategies as st

from emu import vmcs_fields as vf
from emu.machine import Machine
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import (
    EPTP_MEMORY_TYPE_MASK, EXIT_REASON_VM_ENTRY_FAILURE, Cr0, EntryFailureQualification, ExitReason,
    PinBasedControls, Rflags, VmInstructionError, make_eptp,
)
from tests.machine_programs import (
    EPT_TABLES, EXIT_LAUNCH_FAILED, EXIT_STOPPED_ON_EXIT, GUEST_CODE, GUEST_DATA, GUEST_GDT, GUEST_PML4,
    GUEST_STACK_TOP, PAGE_SIZE, QWORD, RFLAGS_CF, RFLAGS_ZF, ROOT_CODE, ROOT_STACK_TOP, SLOT_LAUNCH_ERROR,
    SLOT_LAUNCH_FLAGS, VMCS_REGION, assemble, build_guest, debug_exit, enable_vmx, events_of, exit_log,
    exit_logger, exit_status, label_address, lines, prepare_vmcs, result, root_preamble, run_root, vmwrite,
    vmx_pointer_instruction, vmx_program,
)

FUZZ_INSTRUCTION_LIMIT = 30_000
RFLAGS_RESERVED_BIT_3 = 1 << 3
UNSUPPORTED_PIN_CONTROL = PinBasedControls.PROCESS_POSTED_INTERRUPTS
RESERVED_EPT_MEMORY_TYPE = 2
NOT_ALL_ONES = 0x1000

HOST_STATE_ERROR = ("fail", VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD)
CONTROL_ERROR = ("fail", VmInstructionError.ENTRY_INVALID_CONTROL_FIELD)
GUEST_STATE_EXIT = ("exit", EntryFailureQualification.DEFAULT)

# (case, VMWRITEs after the valid setup, the check that fails (emu.vmentry_checks ids), expected outcome:
# ("fail", VM-instruction error) or ("exit", exit qualification of the VM-entry failure))
ENTRY_FAILURES = [
    ("host-cr0-without-ne",
     lines("mov rcx, cr0", f"btr rcx, {int(Cr0.NE).bit_length() - 1}", vmwrite("HOST_CR0", "rcx")),
     "host.cr0.fixed0", HOST_STATE_ERROR),
    ("host-tr-selector-null", vmwrite("HOST_TR_SELECTOR", 0), "host.tr.null", HOST_STATE_ERROR),
    ("pin-control-not-allowed",
     vmwrite("PIN_BASED_VM_EXEC_CONTROL", int(CAPS.pin_based.must_be_one | UNSUPPORTED_PIN_CONTROL)),
     "controls.pin.allowed1", CONTROL_ERROR),
    ("ept-memory-type-reserved",
     vmwrite("EPT_POINTER", make_eptp(EPT_TABLES) & ~EPTP_MEMORY_TYPE_MASK | RESERVED_EPT_MEMORY_TYPE),
     "controls.ept.memory_type", CONTROL_ERROR),
    ("guest-rflags-reserved-bit", vmwrite("GUEST_RFLAGS", int(Rflags.FIXED1) | RFLAGS_RESERVED_BIT_3),
     "guest.rflags.reserved", GUEST_STATE_EXIT),
    ("guest-rflags-bit1-clear", vmwrite("GUEST_RFLAGS", 0), "guest.rflags.bit1", GUEST_STATE_EXIT),
    ("guest-cr0-without-pe", vmwrite("GUEST_CR0", int(Cr0.NE | Cr0.ET)), "guest.cr0.fixed0", GUEST_STATE_EXIT),
    ("vmcs-link-pointer", vmwrite("VMCS_LINK_POINTER", NOT_ALL_ONES), "guest.vmcs_link_pointer",
     ("exit", EntryFailureQualification.VMCS_LINK_POINTER)),
]


@pytest.mark.parametrize("case, corrupt, check, expected", ENTRY_FAILURES, ids=[c[0] for c in ENTRY_FAILURES])
def test_vm_entry_check_failures(machine, case, corrupt, check, expected):
    guest = build_guest(machine, lines("vmcall"))
    program = vmx_program(guest, exit_logger(resume=False), before_launch=corrupt)
    run = run_root(machine, program)
    (failed,) = events_of(machine, "vm-entry-failed")
    assert failed.data["check"] == check
    assert failed.data["message"], "a VM-entry failure comes with a message"
    assert events_of(machine, "vm-entry") == []
    kind, detail = expected
    if kind == "fail":
        assert run.stop.exit_status == exit_status(EXIT_LAUNCH_FAILED), run.stop.report
        assert result(machine, SLOT_LAUNCH_FLAGS) & (RFLAGS_CF | RFLAGS_ZF) == RFLAGS_ZF
        assert result(machine, SLOT_LAUNCH_ERROR) == detail
        assert failed.data["message"].startswith("VMFAIL")
    else:
        assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
        (record,) = exit_log(machine)
        assert record.reason == EXIT_REASON_VM_ENTRY_FAILURE | ExitReason.INVALID_GUEST_STATE
        assert record.qualification == detail


# --- property tests ---------------------------------------------------------------------------------------
GRACEFUL_STOPS = {"debug-exit", "instruction-limit", "triple-fault", "machine-check", "idle"}
VMX_ENTRY_KINDS = {"vm-entry", "vmfail", "vm-entry-failed"}
GUEST_TOUCHES_MEMORY = lines(f"mov rbx, {GUEST_DATA:#x}", "work:", "inc qword ptr [rbx]", "push rbx", "pop rbx",
                             "cpuid", "vmcall", "jmp work")
_valid_image: bytes | None = None


def fuzz_program(body: str) -> str:
    """VMXON, `body`, VMPTRLD of VMCS_REGION as it is in memory, VMLAUNCH; exits are logged and resumed.
    The exit handler comes first so that its address (the image's HOST_RIP) does not depend on `body`."""
    return lines(enable_vmx(), "jmp launch", exit_logger(),
                 "launch:", body, vmx_pointer_instruction("vmptrld", VMCS_REGION), "vmlaunch",
                 debug_exit(EXIT_LAUNCH_FAILED))


FUZZ_HANDLER_ADDRESS = label_address(fuzz_program(""), "vm_exit")


def valid_vmcs_image() -> bytes:
    """A VMCS region that launches the memory-touching guest: made by a program that writes every field
    and executes VMCLEAR, with HOST_RIP then pointed at the fuzz program's exit handler."""
    global _valid_image
    if _valid_image is None:
        machine = Machine()
        guest = build_guest(machine, GUEST_TOUCHES_MEMORY)
        program = lines(enable_vmx(), prepare_vmcs(guest), vmx_pointer_instruction("vmclear", VMCS_REGION),
                        debug_exit(EXIT_STOPPED_ON_EXIT), "vm_exit:")
        run = run_root(machine, program)
        assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
        image = bytearray(machine.ram.read(VMCS_REGION, PAGE_SIZE))
        struct.pack_into("<Q", image, vf.BY_NAME["HOST_RIP"].offset, FUZZ_HANDLER_ADDRESS)
        _valid_image = bytes(image)
    return _valid_image


def fuzz_machine() -> Machine:
    machine = Machine()
    build_guest(machine, GUEST_TOUCHES_MEMORY)
    return machine


def assert_graceful(machine: Machine) -> None:
    run = machine.run(max_instructions=FUZZ_INSTRUCTION_LIMIT)
    assert run.stop.reason in GRACEFUL_STOPS, run.stop


def start_fuzz_program(machine: Machine, body: str = "") -> None:
    machine.events.recording = True
    machine.load(ROOT_CODE, assemble(lines(root_preamble(), fuzz_program(body)), ROOT_CODE))
    machine.start(ROOT_CODE, [ROOT_STACK_TOP])


def test_the_valid_image_launches():
    """The baseline the property tests mutate: unmodified, it enters the guest and logs exits."""
    machine = fuzz_machine()
    machine.ram.write(VMCS_REGION, valid_vmcs_image())
    start_fuzz_program(machine)
    run = machine.run(max_instructions=FUZZ_INSTRUCTION_LIMIT)
    assert run.stop.reason in GRACEFUL_STOPS
    assert events_of(machine, "vm-entry-failed") == [] and events_of(machine, "vmfail") == []
    assert {ExitReason.CPUID, ExitReason.VMCALL} <= {record.reason for record in exit_log(machine)}


patches = st.lists(st.tuples(st.integers(0, PAGE_SIZE - QWORD), st.integers(0, (1 << 64) - 1)), max_size=24)


@given(region_seed=st.integers(0, (1 << 32) - 1), patched=patches, from_valid=st.booleans())
def test_random_vmcs_region_never_raises(region_seed, patched, from_valid):
    """A region of random bytes (from a seed: a 4 KiB example would be hard to shrink), or the valid image
    with random quadwords patched in; only the revision identifier is kept right so VMPTRLD accepts it."""
    machine = fuzz_machine()
    image = bytearray(valid_vmcs_image() if from_valid else random.Random(region_seed).randbytes(PAGE_SIZE))
    for offset, value in patched:
        struct.pack_into("<Q", image, offset, value)
    struct.pack_into("<I", image, vf.VMCS_REVISION_ID_OFFSET, CAPS.vmcs_revision_id)
    machine.ram.write(VMCS_REGION, bytes(image))
    start_fuzz_program(machine)
    assert_graceful(machine)
    assert {event.kind for event in machine.events.events} & VMX_ENTRY_KINDS, "VMLAUNCH was never reached"


# Values near the edges of what the checks look at, and addresses around the end of RAM (the firmware maps
# a whole GiB, so an address past installed RAM translates but reaches no memory).
FUZZ_RAM_SIZE = Machine().ram.size
field_values = st.one_of(st.integers(0, (1 << 64) - 1),
                         st.sampled_from([0, 1, 0xFFFF_FFFF, (1 << 64) - 1, 1 << 31, 1 << CAPS.maxphyaddr]),
                         st.integers(0, 2 * FUZZ_RAM_SIZE))
writable_fields = [field.name for field in vf.FIELDS if not field.read_only]
# The fields that steer where root and guest run and what they address, drawn more often.
STEERING_FIELDS = ["HOST_RIP", "HOST_RSP", "HOST_CR3", "HOST_CR0", "HOST_CR4", "HOST_IDTR_BASE", "GUEST_RIP",
                   "GUEST_RSP", "GUEST_CR3", "GUEST_IDTR_BASE", "GUEST_IDTR_LIMIT", "EPT_POINTER",
                   "EXCEPTION_BITMAP", "VM_ENTRY_INTR_INFO_FIELD", "VMX_PREEMPTION_TIMER_VALUE"]
fuzzed_fields = st.one_of(st.sampled_from(writable_fields), st.sampled_from(STEERING_FIELDS))


@given(st.lists(st.tuples(fuzzed_fields, field_values), min_size=1, max_size=6))
def test_random_vmcs_fields_never_raise(overrides):
    machine = fuzz_machine()
    machine.ram.write(VMCS_REGION, valid_vmcs_image())
    start_fuzz_program(machine, lines(vmx_pointer_instruction("vmptrld", VMCS_REGION),
                                      *(vmwrite(name, value) for name, value in overrides)))
    assert_graceful(machine)


# The guest's EPT maps its RAM with 2 MiB pages: the entries are PML4Es, PDPTEs and PDEs (levels 4-2).
EPT_LEVELS = st.integers(2, 4)
GUEST_ADDRESSES = st.sampled_from([GUEST_CODE, GUEST_DATA, GUEST_STACK_TOP - QWORD, GUEST_PML4, GUEST_GDT])


@given(st.lists(st.tuples(GUEST_ADDRESSES, EPT_LEVELS, st.integers(0, (1 << 64) - 1)), min_size=1, max_size=4))
def test_random_ept_entries_never_raise(corruptions):
    machine = Machine()
    guest = build_guest(machine, GUEST_TOUCHES_MEMORY)
    machine.ram.write(VMCS_REGION, valid_vmcs_image())
    targets = [guest.ept.entry_address(gpa, level, create=False) for gpa, level, _value in corruptions]
    for target, (_gpa, _level, value) in zip(targets, corruptions):
        machine.ram.write_u64(target, value)
    start_fuzz_program(machine)
    assert_graceful(machine)
    assert events_of(machine, "vm-entry"), "the guest was never entered"


# --- VM-entry checks between entries ---------------------------------------------------------------------
@pytest.mark.parametrize("form", ["register", "memory"])
def test_a_field_broken_between_entries_fails_the_next_vmresume(machine, form):
    """The machine re-runs the checks only when software wrote a field other than GUEST_RIP: a bad
    GUEST_RFLAGS written before VMRESUME must still fail it (written in C for register operands,
    in Python for a memory operand)."""
    zero_rflags = vmwrite("GUEST_RFLAGS", 0) if form == "register" else lines(
        f"mov rax, {vf.BY_NAME['GUEST_RFLAGS'].encoding:#x}", "push 0", "vmwrite rax, [rsp]", "pop rbx")
    # The first exit breaks the field and resumes; the second (the failed entry) stops the run.
    on_exit = lines("cmp rcx, 1", "jne vm_exit_stop", zero_rflags)
    entry_failure = EXIT_REASON_VM_ENTRY_FAILURE | ExitReason.INVALID_GUEST_STATE
    guest = build_guest(machine, lines("vmcall", "vmcall", "hlt"))
    program = vmx_program(guest, exit_logger(on_exit=on_exit))
    run = run_root(machine, program)
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [record.reason for record in exit_log(machine)] == [ExitReason.VMCALL, entry_failure]
    (failed,) = events_of(machine, "vm-entry-failed")
    assert failed.data["check"].startswith("guest.rflags")


BROKEN_TIMER_VECTOR = 0x1000     # not a vector: bit 12 of the entry's interruption info is reserved
TIMER_SET_STEP = 20_000          # instructions between two looks for the timer guest's set-timer
GUEST_R15 = 0x600                # the timer guest does not use R15: a value no LP index has (blkirq's is its port)


@pytest.mark.parametrize("lps", [1, 2])
@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
def test_a_failed_vm_entry_stops_its_partition_and_the_hypervisor_s_lp_goes_on(hypervisor, lps):
    """A hypervisor's VM entry that fails (VMfailValid, SDM Vol. 3C 26.2.1.3: here the injection of a
    tick whose vector the hypervisor's own VP record has lost) leaves the guest's general registers
    loaded: the hypervisor finds its LP again from its stack, stops that partition with "VM entry
    failed", and every other guest runs to its end. (It once took the guest's R15 for its LP index,
    found no VP of "its" LP and slept for good.)"""
    from guests import catalog
    from hypervisors import boot
    from tools import run as run_module

    booted = boot.boot([catalog.parse(spec) for spec in ("timer", "counter,mem=4M")], hypervisor=hypervisor, lps=lps)
    records = booted.records.vp

    def timer_vp_armed():
        return next((vp for vp in booted.vp_records() if vp.partition == 0 and vp.fields["timer_period"]), None)

    while timer_vp_armed() is None:
        assert booted.machine.retired < run_module.DEFAULT_INSTRUCTION_LIMIT, "the timer guest never set its timer"
        booted.machine.run(max_instructions=booted.machine.retired + TIMER_SET_STEP)
    timer_vp = timer_vp_armed()
    for name, value in (("timer_vector", BROKEN_TIMER_VECTOR), ("r15", GUEST_R15)):
        booted.machine.ram.write(timer_vp.address + records.offset(name), value.to_bytes(records.field_size(name), "little"))
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    assert result.stop.reason == "debug-exit", result.stop
    timer, counter = run_module.document(booted, result, lps)["guests"]
    assert (timer["state"], timer["stop_reason"]) == ("stopped", "VM entry failed")
    assert counter["exit_code"] == 0
