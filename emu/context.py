"""An execution context: one Unicorn instance that runs a logical processor's root code or one VMCS's guest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from unicorn import Uc, UcError
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from emu import decode, fast, msrs
from emu.vmcs import FIELD_TABLE, TRANSITION_CONSTANTS
from emu.vmx_defs import PAGE_OFFSET_MASK, PAGE_SIZE, U32_MASK

# With Unicorn's exit list enabled, emu_start's `until` is ignored; this address is never executed
# (it is not canonical) and keeps the list non-empty.
NEVER_EXECUTED_ADDRESS = fast.lib.HHR_END_OF_RUN_ADDRESS
HLT_OPCODE = 0xF4

STALE_BLOCK_INSTRUCTIONS = 1

ROOT = "root"
GUEST = "guest"

# Instructions a Unicorn instruction hook carries out in place (emu/traps.py, Catch.HOOK), by the
# Unicorn instruction the hook is registered for: IN and OUT (INS and OUTS too) reach the I/O bus
# and CPUID the machine's table. A guest stops in front of them (Catch.EXIT_POINT) before a hook runs.
HOOKED_INSTRUCTIONS = {"in": x86.UC_X86_INS_IN, "out": x86.UC_X86_INS_OUT, "cpuid": x86.UC_X86_INS_CPUID}


@dataclass
class Stop:
    """Why a run of a context ended. `kind` is one of the STOP_* strings below."""

    kind: str
    rip: int
    vector: int = 0
    fault: fast.Fault | None = None
    error: int = 0
    instruction: decode.Instruction | None = None   # the trapped instruction, decoded


STOP_BUDGET = "budget"
STOP_INTERRUPT_WINDOW = "interrupt-window"
STOP_INVALID_OPCODE = "invalid-opcode"     # a VMX-like instruction or a real #UD
STOP_EXCEPTION = "exception"               # an exception or INT n raised by Unicorn
STOP_TRANSLATION_FAULT = "translation-fault"
STOP_TRAPPED_INSTRUCTION = "trapped-instruction"
STOP_HLT = "hlt"
STOP_EMULATOR_ERROR = "emulator-error"
STOP_NONCANONICAL = "noncanonical-rip"    # execution reached a non-canonical address (#GP)
STOP_REQUESTED = "requested"               # a device or the machine asked this run to end


# The C per-context fields that are machine state (the rest is scratch of a single run).
_SAVED_FIELDS = ("retired", "mode", "eptp")


@dataclass
class ContextState:
    """A context in a snapshot: its registers, counters and trap points, and its part in its LP's
    shared state (docs/machine.md 7.4)."""

    registers: object                     # Unicorn's saved context
    fields: dict[str, int]
    exit_points: frozenset[int]
    name: str
    shared: object                        # the LP shared state it takes part in (an hhr_shared *, or NULL)
    held: tuple[int, ...]                 # the generation of each shared class its copy holds


class ExecutionContext:
    """A Unicorn instance over the machine's whole RAM with our paging/EPT walker and counters."""

    def __init__(self, ram, maxphyaddr: int, kind: str, name: str,
                 io_in: Callable[[int, int], int], io_out: Callable[[int, int, int], None],
                 cpuid: Callable[[int, int], tuple[int, int, int, int]]):
        self.kind = kind
        self.name = name
        self.ram = ram
        self.uc = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
        self.uc.mem_map_ptr(0, ram.size, uc_const.UC_PROT_ALL, ram.pointer)
        self.uc.ctl_set_tlb_mode(uc_const.UC_TLB_VIRTUAL)
        self.regs = fast.Registers(self.uc)
        self.fast = fast.FastState(self.uc, ram.pointer, ram.size, maxphyaddr, self._on_new_block)
        self.exit_points: set[int] = set()
        self._pending_removals: list[tuple[int, int]] = []
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([NEVER_EXECUTED_ADDRESS])
        self.pending: Stop | None = None
        self._stop_requested = False
        self._cpuid = cpuid
        if kind == ROOT:
            # VMREAD/VMWRITE in C first; whatever it declines reaches _on_invalid_opcode.
            self.fast_vmx = fast.ffi.new("hhr_vmx *")
            self.fast_vmx.root = self.fast.ctx
            self.fast_vmx.fields = FIELD_TABLE
            self.fast_vmx.constants = TRANSITION_CONSTANTS
            fast.register_invalid_instruction_hook(self.uc, self.fast_vmx)
        else:
            fast.register_guest_invalid_instruction_hook(self.uc, self.fast.ctx)
        self.uc.hook_add(uc_const.UC_HOOK_INSN_INVALID, self._on_invalid_opcode)
        self.uc.hook_add(uc_const.UC_HOOK_INTR, self._on_interrupt)
        # A root instance's console OUTs may wait in its LP's transition loop (follow_lp).
        self._console_queue = fast.ffi.new("hhr_port_out *") if kind == ROOT else None
        if self._console_queue is not None:
            self._console_queue.ctx = self.fast.ctx
        self._io_hooks = fast.add_io_hooks(self.uc, io_in, io_out, self._console_queue)
        self.uc.hook_add(uc_const.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, HOOKED_INSTRUCTIONS["cpuid"])

    def follow_lp(self, loop, console_port: int) -> None:
        """Root of the LP whose transition loop is `loop` (an `hhr_lp *`): the OUTs to `console_port`
        of the loop's runs wait in its queue (emu/fastpath.c hhr_port_out_hook)."""
        self._console_queue.lp = loop
        self._console_queue.console_port = console_port

    # --- Unicorn hooks -------------------------------------------------------------------------
    def _on_new_block(self, pc: int, size: int) -> int:
        code = self.read_linear(pc, size, fast.ACCESS_FETCH)
        if code is None:
            # Translated through a cached mapping the tables no longer hold (changed without
            # INVLPG/INVEPT): the bytes cannot be read back, so the block counts as one instruction
            # and may touch any shared state.
            return STALE_BLOCK_INSTRUCTIONS | fast.USES_ALL << fast.BLOCK_USES_SHIFT
        scan = decode.scan_block(code, pc, self.kind == GUEST)
        new_traps = [address for address in scan.traps if address not in self.exit_points]
        if new_traps:
            self.exit_points.update(new_traps)
            self._pending_removals.append((pc, pc + size))
            return fast.NEW_BLOCK_STOP
        return scan.count | scan.uses << fast.BLOCK_USES_SHIFT

    def _on_invalid_opcode(self, uc, _user_data) -> bool:
        self.pending = Stop(STOP_INVALID_OPCODE, self.regs.read(x86.UC_X86_REG_RIP))
        self.fast.ctx.python_stop = 1
        uc.emu_stop()
        return True

    def _on_interrupt(self, uc, vector: int, _user_data) -> None:
        self.pending = Stop(STOP_EXCEPTION, self.regs.read(x86.UC_X86_REG_RIP), vector=vector)
        self.fast.ctx.python_stop = 1
        uc.emu_stop()

    def _on_cpuid(self, uc, _user_data) -> int:
        regs = self.regs
        leaf = regs.read(x86.UC_X86_REG_RAX) & U32_MASK
        subleaf = regs.read(x86.UC_X86_REG_RCX) & U32_MASK
        eax, ebx, ecx, edx = self._cpuid(leaf, subleaf)
        regs.write(x86.UC_X86_REG_RAX, eax)
        regs.write(x86.UC_X86_REG_RBX, ebx)
        regs.write(x86.UC_X86_REG_RCX, ecx)
        regs.write(x86.UC_X86_REG_RDX, edx)
        return 1  # skip Unicorn's own CPUID

    def request_stop(self) -> None:
        """Ends the current run at the end of the running block: the block hook stops the run before
        the next block, as it does when a budget runs out. (Unicorn's emu_stop would end the run at
        the block's end too, but after the current instruction once a per-instruction hook is
        installed: a trace would then change the run.)"""
        self._stop_requested = True
        ctx = self.fast.ctx
        ctx.python_stop = 1
        ctx.stop_at = ctx.retired

    # --- memory through this context's translation ----------------------------------------------
    def translate(self, linear: int, access: int):
        return self.fast.translate(linear, access)

    def read_linear_checked(self, linear: int, length: int,
                            access: int = fast.ACCESS_READ) -> tuple[bytes | None, fast.Fault | None]:
        """Reads bytes at a linear address; on failure, the fault of the first page that fails."""
        out = bytearray()
        while length > 0:
            physical, fault = self.fast.translate(linear, access)
            if fault is not None:
                return None, fault
            chunk = min(length, PAGE_SIZE - (linear % PAGE_SIZE))
            out += self.ram.read(physical, chunk)
            linear += chunk
            length -= chunk
        return bytes(out), None

    def read_linear(self, linear: int, length: int, access: int = fast.ACCESS_READ) -> bytes | None:
        """Reads bytes at a linear address; None if any page does not translate."""
        return self.read_linear_checked(linear, length, access)[0]

    def write_linear(self, linear: int, data: bytes) -> fast.Fault | None:
        """Writes bytes at a linear address; returns the fault of the first page that fails."""
        offset = 0
        while offset < len(data):
            physical, fault = self.fast.translate(linear + offset, fast.ACCESS_WRITE)
            if fault is not None:
                return fault
            chunk = min(len(data) - offset, PAGE_SIZE - ((linear + offset) % PAGE_SIZE))
            self.ram.write(physical, data[offset:offset + chunk])
            offset += chunk
        return None

    # --- running -------------------------------------------------------------------------------
    @property
    def retired(self) -> int:
        return self.fast.ctx.retired

    def add_retired(self, count: int) -> None:
        self.fast.ctx.retired += count

    def reg(self, register: int) -> int:
        return self.regs.read(register)

    def set_reg(self, register: int, value: int) -> None:
        self.regs.write(register, value)

    def write_shared(self, register: int, value: int) -> None:
        """Writes CR2 or a debug register, state the LP's root and guests share (docs/machine.md 7.4)."""
        self.fast.acquire_shared(fast.USES_SCALARS)
        self.regs.write(register, value)

    def read_shared(self, register: int) -> int:
        self.fast.acquire_shared(fast.USES_SCALARS)
        return self.regs.read(register)

    def read_msr(self, index: int) -> int:
        """An MSR Unicorn models, as software in this instance sees it (shared ones included)."""
        if index in msrs.SHARED_MSRS:
            self.fast.acquire_shared(fast.USES_SCALARS)
        return self.uc.msr_read(index)

    def write_msr(self, index: int, value: int) -> None:
        if index in msrs.SHARED_MSRS:
            self.fast.acquire_shared(fast.USES_SCALARS)
        self.uc.msr_write(index, value)

    def flush_translations(self) -> None:
        """Drops every cached translation (Unicorn's TLB): CR3 loads, INVEPT, a new EPTP."""
        self.uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)

    def apply_exit_points(self) -> None:
        """Hands the current set of trap points to Unicorn (plus the never-reached end of a run)."""
        self.uc.ctl_set_exits(sorted(self.exit_points) + [NEVER_EXECUTED_ADDRESS])

    def flush_code(self) -> None:
        """Drops translated code and per-block counts: code in RAM may have changed from outside."""
        self.uc.ctl_flush_tb()
        self.fast.forget_blocks()
        self.exit_points.clear()  # trap points belong to the old code; new blocks are rescanned
        self._pending_removals.clear()
        self.uc.ctl_set_exits([NEVER_EXECUTED_ADDRESS])

    def run(self, budget: int, watch_interrupt_window: bool = False) -> Stop:
        """Runs until `budget` instructions have retired (at a block boundary) or an event stops it."""
        ctx = self.fast.ctx
        ctx.stop_at = ctx.retired + max(budget, 0)
        ctx.stop_reason = fast.STOP_NONE
        ctx.watch_interrupt_window = 1 if watch_interrupt_window else 0
        ctx.block_size = 0
        ctx.python_stop = 0
        ctx.runs += 1
        self.clear_stop_request()
        start = self.regs.read(x86.UC_X86_REG_RIP)
        error = uc_const.UC_ERR_OK
        try:
            self.uc.emu_start(start, NEVER_EXECUTED_ADDRESS)
        except UcError as exc:
            error = exc.errno
        return self.classify(error, watch_interrupt_window)

    def clear_stop_request(self) -> None:
        """Before a run, by Python or by the C transition loop: no Python stop is pending."""
        self.pending = None
        self._stop_requested = False

    def classify(self, error: int, watch_interrupt_window: bool = False) -> Stop:
        """Why the run that just ended (from Python or from the transition loop) stopped."""
        ctx = self.fast.ctx
        rip = self.regs.read(x86.UC_X86_REG_RIP)
        if self._pending_removals:
            self.apply_exit_points()
            for begin, end in self._pending_removals:
                self.uc.ctl_remove_cache(begin, end)
            self._pending_removals.clear()
        if self.pending is not None:
            self._uncount_after(rip)
            return self.pending
        reason = ctx.stop_reason
        if reason == fast.STOP_BUDGET:
            return Stop(STOP_BUDGET, rip)
        if reason == fast.STOP_INTERRUPT_WINDOW:
            return Stop(STOP_INTERRUPT_WINDOW, rip)
        if reason == fast.STOP_NEW_TRAPS:
            # The block just seen holds instructions that must trap: its code is retranslated with
            # exit points in front of them, and the run goes on from the same place.
            return self.run(ctx.stop_at - ctx.retired, watch_interrupt_window)
        if reason == fast.STOP_FAULT:
            self._uncount_after(rip)
            return Stop(STOP_TRANSLATION_FAULT, rip, fault=self._exact_fault(rip, self.fast.fault()))
        if error != uc_const.UC_ERR_OK:
            return Stop(STOP_EMULATOR_ERROR, rip, error=error)
        if reason == fast.STOP_NONCANONICAL or rip == NEVER_EXECUTED_ADDRESS:
            return Stop(STOP_NONCANONICAL, rip)
        if rip in self.exit_points:
            instruction = self._trapped_instruction(rip)
            if instruction is not None:
                return Stop(STOP_TRAPPED_INSTRUCTION, rip, instruction=instruction)
            # Other code now sits where a trapped instruction was: forget the point and go on.
            self.exit_points.discard(rip)
            self.apply_exit_points()
            self.uc.ctl_remove_cache(rip, rip + 1)
            return self.run(ctx.stop_at - ctx.retired, watch_interrupt_window)
        if self._stop_requested:
            # Not a HLT even if the byte before RIP is F4 (an `out 0xf4, al` that stopped the machine).
            return Stop(STOP_REQUESTED, rip)
        previous = self.read_linear(rip - 1, 1, fast.ACCESS_FETCH)
        if previous is not None and previous[0] == HLT_OPCODE:
            return Stop(STOP_HLT, rip)
        return Stop(STOP_REQUESTED, rip)

    def fetch(self, rip: int) -> bytes:
        """The instruction bytes at RIP: fifteen, or as many as the mapped pages hold."""
        code = self.read_linear(rip, decode.MAX_INSTRUCTION_LENGTH, fast.ACCESS_FETCH)
        if code is None:
            code = self.read_linear(rip, PAGE_SIZE - rip % PAGE_SIZE, fast.ACCESS_FETCH) or b""
        return code

    def _trapped_instruction(self, rip: int) -> decode.Instruction | None:
        """The instruction at a trap point, if it is still one this context traps."""
        instruction = decode.decode_one(self.fetch(rip), rip)
        if instruction is None or not decode.is_trapped(instruction, self.kind == GUEST):
            return None
        return instruction

    def _exact_fault(self, rip: int, fault: fast.Fault) -> fast.Fault:
        """Unicorn's TLB-fill hook is told only the page of an access: find the byte that faulted from
        the instruction at RIP, so that CR2 and the guest-linear and guest-physical addresses of a VM
        exit are exact (SDM Vol. 3A 4.7, Vol. 3C 28.2.1). Falls back to the page's first byte."""
        page = fault.linear & ~PAGE_OFFSET_MASK
        exact = page
        if fault.access == fast.ACCESS_FETCH:
            if rip & ~PAGE_OFFSET_MASK == page:
                exact = rip
        else:
            code = self.read_linear(rip, decode.MAX_INSTRUCTION_LENGTH, fast.ACCESS_FETCH) or \
                self.read_linear(rip, 1, fast.ACCESS_FETCH)
            insn = decode.decode_one(code, rip) if code else None
            writing = fault.access == fast.ACCESS_WRITE
            for access in decode.memory_accesses(insn, self.regs.read) if insn is not None else ():
                if (access.writes if writing else access.reads) and \
                        access.linear < page + PAGE_SIZE and access.linear + access.size > page:
                    exact = max(access.linear, page)
                    break
        if exact == fault.linear:
            return fault
        guest_physical = fault.guest_physical
        if fault.kind != fast.FAULT_PAGE_FAULT and not fault.in_paging_structure:
            guest_physical = (guest_physical & ~PAGE_OFFSET_MASK) | (exact & PAGE_OFFSET_MASK)
        return dataclasses.replace(fault, linear=exact, guest_physical=guest_physical)

    def _uncount_after(self, rip: int) -> None:
        """A block was counted whole when it started; take back the instructions it did not retire."""
        ctx = self.fast.ctx
        begin, size = ctx.block_pc, ctx.block_size
        if size == 0 or not begin <= rip < begin + size:
            return
        code = self.read_linear(begin, rip - begin, fast.ACCESS_FETCH) if rip > begin else b""
        done = decode.scan_block(code, begin, self.kind == GUEST).count if code else 0
        ctx.retired -= ctx.block_icount - done
        ctx.block_size = 0

    # --- snapshots (emu/snapshot.py) ------------------------------------------------------------
    def save_state(self) -> ContextState:
        ctx = self.fast.ctx
        return ContextState(self.uc.context_save(), {name: getattr(ctx, name) for name in _SAVED_FIELDS},
                            frozenset(self.exit_points), self.name, ctx.shared, tuple(ctx.held))

    def restore_state(self, state: ContextState | None, keep_code: bool = False) -> None:
        """Back to `state`, or (None) to a new instance's counters and mode, outside any LP's shared
        state: it was made after the snapshot. Cached translations go; translated code and trap
        points too, unless `keep_code` (the caller knows no byte of code it ran differs, emu/dirty.py).
        Which classes of the shared state it holds is set again by its LP (`holds` starts empty)."""
        ctx = self.fast.ctx
        if state is not None:
            self.uc.context_restore(state.registers)
            for name, value in state.fields.items():
                setattr(ctx, name, value)
            self.name = state.name
            ctx.shared = state.shared
        else:
            ctx.retired = 0
            self.fast.set_mode(fast.MODE_ROOT)
            ctx.shared = fast.ffi.NULL
        ctx.holds = 0
        for cls in range(fast.lib.HHR_SHARED_CLASSES):
            ctx.held[cls] = state.held[cls] if state is not None and state.held else 0
        self.flush_translations()
        if keep_code and state is not None:
            return
        self.flush_code()
        if state is not None and state.exit_points:
            self.exit_points.update(state.exit_points)
            self.apply_exit_points()

    def release(self) -> None:
        self.fast.release()
