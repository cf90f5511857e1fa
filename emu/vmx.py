"""The VMX-like extension: VMX instructions in root mode, VM entries and VM exits (SDM Vol. 3C 27, 28, 31).

Instructions arrive here as #UD traps from Unicorn; each is carried out as the SDM's pseudocode
for it says (Vol. 3C 31.3), with VMsucceed / VMfailInvalid / VMfailValid(n) reported in RFLAGS.
Which instructions those are, and the exit each causes in a guest, is emu/traps.py's table.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from emu import decode, fast, msrs, vmcs_fields as vf
from emu.decode import MemoryOperand, RegisterOperand
from emu.instruction_fault import RaiseException
from emu.trap_emulation import read_msr
from emu.vmcs import DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT, ActiveVmcs
from emu.vmentry_checks import (
    VMFAIL_VALID, EntryCheckFailure, check_launch_state, check_vm_entry, fits_physical_address, is_canonical,
)
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import (
    U64_MASK as U64,
    VMCALLR_ALREADY_IN_PROGRESS, VMCALLR_ENDED_BY_VM_EXIT, VMCALLR_NO_ENTRY_POINT, VMCALLR_NOT_LAUNCHED,
    ExitControls, ExitReason, PinBasedControls, VmInstructionError, INTR_INFO_VALID, ActivityState, ExceptionVector, MSR_IA32_EFER, Rflags,
    RFLAGS_ARITHMETIC, EXIT_REASON_VM_ENTRY_FAILURE, PAGE_OFFSET_MASK, Cr4, InveptType,
)

if TYPE_CHECKING:
    from emu.lp import LogicalProcessor
    from emu.memory import HostMemory
    from emu.vmcs_cache import VmcsCache
    from emu.vmx_counters import VmxCounters

INVALID_VMCS_POINTER = U64
MSR_LIST_ENTRY = struct.Struct("<IIQ")   # index, reserved, data (SDM Vol. 3C Table 25-15)
MSR_LIST_VALUE_OFFSET = 8
MSR_VALUE = struct.Struct("<Q")
# VMX-abort indicators (SDM Vol. 3C 28.7).
VMX_ABORT_SAVING_GUEST_MSRS = 1
VMX_ABORT_LOADING_HOST_MSRS = 4
INVEPT_DESCRIPTOR_SIZE = 16


class VmxUnit:
    """One logical processor's VMX state and the semantics of its VMX instructions. It uses its LP
    (root context, clock, events, guest mode, and the LP's host for machine checks), RAM,
    the machine's VMCS cache and its transition counters."""

    def __init__(self, lp: "LogicalProcessor", ram: "HostMemory", vmcs_cache: "VmcsCache", counters: "VmxCounters"):
        self.lp = lp
        self.ram = ram
        self.vmcs_cache = vmcs_cache
        self.counters = counters
        self.fast = lp.root.fast_vmx   # the C fast path's view, kept in step by the properties below
        self.on = False
        self.vmxon_region = 0
        self.current = None

    @property
    def on(self) -> bool:
        return bool(self.fast.vmx_on)

    @on.setter
    def on(self, value: bool) -> None:
        self.fast.vmx_on = 1 if value else 0

    @property
    def current(self) -> ActiveVmcs | None:
        return self._current

    @current.setter
    def current(self, vmcs: ActiveVmcs | None) -> None:
        self._current = vmcs
        self.fast.current = vmcs.fast if vmcs is not None else fast.ffi.NULL

    def save_state(self) -> tuple[bool, int, int | None]:
        """VMX operation, the VMXON region and the current VMCS's address."""
        return self.on, self.vmxon_region, self.current.address if self.current is not None else None

    def restore_state(self, state: tuple[bool, int, int | None], active_vmcs: dict[int, ActiveVmcs]) -> None:
        self.on, self.vmxon_region, current = state
        self.current = active_vmcs[current] if current is not None else None

    # --- operand helpers -----------------------------------------------------------------------------
    def _effective_address(self, insn, operand: MemoryOperand) -> int:
        regs = self.lp.root.regs
        address = operand.displacement
        if operand.rip_relative:
            address += insn.address + insn.size
        if operand.base is not None:
            address += regs.read(operand.base)
        if operand.index is not None:
            address += regs.read(operand.index) * operand.scale
        return address & U64

    def _read_operand(self, insn, operand, size: int = 8) -> int:
        if isinstance(operand, RegisterOperand):
            return self.lp.root.regs.read(operand.register)
        data = self._read_memory(self._effective_address(insn, operand), size)
        return int.from_bytes(data, "little")

    def _read_memory(self, linear: int, size: int) -> bytes:
        data, fault = self.lp.root.read_linear_checked(linear, size)
        self._raise_translation(fault)
        return data

    def _write_operand(self, insn, operand, value: int, size: int = 8) -> None:
        if isinstance(operand, RegisterOperand):
            self.lp.root.regs.write(operand.register, value & U64)
            return
        fault = self.lp.root.write_linear(self._effective_address(insn, operand),
                                          (value & U64).to_bytes(8, "little")[:size])
        self._raise_translation(fault)

    @staticmethod
    def _raise_translation(fault) -> None:
        if fault is None:
            return
        if fault.kind == fast.FAULT_PAGE_FAULT:
            raise RaiseException(ExceptionVector.PF, fault.page_fault_error_code, fault.linear)
        raise RaiseException(ExceptionVector.GP, 0)

    # --- RFLAGS conventions (SDM Vol. 3C 31.2) --------------------------------------------------------
    def _set_flags(self, set_bits: int) -> None:
        regs = self.lp.root.regs
        rflags = regs.read(x86.UC_X86_REG_RFLAGS)
        regs.write(x86.UC_X86_REG_RFLAGS, (rflags & ~RFLAGS_ARITHMETIC) | set_bits)

    def succeed(self) -> None:
        self._set_flags(0)

    def fail_invalid(self) -> None:
        self._set_flags(Rflags.CF)

    def fail(self, error: int) -> None:
        """VMfailValid(error) when there is a current VMCS, otherwise VMfailInvalid."""
        if self.current is None:
            self.fail_invalid()
            return
        self.current.write("VM_INSTRUCTION_ERROR", int(error))
        self._set_flags(Rflags.ZF)
        self.lp.publish("vmfail", error=int(error))

    def _valid_physical(self, address: int) -> bool:
        return address & PAGE_OFFSET_MASK == 0 and fits_physical_address(address, CAPS) and \
            self.ram.holds(address, vf.VMCS_REGION_SIZE)

    # --- dispatch -------------------------------------------------------------------------------------
    def execute(self, insn, mnemonic: str) -> str:
        """Carries out one VMX instruction in root mode. Returns 'next' (advance RIP), 'enter' (a VM
        entry happened: the LP now runs the guest), 'stay' (RIP already set) or raises RaiseException."""
        cr4 = self.lp.root.regs.read(x86.UC_X86_REG_CR4)
        if mnemonic == "vmxon":
            if not cr4 & Cr4.VMXE:
                raise RaiseException(ExceptionVector.UD)
            return self._vmxon(insn)
        if not self.on:
            raise RaiseException(ExceptionVector.UD)  # SDM 31.3: VMX instructions outside VMX operation are #UD
        handler = getattr(self, "_" + mnemonic, None)
        if handler is None:
            raise RaiseException(ExceptionVector.UD)
        return handler(insn)

    def _vmxon(self, insn) -> str:
        if self.on:
            self.fail(VmInstructionError.VMXON_IN_VMX_ROOT)
            return "next"
        regs = self.lp.root.regs
        cr0 = regs.read(x86.UC_X86_REG_CR0)
        cr4 = regs.read(x86.UC_X86_REG_CR4)
        if (cr0 & CAPS.cr0_fixed0) != CAPS.cr0_fixed0 or (cr4 & CAPS.cr4_fixed0) != CAPS.cr4_fixed0:
            raise RaiseException(ExceptionVector.GP, 0)
        address = self._read_operand(insn, decode.operands(insn)[0])
        if not self._valid_physical(address) or \
                self.ram.read_u32(address) & vf.VMCS_REVISION_ID_MASK != CAPS.vmcs_revision_id:
            self.fail_invalid()
            self.lp.publish("vmxon", region=address, ok=False)
            return "next"
        self.on = True
        self.vmxon_region = address
        self.current = None
        self.succeed()
        self.lp.publish("vmxon", region=address, ok=True)
        self.lp.root.flush_code()   # the hypervisor's code may be new: translated code goes
        return "next"

    def _vmxoff(self, insn) -> str:
        self.on = False
        self.current = None
        self.succeed()
        self.lp.publish("vmxoff")
        return "next"

    def _vmcs_pointer(self, insn, invalid_address_error: int, vmxon_pointer_error: int) -> int | None:
        """The VMCS-pointer operand of VMCLEAR or VMPTRLD; None once the instruction has failed."""
        address = self._read_operand(insn, decode.operands(insn)[0])
        if not self._valid_physical(address):
            self.fail(invalid_address_error)
            return None
        if address == self.vmxon_region:
            self.fail(vmxon_pointer_error)
            return None
        return address

    def _vmclear(self, insn) -> str:
        address = self._vmcs_pointer(insn, VmInstructionError.VMCLEAR_INVALID_ADDRESS,
                                     VmInstructionError.VMCLEAR_VMXON_POINTER)
        if address is not None:
            active = self.vmcs_cache.active.pop(address, None)
            if active is not None:
                active.launched = False
                # The guest instance gives its live state back to the fields first (once), then the
                # fields go to memory.
                self.vmcs_cache.release_guest_context(active)
                active.store(self.ram)
            else:
                self.ram.write_u32(address + vf.VMCS_LAUNCH_STATE_OFFSET, vf.LAUNCH_STATE_CLEAR)
            if self.current is not None and self.current.address == address:
                self.current = None
            self.succeed()
            self.lp.publish("vmclear", vmcs=address)
        return "next"

    def _vmptrld(self, insn) -> str:
        address = self._vmcs_pointer(insn, VmInstructionError.VMPTRLD_INVALID_ADDRESS,
                                     VmInstructionError.VMPTRLD_VMXON_POINTER)
        if address is None:
            return "next"
        if self.ram.read_u32(address) != CAPS.vmcs_revision_id:
            self.fail(VmInstructionError.VMPTRLD_INCORRECT_REVISION_ID)
            return "next"
        active = self.vmcs_cache.active.get(address)
        if active is None:
            active = ActiveVmcs.load(self.ram, address)
            self.vmcs_cache.active[address] = active
        self.current = active
        self.succeed()
        self.lp.publish("vmptrld", vmcs=address)
        return "next"

    def _vmptrst(self, insn) -> str:
        pointer = self.current.address if self.current is not None else INVALID_VMCS_POINTER
        self._write_operand(insn, decode.operands(insn)[0], pointer)
        self.succeed()
        return "next"

    def _vmread(self, insn) -> str:
        if self.current is None:
            self.fail_invalid()
            return "next"
        destination, source = decode.operands(insn)
        found = vf.lookup(self.lp.root.regs.read(source.register))
        if found is None:
            self.fail(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
            return "next"
        field, high = found
        self._write_operand(insn, destination, self.current.read_encoding(field, high))
        self.succeed()
        return "next"

    def _vmwrite(self, insn) -> str:
        if self.current is None:
            self.fail_invalid()
            return "next"
        destination, source = decode.operands(insn)
        value = self._read_operand(insn, source)
        found = vf.lookup(self.lp.root.regs.read(destination.register))
        if found is None:
            self.fail(VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
        elif found[0].read_only:
            self.fail(VmInstructionError.VMWRITE_READ_ONLY_COMPONENT)
        else:
            self.current.write_by_software(found[0], found[1], value)
            self.succeed()
        return "next"

    def _vmcall(self, insn) -> str:
        self.fail(VmInstructionError.VMCALL_IN_VMX_ROOT)
        return "next"

    def _invept(self, insn) -> str:
        register, descriptor_operand = decode.operands(insn)
        kind = self.lp.root.regs.read(register.register)
        descriptor = self._read_memory(self._effective_address(insn, descriptor_operand), INVEPT_DESCRIPTOR_SIZE)
        eptp = struct.unpack_from("<Q", descriptor)[0]
        if kind not in (InveptType.SINGLE_CONTEXT, InveptType.ALL_CONTEXT):
            self.fail(VmInstructionError.INVALID_INVEPT_INVVPID_OPERAND)
            return "next"
        self.vmcs_cache.invalidate_ept(None if kind == InveptType.ALL_CONTEXT else eptp)
        self.succeed()
        self.lp.publish("invept", type=kind, eptp=eptp)
        return "next"

    def _invvpid(self, insn) -> str:
        self.succeed()  # this machine tags no translations with VPIDs: nothing to invalidate
        return "next"

    def _vmlaunch(self, insn) -> str:
        return self._enter(insn, launching=True)

    def _vmresume(self, insn) -> str:
        return self._enter(insn, launching=False)

    # --- VM entry (SDM Vol. 3C 27) ------------------------------------------------------------------
    def _enter(self, insn, launching: bool) -> str:
        vmcs = self.current
        if vmcs is None:
            self.fail_invalid()
            return "next"
        failure = check_launch_state(vmcs.launch_state, launching=launching)
        if failure is not None:
            self.fail(failure.error)
            return "next"
        failure = self._check_entry(vmcs, launching)
        if failure is not None:
            self._report_entry_failure(vmcs, failure)
            if failure.kind == VMFAIL_VALID:
                self.fail(failure.error)
                return "next"
            return self._fail_entry(vmcs, failure.exit_reason, failure.qualification)
        failure = self.load_guest_state(vmcs, launching)
        if failure is not None:
            self._report_entry_failure(vmcs, failure)
            return self._fail_entry(vmcs, failure.exit_reason, failure.qualification)
        msr_loads = self._entry_msr_loads(vmcs)
        if isinstance(msr_loads, int):
            message = (f"VMENTER FAIL: VM-entry MSR-load entry {msr_loads} cannot be loaded (reserved bits, "
                       f"an MSR the list may not load, or outside RAM)")
            self.lp.publish("vm-entry-failed", vmcs=vmcs.address, check="msr-load", message=message)
            return self._fail_entry(vmcs, ExitReason.MSR_LOADING, msr_loads)
        self.begin_guest(vmcs, launching, insn.size, msr_loads=msr_loads)
        return "enter"

    def _report_entry_failure(self, vmcs: ActiveVmcs, failure: EntryCheckFailure) -> None:
        self.lp.publish("vm-entry-failed", vmcs=vmcs.address, check=failure.check, message=failure.message)
        self.counters.last_entry_failure = failure

    def _fail_entry(self, vmcs: ActiveVmcs, reason: int, qualification: int) -> str:
        """SDM Vol. 3C 27.8: a failure after the checks of 27.2 loads host state like a VM exit,
        with bit 31 of the exit reason set."""
        vmcs.write("VM_EXIT_REASON", EXIT_REASON_VM_ENTRY_FAILURE | int(reason))
        vmcs.write("EXIT_QUALIFICATION", qualification)
        self.load_host_state(vmcs)
        return "stay"

    def _entry_msr_loads(self, vmcs: ActiveVmcs) -> list[tuple[int, int]] | int:
        """The VM-entry MSR-load list (SDM Vol. 3C 27.4), or the 1-based number of the first entry
        that cannot be loaded: bits 63:32 of an entry are reserved, and only the MSRs of
        emu.msrs.ENTRY_LOADABLE_MSRS may be loaded, with values WRMSR would take. The list is checked
        whole before anything is loaded, so a failing list loads nothing."""
        loads = []
        for number, (_entry, index, reserved, value) in enumerate(self._msr_list(vmcs, "VM_ENTRY_MSR_LOAD"), 1):
            if index is None or reserved or not msrs.list_may_load(index, value):
                return number
            loads.append((index, value))
        return loads

    @staticmethod
    def _check_entry(vmcs: ActiveVmcs, launching: bool):
        """The checks of SDM Vol. 3C 27.2-27.3.1. Their outcome depends only on field values, so after a
        successful check the machine re-checks in full only when software wrote a field a check
        reads (emu.vmcs.KEEPS_VERIFICATION lists those it does not; GUEST_RIP's one check, canonical
        form, is done here); the guest cannot make its own state invalid for these checks."""
        if vmcs.entry_verified and not vmcs.fast.checked_field_written and \
                is_canonical(vmcs.read("GUEST_RIP"), CAPS.linear_address_width):
            return None
        failure = check_vm_entry(vmcs.read, CAPS, launching=launching)
        vmcs.entry_verified = failure is None
        if failure is None:
            vmcs.fast.checked_field_written = 0
        return failure

    def load_guest_state(self, vmcs: ActiveVmcs, launching: bool) -> EntryCheckFailure | None:
        """Loads the guest state of the VMCS into its guest instance (SDM Vol. 3C 27.3.2): all of it at
        the first entry, what software wrote since at later ones. Returns None, or the failure when
        the instance cannot take it (emu/segment_load.py); the guest is then not entered."""
        context = vmcs.context
        fresh = context is None
        if fresh:
            context = self.vmcs_cache.acquire_guest_context(vmcs)
        # The guest's translation first: loading FS and GS reads their descriptors through it.
        eptp = vmcs.read("EPT_POINTER")
        if context.fast.ctx.eptp != eptp or context.fast.ctx.mode != fast.MODE_GUEST:
            context.fast.set_mode(fast.MODE_GUEST, eptp)
            context.flush_translations()
        if fresh:
            return vmcs.bind(context)
        if launching:
            context.flush_code()
            return vmcs.bind(context)
        return vmcs.load_written_state()

    def begin_guest(self, vmcs: ActiveVmcs, launching: bool, instruction_length: int,
                    inject: bool = True, msr_loads: list[tuple[int, int]] = ()) -> None:
        """Hands the LP to the guest's context once its state is loaded (SDM Vol. 3C 27.4, 27.6)."""
        lp = self.lp
        context = vmcs.context
        # The VMX instruction retires in root mode before the guest starts.
        lp.root.set_reg(x86.UC_X86_REG_RIP, lp.root.reg(x86.UC_X86_REG_RIP) + instruction_length)
        lp.charge(lp.root, 1)
        # The guest runs on this LP: it shares the LP's x87/SSE state, CR2, DRs and MSRs (7.4).
        context.fast.attach_shared(lp.shared)
        for index, value in msr_loads:
            context.write_msr(index, value)
        if launching:
            vmcs.launched = True
        vmcs.lp_index = lp.index
        fast.copy_general_purpose_registers(lp.root.fast, context.fast)
        vmcs.halted = vmcs.read("GUEST_ACTIVITY_STATE") == ActivityState.HLT
        lp.enter_guest(vmcs)
        lp.publish("vm-entry", vmcs=vmcs.address, launch=launching, rip=vmcs.read("GUEST_RIP"))
        if vmcs.read("PIN_BASED_VM_EXEC_CONTROL") & PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER:
            lp.preemption_deadline = lp.now + (vmcs.read("VMX_PREEMPTION_TIMER_VALUE") << CAPS.preemption_timer_rate)
        else:
            lp.preemption_deadline = None
        entry_info = vmcs.read("VM_ENTRY_INTR_INFO_FIELD")
        if inject and entry_info & INTR_INFO_VALID:
            lp.inject_into_guest(vmcs, entry_info, vmcs.read("VM_ENTRY_EXCEPTION_ERROR_CODE"),
                                 vmcs.read("VM_ENTRY_INSTRUCTION_LEN"))

    # --- VM exit (SDM Vol. 3C 28) ------------------------------------------------------------------
    def exit_guest(self, vmcs: ActiveVmcs, reason: int, qualification: int = 0, *,
                   instruction_length: int = 0, guest_linear: int | None = None,
                   guest_physical: int | None = None, interruption_info: int = 0,
                   interruption_error: int | None = None, idt_vectoring_info: int = 0,
                   idt_vectoring_error: int = 0) -> None:
        lp = self.lp
        if vmcs.inverse_call_saved is not None:
            self._end_inverse_call(vmcs, succeeded=False, exit_reason=reason)
            return
        vmcs.record_exit(int(reason), qualification, instruction_length, interruption_info,
                         interruption_error or 0, idt_vectoring_info, idt_vectoring_error, guest_linear,
                         guest_physical, ActivityState.HLT if vmcs.halted else ActivityState.ACTIVE)
        self._save_preemption_timer(vmcs)
        stored = self._store_exit_msrs(vmcs)
        fast.copy_general_purpose_registers(vmcs.context.fast, lp.root.fast)
        self.counters.last_exits[vmcs.address] = lp.now
        lp.publish("vm-exit", vmcs=vmcs.address, reason=int(reason), qualification=qualification,
                   rip=vmcs.read("GUEST_RIP"))
        self.counters.count_exit(int(reason))
        lp.leave_guest()
        self.load_host_state(vmcs)
        if stored:
            self._load_exit_msrs(vmcs)

    def _msr_list(self, vmcs: ActiveVmcs, fields: str):
        """The entries of the MSR list whose fields are `fields`_COUNT and `fields`_ADDR (SDM Vol. 3C
        25.7.2, 25.8.2): (address, index, reserved, value), the last entry (address, None, None, None)
        if it does not lie in RAM."""
        address = vmcs.read(f"{fields}_ADDR")
        for number in range(vmcs.read(f"{fields}_COUNT")):
            entry = address + number * MSR_LIST_ENTRY.size
            if not self.ram.holds(entry, MSR_LIST_ENTRY.size):
                yield entry, None, None, None
                return
            yield (entry, *MSR_LIST_ENTRY.unpack(self.ram.read(entry, MSR_LIST_ENTRY.size)))

    def _store_exit_msrs(self, vmcs: ActiveVmcs) -> bool:
        """SDM Vol. 3C 28.4: the guest's value of each MSR of the VM-exit MSR-store list goes to its
        entry; an entry that cannot be stored is a VMX abort (28.7). False after an abort."""
        for entry, index, reserved, _value in self._msr_list(vmcs, "VM_EXIT_MSR_STORE"):
            value = None
            if index is not None and not reserved:
                try:
                    value = read_msr(self.lp.now, vmcs.context, index)
                except RaiseException:
                    value = None
            if value is None:
                self._vmx_abort(vmcs, VMX_ABORT_SAVING_GUEST_MSRS, f"VM-exit MSR-store entry at {entry:#x}")
                return False
            self.ram.write(entry + MSR_LIST_VALUE_OFFSET, MSR_VALUE.pack(value))
        return True

    def _load_exit_msrs(self, vmcs: ActiveVmcs) -> None:
        """SDM Vol. 3C 28.6: after host state, each MSR of the VM-exit MSR-load list is loaded as
        WRMSR would; an entry WRMSR would refuse, or that may not be loaded, is a VMX abort."""
        for entry, index, reserved, value in self._msr_list(vmcs, "VM_EXIT_MSR_LOAD"):
            if index is None or reserved or not msrs.list_may_load(index, value):
                self._vmx_abort(vmcs, VMX_ABORT_LOADING_HOST_MSRS, f"VM-exit MSR-load entry at {entry:#x}")
                return
            self.lp.root.write_msr(index, value)

    def _vmx_abort(self, vmcs: ActiveVmcs, indicator: int, what: str) -> None:
        """SDM Vol. 3C 28.7: the abort indicator goes to the VMCS region and the LP shuts down."""
        self.ram.write_u32(vmcs.address + vf.VMCS_ABORT_OFFSET, indicator)
        self.lp.host.machine_check(self.lp, f"VMX abort {indicator}: {what} cannot be processed")

    def _save_preemption_timer(self, vmcs: ActiveVmcs) -> None:
        """With "save VMX-preemption timer value", the ticks left (0 once the timer has fired) go to
        VMX_PREEMPTION_TIMER_VALUE (SDM Vol. 3C 28.3.4): at every VM exit, and at every end of an
        inverse hypercall, which stops the timer in the same way."""
        lp = self.lp
        if lp.preemption_deadline is not None and \
                vmcs.read("VM_EXIT_CONTROLS") & ExitControls.SAVE_VMX_PREEMPTION_TIMER_VALUE:
            remaining = max(lp.preemption_deadline - lp.now, 0) >> CAPS.preemption_timer_rate
            vmcs.write("VMX_PREEMPTION_TIMER_VALUE", remaining)

    def load_host_state(self, vmcs: ActiveVmcs) -> None:
        """SDM Vol. 3C 28.5: host RIP, RSP, control registers, bases and EFER; RFLAGS = 2."""
        uc = self.lp.root.uc
        regs = self.lp.root.regs
        host_cr3 = vmcs.read("HOST_CR3")
        if regs.read(x86.UC_X86_REG_CR3) != host_cr3:
            regs.write(x86.UC_X86_REG_CR3, host_cr3)
        for name, register in (("HOST_CR0", x86.UC_X86_REG_CR0), ("HOST_CR4", x86.UC_X86_REG_CR4),
                               ("HOST_FS_BASE", x86.UC_X86_REG_FS_BASE),
                               ("HOST_GS_BASE", x86.UC_X86_REG_GS_BASE)):
            value = vmcs.read(name)
            if regs.read(register) != value:
                regs.write(register, value)
        for name, register in (("HOST_GDTR_BASE", x86.UC_X86_REG_GDTR), ("HOST_IDTR_BASE", x86.UC_X86_REG_IDTR)):
            table = (vmcs.read(name), DESCRIPTOR_TABLE_LIMIT_AFTER_EXIT)
            if regs.read_table(register) != table:
                regs.write_table(register, *table)
        if vmcs.read("VM_EXIT_CONTROLS") & ExitControls.LOAD_IA32_EFER:
            uc.msr_write(MSR_IA32_EFER, vmcs.read("HOST_IA32_EFER"))
        regs.write(x86.UC_X86_REG_RSP, vmcs.read("HOST_RSP"))
        regs.write(x86.UC_X86_REG_RFLAGS, Rflags.FIXED1)
        regs.write(x86.UC_X86_REG_RIP, vmcs.read("HOST_RIP"))

    # --- VMCALLR: the inverse hypercall (docs/machine.md, "VMCALLR") --------------------------------
    def vmcallr(self, instruction_length: int) -> str:
        if not self.on:
            raise RaiseException(ExceptionVector.UD)
        vmcs = self.current
        if vmcs is None:
            self.fail_invalid()
            return "next"
        if not vmcs.launched or vmcs.context is None:
            self.fail(VMCALLR_NOT_LAUNCHED)
            return "next"
        entry = vmcs.read("INVERSE_HYPERCALL_ENTRY")
        if entry == 0:
            self.fail(VMCALLR_NO_ENTRY_POINT)
            return "next"
        if vmcs.inverse_call_saved is not None:
            self.fail(VMCALLR_ALREADY_IN_PROGRESS)
            return "next"
        failure = self._check_entry(vmcs, launching=False)
        if failure is not None:
            self.counters.last_entry_failure = failure
            self.fail(failure.error if failure.kind == VMFAIL_VALID else VmInstructionError.ENTRY_INVALID_CONTROL_FIELD)
            return "next"
        failure = self.load_guest_state(vmcs, launching=False)
        if failure is not None:
            self._report_entry_failure(vmcs, failure)
            self.fail(VmInstructionError.ENTRY_INVALID_CONTROL_FIELD)   # as a failed guest-state check
            return "next"
        lp = self.lp
        call_number = lp.root.reg(x86.UC_X86_REG_RAX)
        vmcs.inverse_call_saved = (vmcs.read("GUEST_RIP"), vmcs.read("GUEST_RSP"), vmcs.read("GUEST_RFLAGS"))
        lp.publish("vmcallr", vmcs=vmcs.address, call=call_number)
        self.counters.count_inverse_call(call_number)
        self.begin_guest(vmcs, launching=False, instruction_length=instruction_length, inject=False)
        vmcs.halted = False
        vmcs.write("GUEST_RIP", entry)
        stack = vmcs.read("INVERSE_HYPERCALL_STACK")
        if stack:
            vmcs.write("GUEST_RSP", stack)
        vmcs.write("GUEST_RFLAGS", Rflags.FIXED1)  # interrupts stay blocked during the call
        return "enter"

    def _end_inverse_call(self, vmcs: ActiveVmcs, succeeded: bool, exit_reason: int = 0) -> None:
        """Step 11 (the guest's VMCALL) or step 12 (a VM-exit condition, the VMX-preemption timer's
        expiry among them) of docs/machine.md 8.3: root continues after the VMCALLR."""
        lp = self.lp
        rip, rsp, rflags = vmcs.inverse_call_saved
        vmcs.inverse_call_saved = None
        self._save_preemption_timer(vmcs)
        if succeeded:
            fast.copy_general_purpose_registers(vmcs.context.fast, lp.root.fast)
        vmcs.write("GUEST_RIP", rip)
        vmcs.write("GUEST_RSP", rsp)
        vmcs.write("GUEST_RFLAGS", rflags)
        vmcs.halted = vmcs.read("GUEST_ACTIVITY_STATE") == ActivityState.HLT   # the state before the call
        lp.leave_guest()
        lp.publish("vmcallr-return", vmcs=vmcs.address, ok=succeeded,
                   result=lp.root.reg(x86.UC_X86_REG_RAX) if succeeded else None,
                   exit_reason=None if succeeded else int(exit_reason))
        if succeeded:
            self.succeed()
        else:
            vmcs.write("VM_EXIT_REASON", int(exit_reason))
            self.fail(VMCALLR_ENDED_BY_VM_EXIT)

    def return_from_inverse_call(self, vmcs: ActiveVmcs) -> None:
        """The guest's VMCALL while an inverse hypercall is in progress returns it to root mode."""
        self._end_inverse_call(vmcs, succeeded=True)
