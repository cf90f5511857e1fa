"""The receiver's checks of each VP's received guest state (hypervisors/common/guest_state.inc): a
VMCS value changed in the blackout (digest fixed) that a VM entry would refuse is refused before the
commit; good values at the boundary still commit; every refused value fails the machine's own
VM-entry checks (emu/vmentry_checks.py) too."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from emu import vmcs_fields, vmentry_checks
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES
from emu.vmx_defs import (AR_P, AR_S, AR_UNUSABLE, Cr0, Cr4, Efer, Interruptibility, Rflags,
                          SYSTEM_TYPE_BUSY_TSS, SYSTEM_TYPE_LDT)
from hypervisors import build, transfer
from tools.fuzz import executor, fields, oracles
from tools.fuzz.inputs import Edit, FuzzInput

from tests.test_fuzz import broken, in_region, last_state_message

CANONICAL_LIMIT = 1 << (MACHINE_VMX_CAPABILITIES.linear_address_width - 1)   # the first non-canonical address
FAR_NON_CANONICAL = 1 << MACHINE_VMX_CAPABILITIES.linear_address_width      # bits 63:48 not all equal
RETURN_ZERO = b"\x31\xc0\xc3"                                              # xor eax, eax; ret
TSS_AVAILABLE = 9                                                           # SDM Vol. 3A 3.5: not busy
ACTIVITY_SHUTDOWN = 2
ACTIVITY_BEYOND_ANY = 5
DESCRIPTOR_LIMIT_TOO_BIG = 0x10000
CR0_RESERVED_BIT = 1 << 6            # clear in IA32_VMX_CR0_FIXED1
CR4_RESERVED_BIT = 1 << 11           # clear in IA32_VMX_CR4_FIXED1
HIGH_BIT = 1 << 63
INTERRUPTIBILITY_RESERVED_BIT = 1 << 4
PENDING_DBG_RESERVED_BIT = 1 << 4
DS_CODE_NOT_READABLE = 0x99          # present, S, execute-only accessed code


# (field, "set" or "xor", value): each breaks one check of SDM Vol. 3C 27.3.1 for the first VP.
BAD_VALUES = {
    "cr0-fixed0": ("GUEST_CR0", "xor", int(Cr0.NE)),
    "cr0-fixed1": ("GUEST_CR0", "xor", CR0_RESERVED_BIT),
    "cr0-pg": ("GUEST_CR0", "xor", int(Cr0.PG)),
    "cr4-fixed0": ("GUEST_CR4", "xor", int(Cr4.VMXE)),
    "cr4-fixed1": ("GUEST_CR4", "xor", CR4_RESERVED_BIT),
    "cr4-pae": ("GUEST_CR4", "xor", int(Cr4.PAE)),
    "cr3-maxphyaddr": ("GUEST_CR3", "xor", HIGH_BIT),
    "sysenter-eip": ("GUEST_SYSENTER_EIP", "set", FAR_NON_CANONICAL),
    "efer-lma": ("GUEST_IA32_EFER", "xor", int(Efer.LMA)),
    "rip-canonical": ("GUEST_RIP", "set", FAR_NON_CANONICAL),
    "rflags-bit1": ("GUEST_RFLAGS", "xor", int(Rflags.FIXED1)),
    "rflags-bit3": ("GUEST_RFLAGS", "xor", 1 << 3),
    "rflags-bit22": ("GUEST_RFLAGS", "xor", 1 << 22),
    "rflags-vm": ("GUEST_RFLAGS", "xor", int(Rflags.VM)),
    "cs-present": ("GUEST_CS_AR_BYTES", "xor", AR_P),
    "ss-s": ("GUEST_SS_AR_BYTES", "xor", AR_S),
    "ds-code": ("GUEST_DS_AR_BYTES", "set", DS_CODE_NOT_READABLE),
    "tr-busy": ("GUEST_TR_AR_BYTES", "xor", SYSTEM_TYPE_BUSY_TSS ^ TSS_AVAILABLE),
    "tr-unusable": ("GUEST_TR_AR_BYTES", "xor", AR_UNUSABLE),
    "tr-base": ("GUEST_TR_BASE", "set", FAR_NON_CANONICAL),
    "fs-base": ("GUEST_FS_BASE", "set", FAR_NON_CANONICAL),
    "ldtr-type": ("GUEST_LDTR_AR_BYTES", "set", AR_P),
    "gdtr-limit": ("GUEST_GDTR_LIMIT", "set", DESCRIPTOR_LIMIT_TOO_BIG),
    "gdtr-base": ("GUEST_GDTR_BASE", "set", FAR_NON_CANONICAL),
    "idtr-base": ("GUEST_IDTR_BASE", "set", FAR_NON_CANONICAL),
    "activity-unsupported": ("GUEST_ACTIVITY_STATE", "set", ACTIVITY_SHUTDOWN),
    "activity-invalid": ("GUEST_ACTIVITY_STATE", "set", ACTIVITY_BEYOND_ANY),
    "interruptibility-reserved": ("GUEST_INTERRUPTIBILITY_INFO", "xor", INTERRUPTIBILITY_RESERVED_BIT),
    "interruptibility-smi": ("GUEST_INTERRUPTIBILITY_INFO", "xor", int(Interruptibility.BLOCKING_BY_SMI)),
    "interruptibility-sti-and-mov-ss": ("GUEST_INTERRUPTIBILITY_INFO", "set",
                                        int(Interruptibility.BLOCKING_BY_STI | Interruptibility.BLOCKING_BY_MOV_SS)),
    "pending-dbg-reserved": ("GUEST_PENDING_DBG_EXCEPTIONS", "xor", PENDING_DBG_RESERVED_BIT),
}
# The machine does not load IA32_EFER on entry (this hypervisor leaves "load IA32_EFER" off): the
# receiver's EFER check is stricter than the machine's.
STRICTER_THAN_THE_MACHINE = {"efer-lma"}
# Good values at the edge of what is refused.
GOOD_VALUES = {
    "rflags-only-bit1": ("GUEST_RFLAGS", "set", int(Rflags.FIXED1)),
    "rip-top-of-lower-half": ("GUEST_RIP", "set", CANONICAL_LIMIT - 1),
    "rip-bottom-of-upper-half": ("GUEST_RIP", "set", (1 << 64) - CANONICAL_LIMIT),
    "gdtr-limit-max": ("GUEST_GDTR_LIMIT", "set", DESCRIPTOR_LIMIT_TOO_BIG - 1),
    "cr0-cd": ("GUEST_CR0", "xor", int(Cr0.CD)),                 # CD and NW are not checked
    "ldtr-usable": ("GUEST_LDTR_AR_BYTES", "set", AR_P | SYSTEM_TYPE_LDT),
}
PATCHED_OUT_SHOWN = ("cr4-fixed0", "rflags-vm", "tr-busy", "rip-canonical")


@pytest.fixture(scope="module")
def machine() -> executor.TransferMachine:
    return executor.TransferMachine(executor.Setup())


@dataclass(frozen=True)
class FirstVp:
    """The first VMCS record of the blackout's last state message: its message, value fields, values."""

    number: int
    fields: dict[str, fields.Field]
    values: dict[str, int]

    def image(self, edit: tuple[str, str, int] | None = None) -> dict[str, int]:
        """The image by field name, with one edit (field, "set" or "xor", value) applied."""
        image = dict(self.values)
        if edit:
            name, op, value = edit
            image[name] = value if op == "set" else image[name] ^ value
        return image

    def input(self, name: str, op: str, value: int) -> FuzzInput:
        """The field `name` set (or its recorded value xored) in flight, the digest fixed."""
        field = self.fields[name]
        new_value = self.image((name, op, value))[name]
        return FuzzInput("vmcs", self.number, (Edit("set", field.offset, 8, new_value, field=field.name),),
                         fix_digest=True)


@pytest.fixture(scope="module")
def first_vp(machine) -> FirstVp:
    number = last_state_message(machine)
    message = machine.messages[number - 1]
    by_name = {f.name: f for f in fields.message_fields(message)}
    record = min(name.split(".")[0] for name in by_name if name.startswith("vmcs["))
    found, values = {}, {}
    for index, encoding in enumerate(transfer.VMCS_TRANSFER_FIELDS):
        name = vmcs_fields.lookup(encoding)[0].name
        field = found[name] = by_name[f"{record}.field[{index}].value"]
        values[name] = int.from_bytes(message[field.offset:field.offset + field.width], "little")
    return FirstVp(number, found, values)


def machine_guest_checks(image: dict[str, int]) -> list[str]:
    """The machine's own guest-state checks (SDM Vol. 3C 27.3.1) on an image with hv2's controls."""
    constants = build.constants("hv2")
    controls = {
        "PIN_BASED_VM_EXEC_CONTROL": constants["PIN_MUST_BE_ONE"],
        "CPU_BASED_VM_EXEC_CONTROL": constants["PROC_MUST_BE_ONE"] | constants["PROC_ACTIVATE_SECONDARY_CONTROLS"],
        "SECONDARY_VM_EXEC_CONTROL": constants["PROC2_MUST_BE_ONE"] | constants["PROC2_ENABLE_EPT"],
        "VM_EXIT_CONTROLS": constants["EXIT_MUST_BE_ONE"] | constants["EXIT_CTL_HOST_ADDRESS_SPACE_SIZE"],
        "VM_ENTRY_CONTROLS": constants["ENTRY_MUST_BE_ONE"] | constants["ENTRY_CTL_IA32E_MODE_GUEST"],
        "VMCS_LINK_POINTER": (1 << 64) - 1,
    }
    values = {**image, **controls}
    state = vmentry_checks.EntryState(lambda name: values.get(name, 0), MACHINE_VMX_CAPABILITIES, True)
    return [failure.check for check in vmentry_checks.GUEST_CHECKS if (failure := check(state))]


def test_the_recorded_guest_state_passes_the_machines_checks(first_vp):
    assert machine_guest_checks(first_vp.image()) == []


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_guest_state_a_vm_entry_refuses_is_refused_before_the_commit(machine, first_vp, case):
    if case not in STRICTER_THAN_THE_MACHINE:
        assert machine_guest_checks(first_vp.image(BAD_VALUES[case])), "the machine would enter it"
    result = machine.execute(first_vp.input(*BAD_VALUES[case]))
    assert result.outcome == "aborted" and result.finding is None, (result.replies, result.finding)
    assert result.replies[-1] == (transfer.Call.STATE, True, transfer.Reply.VALUE)
    assert transfer.Status(result.status) == transfer.Status.REFUSED


@pytest.mark.parametrize("case", PATCHED_OUT_SHOWN)
def test_with_the_check_patched_out_the_guest_is_lost_after_the_commit(machine, first_vp, case):
    """Aborted with the guests as they were; with check_guest_state patched to accept, the same
    input commits and a guest fails its first VM entry under the new hypervisor."""
    entry = first_vp.input(*BAD_VALUES[case])
    result = machine.execute(entry, deep=True)
    assert result.outcome == "aborted" and result.finding is None, result.finding
    with broken(machine, f"m{first_vp.number}", in_region(machine, "check_guest_state"), RETURN_ZERO):
        result = machine.execute(entry)
        assert result.outcome == "committed"
        finding = machine.check_guests_after_commit(entry)
    assert finding is not None and finding.kind == oracles.GUEST_OUTPUT


@pytest.mark.parametrize("case", sorted(GOOD_VALUES))
def test_a_good_value_at_the_boundary_is_still_accepted(machine, first_vp, case):
    assert machine_guest_checks(first_vp.image(GOOD_VALUES[case])) == []
    result = machine.execute(first_vp.input(*GOOD_VALUES[case]))
    assert result.outcome == "committed", result.replies


def test_trust_marks_name_fields_of_their_layouts():
    """transfer.TRUSTED_FIELDS names, per layout, the fields the receiver takes on trust; a mark that
    names no field (a renamed field, say) would silently make that field look checkable."""
    from hypervisors import transfer
    layouts = {layout.name: layout for layout in transfer.LAYOUTS}
    for layout_name, trusted in transfer.TRUSTED_FIELDS.items():
        assert trusted <= {name for name, _size in layouts[layout_name].fields}, layout_name
