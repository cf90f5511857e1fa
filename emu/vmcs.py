"""The processor's VMCS cache: an active VMCS's fields, with guest register state live in its Unicorn instance.

See: SDM Vol. 3C 25.11.1: software may not assume the in-memory image of an active VMCS is current;
VMCLEAR writes the cached data back to memory. This machine keeps an active VMCS's fields in Python
and its guest register state in the guest's execution context, and writes both to RAM on VMCLEAR.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import x86_const as x86
from unicorn.unicorn_const import UC_ERR_OK

from emu import fast, msrs, segment_load, traps, vmcs_fields as vf
from emu.vmentry_checks import EntryCheckFailure
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES
from emu.vmcs_fields import FIELDS, BY_NAME
from emu.vmx_defs import (
    INTR_INFO_VALID as INTERRUPTION_INFO_VALID, MSR_IA32_EFER, ActivityState, ExitControls,
    PrimaryProcessorControls, Rflags, IO_QUAL_DIRECTION_IN, IO_QUAL_IMMEDIATE_OPERAND,
    IO_QUAL_PORT_SHIFT,
)

IO_BITMAP_PORTS = 0x8000         # bitmap A covers ports 0000H-7FFFH, bitmap B 8000H-FFFFH (SDM 25.6.4)

CPUID_LENGTH = 2                 # 0F A2
VMCALL_LENGTH = 3                # 0F 01 C1
HLT_LENGTH = 1                   # F4
VMRESUME_LENGTH = 3              # 0F 01 C3
DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT = 0xFFFF  # SDM 28.5.2: GDTR and IDTR limits are set to FFFFH

SLOT = struct.Struct("<Q")

# Guest-state fields that live in the guest's Unicorn instance once the VMCS has been entered.
_REGISTER_FIELDS = {
    "GUEST_RIP": x86.UC_X86_REG_RIP,
    "GUEST_RSP": x86.UC_X86_REG_RSP,
    "GUEST_RFLAGS": x86.UC_X86_REG_RFLAGS,
    "GUEST_CR0": x86.UC_X86_REG_CR0,
    "GUEST_CR3": x86.UC_X86_REG_CR3,
    "GUEST_CR4": x86.UC_X86_REG_CR4,
    "GUEST_DR7": x86.UC_X86_REG_DR7,
    "GUEST_FS_BASE": x86.UC_X86_REG_FS_BASE,
    "GUEST_GS_BASE": x86.UC_X86_REG_GS_BASE,
}
# Segment selectors, so the guest's IRETQ, far returns and interrupt frames see the CS and SS the VMCS
# gave it. Unicorn loads FS and GS through their descriptors in guest memory (emu/segment_load.py).
_SEGMENT_FIELDS = {
    "GUEST_CS_SELECTOR": x86.UC_X86_REG_CS, "GUEST_SS_SELECTOR": x86.UC_X86_REG_SS,
    "GUEST_DS_SELECTOR": x86.UC_X86_REG_DS, "GUEST_ES_SELECTOR": x86.UC_X86_REG_ES,
    "GUEST_FS_SELECTOR": x86.UC_X86_REG_FS, "GUEST_GS_SELECTOR": x86.UC_X86_REG_GS,
}
_REGISTER_FIELDS.update(_SEGMENT_FIELDS)
# Descriptor-table registers are (selector, base, limit, flags) tuples in Unicorn.
# (register, part): the part's index in Unicorn's uc_x86_mmr as its binding's reg_read returns it
# (selector, base, limit, flags), and as fast.Registers.read_descriptor returns the first three.
_TABLE_FIELDS = {
    "GUEST_GDTR_BASE": (x86.UC_X86_REG_GDTR, 1), "GUEST_GDTR_LIMIT": (x86.UC_X86_REG_GDTR, 2),
    "GUEST_IDTR_BASE": (x86.UC_X86_REG_IDTR, 1), "GUEST_IDTR_LIMIT": (x86.UC_X86_REG_IDTR, 2),
    "GUEST_TR_BASE": (x86.UC_X86_REG_TR, 1), "GUEST_TR_LIMIT": (x86.UC_X86_REG_TR, 2),
    "GUEST_TR_SELECTOR": (x86.UC_X86_REG_TR, 0),
    "GUEST_LDTR_BASE": (x86.UC_X86_REG_LDTR, 1), "GUEST_LDTR_LIMIT": (x86.UC_X86_REG_LDTR, 2),
    "GUEST_LDTR_SELECTOR": (x86.UC_X86_REG_LDTR, 0),
}
# The SYSENTER MSRs are guest-state fields: every VM exit saves them and every VM entry loads them
# (SDM Vol. 3C 28.3.1, 27.3.2.1), so the guest's live in its instance.
_MSR_FIELDS = {"GUEST_IA32_EFER": MSR_IA32_EFER, "GUEST_SYSENTER_CS": msrs.IA32_SYSENTER_CS,
               "GUEST_SYSENTER_ESP": msrs.IA32_SYSENTER_ESP, "GUEST_SYSENTER_EIP": msrs.IA32_SYSENTER_EIP}
# The order guest state is loaded in: control registers before the rest (CR4.PAE before CR0.PG).
_LOAD_ORDER = ("GUEST_CR4", "GUEST_IA32_EFER", "GUEST_CR3", "GUEST_CR0")
LIVE_FIELD_NAMES = frozenset(_REGISTER_FIELDS) | frozenset(_TABLE_FIELDS) | frozenset(_MSR_FIELDS)
# Control registers first, then the GDT, then selectors (which read it), then the rest (the FS and
# GS bases after their selectors, which would otherwise reset them).
_BEFORE_SELECTORS = _LOAD_ORDER + ("GUEST_GDTR_BASE", "GUEST_GDTR_LIMIT", "GUEST_LDTR_SELECTOR",
                                   "GUEST_LDTR_BASE", "GUEST_LDTR_LIMIT")
_LIVE_ORDER = _BEFORE_SELECTORS + tuple(sorted(_SEGMENT_FIELDS)) + \
    tuple(sorted(LIVE_FIELD_NAMES.difference(_BEFORE_SELECTORS, _SEGMENT_FIELDS)))
_LIVE_BIT = {name: 1 << index for index, name in enumerate(_LIVE_ORDER)}
_ALL_LIVE_BITS = (1 << len(_LIVE_ORDER)) - 1
# Selectors loaded through a descriptor, and the base register that load would change: the base is
# the VMCS's, loaded from its own field (SDM Vol. 3C 27.3.2.2), so the load leaves it as it was.
_DESCRIPTOR_LOADED_BASES = {"GUEST_FS_SELECTOR": x86.UC_X86_REG_FS_BASE,
                            "GUEST_GS_SELECTOR": x86.UC_X86_REG_GS_BASE}
_SLOT_INDEX = {field.name: index for index, field in enumerate(FIELDS)}
_GUEST_RIP = "GUEST_RIP"
_GUEST_RSP = "GUEST_RSP"
_GUEST_RFLAGS = "GUEST_RFLAGS"
# Fields software may write without the full VM-entry checks running again: no check reads the
# preemption-timer value, and GUEST_RIP's one check (canonical form) is made at every entry.
KEEPS_VERIFICATION = frozenset({_GUEST_RIP, "VMX_PREEMPTION_TIMER_VALUE"})
_EXIT_REASON = "VM_EXIT_REASON"
_EXIT_QUALIFICATION = "EXIT_QUALIFICATION"
_EXIT_INSTRUCTION_LENGTH = "VM_EXIT_INSTRUCTION_LEN"
_EXIT_INTERRUPTION_INFO = "VM_EXIT_INTR_INFO"
_EXIT_INTERRUPTION_ERROR = "VM_EXIT_INTR_ERROR_CODE"
_IDT_VECTORING_INFO = "IDT_VECTORING_INFO_FIELD"
_IDT_VECTORING_ERROR = "IDT_VECTORING_ERROR_CODE"
_ACTIVITY_STATE = "GUEST_ACTIVITY_STATE"
_GUEST_LINEAR = "GUEST_LINEAR_ADDRESS"
_GUEST_PHYSICAL = "GUEST_PHYSICAL_ADDRESS"
_ENTRY_INTERRUPTION_INFO = "VM_ENTRY_INTR_INFO_FIELD"
# name -> (slot, width mask, its live bit or 0)
_LIVE_SLOTS = tuple((name, _LIVE_BIT[name], _SLOT_INDEX[name], BY_NAME[name].mask) for name in _LIVE_ORDER)
_ACCESS = {field.name: (index, field.mask, _LIVE_BIT.get(field.name, 0)) for index, field in enumerate(FIELDS)}


def _field_table():
    """The facts hhr_invalid_instruction needs about each encoding (emu/fastpath.h, hhr_field)."""
    table = fast.ffi.new("hhr_field[]", fast.lib.HHR_VMCS_ENCODING_LIMIT)
    for slot, field in enumerate(FIELDS):
        entry = table[field.encoding]
        entry.mask = field.mask
        entry.slot = slot
        flags = fast.lib.HHR_FIELD_SUPPORTED
        flags |= fast.lib.HHR_FIELD_READ_ONLY if field.read_only else 0
        flags |= fast.lib.HHR_FIELD_WIDTH_64 if field.width == vf.FieldWidth.W64 else 0
        if field.name in _REGISTER_FIELDS:
            flags |= fast.lib.HHR_FIELD_LIVE_REGISTER
            entry.live_register = _REGISTER_FIELDS[field.name]
        elif field.name in LIVE_FIELD_NAMES:
            flags |= fast.lib.HHR_FIELD_PYTHON_ONLY
        flags |= fast.lib.HHR_FIELD_KEEPS_VERIFICATION if field.name in KEEPS_VERIFICATION else 0
        entry.flags = flags
        entry.live_bit = _LIVE_BIT.get(field.name, 0)
    return table


FIELD_TABLE = _field_table()


def _transition_constants():
    """Slots and architectural values for the C transition loop (emu/fastpath.h)."""
    k = fast.ffi.new("hhr_transition_constants *")
    for member, name in (
            ("exit_reason", _EXIT_REASON), ("exit_qualification", _EXIT_QUALIFICATION),
            ("exit_instruction_length", _EXIT_INSTRUCTION_LENGTH),
            ("exit_interruption_info", _EXIT_INTERRUPTION_INFO),
            ("exit_interruption_error", _EXIT_INTERRUPTION_ERROR),
            ("idt_vectoring_info", _IDT_VECTORING_INFO), ("idt_vectoring_error", _IDT_VECTORING_ERROR),
            ("activity_state", _ACTIVITY_STATE), ("entry_interruption_info", _ENTRY_INTERRUPTION_INFO),
            ("guest_rip", _GUEST_RIP), ("ept_pointer", "EPT_POINTER"),
            ("pin_controls", "PIN_BASED_VM_EXEC_CONTROL"), ("primary_controls", "CPU_BASED_VM_EXEC_CONTROL"),
            ("exit_controls", "VM_EXIT_CONTROLS"), ("host_cr0", "HOST_CR0"), ("host_cr3", "HOST_CR3"),
            ("host_cr4", "HOST_CR4"), ("host_fs_base", "HOST_FS_BASE"), ("host_gs_base", "HOST_GS_BASE"),
            ("host_gdtr_base", "HOST_GDTR_BASE"), ("host_idtr_base", "HOST_IDTR_BASE"),
            ("host_efer", "HOST_IA32_EFER"), ("host_rsp", "HOST_RSP"), ("host_rip", "HOST_RIP"),
            ("entry_msr_load_count", "VM_ENTRY_MSR_LOAD_COUNT"),
            ("exit_msr_store_count", "VM_EXIT_MSR_STORE_COUNT"), ("exit_msr_load_count", "VM_EXIT_MSR_LOAD_COUNT"),
            ("io_bitmap_a", "IO_BITMAP_A"),
            ("io_bitmap_b", "IO_BITMAP_B"), ("preemption_timer_value", "VMX_PREEMPTION_TIMER_VALUE"),
            ("inverse_entry", "INVERSE_HYPERCALL_ENTRY"), ("inverse_stack", "INVERSE_HYPERCALL_STACK"),
            ("guest_rsp", _GUEST_RSP), ("guest_rflags", _GUEST_RFLAGS)):
        setattr(k, member, _SLOT_INDEX[name])
    k.interruption_info_valid = INTERRUPTION_INFO_VALID
    k.interrupt_window_control = PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING
    k.load_efer_control = ExitControls.LOAD_IA32_EFER
    k.rflags_after_exit = Rflags.FIXED1
    k.descriptor_limit_after_exit = DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT
    # The exits the loop carries out, and the controls that decide them: emu/traps.py's rows.
    for trap in traps.TABLE:
        if trap.fast_path is not None:
            setattr(k, trap.fast_path.reason_constant, trap.exit_reason)
            for member, control in zip(trap.fast_path.control_constants, trap.controls, strict=True):
                setattr(k, member, control)
    k.cpuid_length = CPUID_LENGTH
    k.vmcall_length = VMCALL_LENGTH
    k.hlt_length = HLT_LENGTH
    k.io_direction_in = IO_QUAL_DIRECTION_IN
    k.io_immediate = IO_QUAL_IMMEDIATE_OPERAND
    k.io_port_shift = IO_QUAL_PORT_SHIFT
    k.io_bitmap_ports = IO_BITMAP_PORTS
    k.preemption_timer_rate = MACHINE_VMX_CAPABILITIES.preemption_timer_rate
    k.save_preemption_timer_control = ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE
    k.vmresume_length = VMRESUME_LENGTH
    k.activity_active = ActivityState.ACTIVE
    k.guest_rip_live_bit = _LIVE_BIT[_GUEST_RIP]
    k.activity_hlt = ActivityState.HLT
    # VMCALLR and its return (docs/machine.md 8.3).
    k.guest_rsp_live_bit = _LIVE_BIT[_GUEST_RSP]
    k.guest_rflags_live_bit = _LIVE_BIT[_GUEST_RFLAGS]
    k.vmcallr_length = len(traps.VMCALLR.opcode)
    k.rflags_during_inverse_call = Rflags.FIXED1
    return k


TRANSITION_CONSTANTS = _transition_constants()


class _NotLoadable(Exception):
    """A guest-state field the guest instance cannot take; carries the VM-entry failure."""

    def __init__(self, failure: EntryCheckFailure):
        super().__init__(failure.message)
        self.failure = failure


# The C per-VMCS flags (emu/fastpath.h, hhr_vmcs) a snapshot keeps.
_SAVED_FLAGS = ("launched", "entry_verified", "inverse_call", "halted", "checked_field_written", "live_written")


@dataclass
class VmcsState:
    """An active VMCS in a snapshot."""

    address: int
    values: bytes
    flags: dict[str, int]
    inverse_call_saved: tuple[int, int, int] | None
    context_id: int | None
    lp_index: int | None


class ActiveVmcs:
    """One active VMCS: its address, launch state, cached fields and (once entered) guest context."""

    def __init__(self, address: int, values: list[int], launched: bool):
        self.address = address
        self.values = fast.ffi.new("uint64_t[]", values)   # the slots, shared with the C fast path
        self.fast = fast.ffi.new("hhr_vmcs *")
        self.fast.values = self.values
        self.fast.address = address
        self.launched = launched
        self.context = None          # ExecutionContext holding live guest state, bound on entry
        self.lp_index: int | None = None

    # The flags live in the C struct, which the VMREAD/VMWRITE hook and the transition loop read.
    @property
    def launched(self) -> bool:
        return bool(self.fast.launched)

    @launched.setter
    def launched(self, value: bool) -> None:
        self.fast.launched = 1 if value else 0

    @property
    def halted(self) -> bool:
        """The guest is in the HLT activity state."""
        return bool(self.fast.halted)

    @halted.setter
    def halted(self, value: bool) -> None:
        self.fast.halted = 1 if value else 0

    @property
    def entry_verified(self) -> bool:
        """The last VM-entry check passed; with fast.checked_field_written clear, software wrote
        no field an entry check reads since (see VmxUnit._check_entry)."""
        return bool(self.fast.entry_verified)

    @entry_verified.setter
    def entry_verified(self, value: bool) -> None:
        self.fast.entry_verified = 1 if value else 0

    @property
    def inverse_call_saved(self) -> tuple[int, int, int] | None:
        """An inverse hypercall in progress: the guest RIP, RSP and RFLAGS it interrupted (kept in
        the C struct, where the transition loop saves and restores them too)."""
        f = self.fast
        return (f.inverse_saved_rip, f.inverse_saved_rsp, f.inverse_saved_rflags) if f.inverse_call else None

    @inverse_call_saved.setter
    def inverse_call_saved(self, saved: tuple[int, int, int] | None) -> None:
        f = self.fast
        f.inverse_call = 0 if saved is None else 1
        f.inverse_saved_rip, f.inverse_saved_rsp, f.inverse_saved_rflags = saved if saved is not None else (0, 0, 0)

    # --- the memory image -------------------------------------------------------------------------
    @classmethod
    def load(cls, ram, address: int) -> "ActiveVmcs":
        base = address + vf.VMCS_FIELDS_OFFSET
        image = ram.read(base, len(FIELDS) * vf.VMCS_SLOT_SIZE)
        values = [SLOT.unpack_from(image, i * vf.VMCS_SLOT_SIZE)[0] & field.mask
                  for i, field in enumerate(FIELDS)]
        launched = ram.read_u32(address + vf.VMCS_LAUNCH_STATE_OFFSET) == vf.LAUNCH_STATE_LAUNCHED
        return cls(address, values, launched)

    # --- snapshots (emu/snapshot.py) ----------------------------------------------------------------
    def save_state(self) -> "VmcsState":
        """Its slots, flags and the guest instance holding its live state (by python id)."""
        return VmcsState(self.address, bytes(fast.ffi.buffer(self.values)),
                         {name: getattr(self.fast, name) for name in _SAVED_FLAGS}, self.inverse_call_saved,
                         self.context.fast.python_id if self.context is not None else None, self.lp_index)

    @classmethod
    def from_state(cls, state: "VmcsState", context_by_id: dict) -> "ActiveVmcs":
        """An active VMCS as it was: its slots, flags and the guest instance that held its live state."""
        values = fast.ffi.from_buffer("uint64_t[]", bytearray(state.values))
        vmcs = cls(state.address, list(values), bool(state.flags["launched"]))
        for name, value in state.flags.items():
            setattr(vmcs.fast, name, value)
        vmcs.inverse_call_saved = state.inverse_call_saved
        vmcs.lp_index = state.lp_index
        if state.context_id is not None:
            vmcs.attach(context_by_id[state.context_id])
        return vmcs

    def store(self, ram) -> None:
        """Writes the cached data back (VMCLEAR). See: SDM Vol. 3C 31.3 VMCLEAR."""
        self.pull_live_state()
        # The slots as they lie in the C array: 64-bit little-endian values, the image's SLOT format.
        ram.write(self.address + vf.VMCS_FIELDS_OFFSET, bytes(fast.ffi.buffer(self.values)))
        ram.write_u32(self.address + vf.VMCS_LAUNCH_STATE_OFFSET, self.launch_state)

    @property
    def launch_state(self) -> int:
        """The launch-state word of the VMCS region (SDM Vol. 3C 25.1, 25.11.3)."""
        return vf.LAUNCH_STATE_LAUNCHED if self.launched else vf.LAUNCH_STATE_CLEAR

    # --- field access -------------------------------------------------------------------------------
    def read(self, name: str) -> int:
        slot, mask, live_bit = _ACCESS[name]
        if live_bit and self.context is not None and not self.fast.live_written & live_bit:
            return self._read_live(name) & mask
        return self.values[slot]

    def write(self, name: str, value: int) -> None:
        """The machine's own write (exit information, VMCALLR's guest state): takes effect at once."""
        slot, mask, live_bit = _ACCESS[name]
        value &= mask
        self.values[slot] = value
        if live_bit and self.context is not None:
            self._write_live(name, value)
            self.fast.live_written &= ~live_bit

    def record_exit(self, reason: int, qualification: int, instruction_length: int, interruption_info: int,
                    interruption_error: int, idt_vectoring_info: int, idt_vectoring_error: int,
                    guest_linear: int | None, guest_physical: int | None, activity_state: int) -> None:
        """The exit-information fields and the guest state a VM exit saves (SDM Vol. 3C 28.2, 28.3);
        none of them lives in the guest instance, so the slots are written directly."""
        values = self.values
        for name, value in ((_EXIT_REASON, reason), (_EXIT_QUALIFICATION, qualification),
                            (_EXIT_INSTRUCTION_LENGTH, instruction_length),
                            (_EXIT_INTERRUPTION_INFO, interruption_info),
                            (_EXIT_INTERRUPTION_ERROR, interruption_error),
                            (_IDT_VECTORING_INFO, idt_vectoring_info),
                            (_IDT_VECTORING_ERROR, idt_vectoring_error), (_ACTIVITY_STATE, activity_state)):
            slot, mask, _live = _ACCESS[name]
            values[slot] = value & mask
        if guest_linear is not None:
            slot, mask, _live = _ACCESS[_GUEST_LINEAR]
            values[slot] = guest_linear & mask
        if guest_physical is not None:
            slot, mask, _live = _ACCESS[_GUEST_PHYSICAL]
            values[slot] = guest_physical & mask
        # Every VM exit clears the valid bit of the VM-entry interruption information (SDM 28.2.4).
        slot = _ACCESS[_ENTRY_INTERRUPTION_INFO][0]
        values[slot] &= ~INTERRUPTION_INFO_VALID

    def read_encoding(self, field: vf.Field, high: bool) -> int:
        return vf.read_component(field, high, self.read(field.name))

    def write_by_software(self, field: vf.Field, high: bool, value: int) -> None:
        """VMWRITE (the same as hhr_invalid_instruction in C): the slot takes the value; guest state
        living in the instance is loaded from it at the next VM entry, after the entry checks have
        seen exactly what software wrote (SDM Vol. 3C 27.3)."""
        slot, mask, live_bit = _ACCESS[field.name]
        self.values[slot] = vf.write_component(field, high, self.read(field.name), value) & mask
        self.fast.live_written |= live_bit
        if field.name not in KEEPS_VERIFICATION:
            self.fast.checked_field_written = 1

    def load_written_state(self) -> EntryCheckFailure | None:
        """VM entry: guest state software wrote goes into the guest instance (SDM Vol. 3C 27.3.2).
        If the instance cannot take it (emu/segment_load.py), the failure; the written fields then
        keep their values and are loaded again at the next entry."""
        written = self.fast.live_written
        if written and self.context is not None:
            try:
                for name in _LIVE_ORDER:
                    if written & _LIVE_BIT[name]:
                        self._write_live(name, self.values[_SLOT_INDEX[name]])
            except _NotLoadable as refused:
                return refused.failure
        self.fast.live_written = 0
        return None

    # --- live guest state ---------------------------------------------------------------------------
    def _read_live(self, name: str, descriptors: dict[int, tuple[int, int, int]] | None = None) -> int:
        """A field's value as the guest instance holds it; `descriptors` keeps the descriptor-table
        registers read so far (a caller reading several fields reads each register once)."""
        regs = self.context.regs
        if name in _REGISTER_FIELDS:
            return regs.read(_REGISTER_FIELDS[name])
        if name in _TABLE_FIELDS:
            register, part = _TABLE_FIELDS[name]
            if descriptors is None:
                return regs.read_descriptor(register)[part]
            if register not in descriptors:
                descriptors[register] = regs.read_descriptor(register)
            return descriptors[register][part]
        return regs.read_msr(_MSR_FIELDS[name])

    def _write_live(self, name: str, value: int) -> None:
        uc = self.context.uc
        if name in _DESCRIPTOR_LOADED_BASES:
            self._load_selector_through_descriptor(name, value)
        elif name in _REGISTER_FIELDS:
            self.context.regs.write(_REGISTER_FIELDS[name], value)
        elif name in _TABLE_FIELDS:
            register, part = _TABLE_FIELDS[name]
            parts = list(uc.reg_read(register))
            parts[part] = value
            uc.reg_write(register, tuple(parts))
        else:
            uc.msr_write(_MSR_FIELDS[name], value)

    def _load_selector_through_descriptor(self, name: str, selector: int) -> None:
        """Loads FS or GS once the descriptor reads and writes Unicorn makes are known to succeed;
        raises _NotLoadable otherwise, or when Unicorn refuses the selector all the same."""
        regs = self.context.regs
        register = _REGISTER_FIELDS[name]
        failure = segment_load.load_refusal(self.context, register, selector)
        if failure is None:
            base_register = _DESCRIPTOR_LOADED_BASES[name]
            base = regs.read(base_register)
            error = regs.try_write(register, selector)
            if error == UC_ERR_OK:
                regs.write(base_register, base)
                return
            failure = segment_load.emulator_refusal(register, selector, error)
        raise _NotLoadable(failure)

    def attach(self, context) -> None:
        """Makes `context` the instance that runs this VMCS's guest, for Python and C alike."""
        self.context = context
        self.fast.guest_uc = context.fast.ctx.uc
        self.fast.guest_ctx = context.fast.ctx

    def bind(self, context) -> EntryCheckFailure | None:
        """Makes `context` hold this VMCS's guest register state (the first VM entry). If the instance
        cannot take it (emu/segment_load.py), the failure: the fields keep the guest state, as if
        software had just written all of them, and the next entry loads them again."""
        self.attach(context)
        try:
            for name in _LIVE_ORDER:
                self._write_live(name, self.values[_SLOT_INDEX[name]])
        except _NotLoadable as refused:
            self.fast.live_written = _ALL_LIVE_BITS
            return refused.failure
        self.fast.live_written = 0
        return None

    def pull_live_state(self) -> None:
        if self.context is None:
            return
        written = self.fast.live_written
        values, descriptors = self.values, {}
        for name, bit, slot, mask in _LIVE_SLOTS:
            if not written & bit:
                values[slot] = self._read_live(name, descriptors) & mask

    def unbind(self):
        """Moves live state back into the fields and returns the context for reuse."""
        self.pull_live_state()
        context, self.context = self.context, None
        self.fast.guest_uc = fast.ffi.NULL
        self.fast.guest_ctx = fast.ffi.NULL
        return context
