"""A logical processor: runs root code or a guest in slices of virtual time and turns every stop into its architectural effect."""
from __future__ import annotations

import bisect
import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from emu import context as ctxmod
from emu import decode, exit_conditions, fast, interrupts, msrs, traps
from emu.devices import Timer
from emu.instruction_fault import RaiseException
from emu.vmcs import ActiveVmcs
from emu.vmx import VmxUnit
from emu.vmx_defs import (
    ExitReason, InterruptionType, PinBasedControls, PrimaryProcessorControls, make_interruption_info,
    INTR_INFO_VECTOR_MASK, INTR_INFO_TYPE_MASK, INTR_INFO_TYPE_SHIFT,
    INTR_INFO_DELIVER_ERROR_CODE, ExitControls, EXCEPTIONS_WITH_ERROR_CODE, ExceptionVector, Rflags,
    FIRST_DEVICE_VECTOR,
)

if TYPE_CHECKING:
    from emu.devices import IoBus
    from emu.events import EventStream
    from emu.memory import HostMemory
    from emu.vmcs_cache import VmcsCache
    from emu.vmx_counters import VmxCounters

# hhr_on_loop_events finds the LP whose transition loop calls by its number, held weakly (an LP must
# stay free to be collected with its machine), as emu/fast.py finds a context's block handler.
_loop_event_publishers: dict[int, weakref.WeakMethod] = {}
_next_loop_id = itertools.count(1)


@fast.ffi.def_extern()
def hhr_on_loop_events(python_id):
    return _loop_event_publishers[python_id]()()


# The kinds of the loop's queued events (emu/fastpath.h), read once: every event is one of them.
_LOOP_VM_EXIT = fast.lib.HHR_EVENT_VM_EXIT
_LOOP_VM_ENTRY = fast.lib.HHR_EVENT_VM_ENTRY
_LOOP_INVERSE_CALL = fast.lib.HHR_EVENT_INVERSE_CALL
_LOOP_CONSOLE_OUT = fast.lib.HHR_EVENT_CONSOLE_OUT


INT3_OPCODE = 0xCC
INTO_OPCODE = 0xCE
INT_N_OPCODE = 0xCD
INT_N_LENGTH = 2
SOFTWARE_EXCEPTION_LENGTH = 1
# Unicorn errors that stand for an access the architecture refuses with #GP.
PROTECTION_ERRORS = frozenset({uc_const.UC_ERR_FETCH_PROT, uc_const.UC_ERR_READ_PROT, uc_const.UC_ERR_WRITE_PROT,
                               uc_const.UC_ERR_EXCEPTION})


@dataclass
class LpState:
    """An LP in a snapshot."""

    time: int
    instructions: int
    pending_vectors: list[int]
    halted: bool
    preemption_deadline: int | None
    guest: int | None                     # the address of the VMCS whose guest runs, if one does
    timer: tuple
    transitions_in_c: int
    vmx: tuple
    cr2_history: list[int]
    shared: tuple                         # per class of the shared state: the holder's python id and the generation


class LpHost(Protocol):
    """What an LP asks of the machine that schedules it: whether to go on running, the machine-wide
    instruction count and limit, a stop for a machine check or a triple fault, the machine's random
    generator (RDRAND, emu/trap_emulation.py), and who watches trapped instructions."""

    retired: int                          # instructions retired by the whole machine; LPs add to it
    fast_transitions: bool                # common VM exits and entries may run in C (emu/fastpath.c)
    trapped_instruction_observer: Callable | None

    @property
    def stop_requested(self) -> bool: ...

    def instruction_limit_reached(self) -> bool: ...

    def instruction_limit_time(self) -> int: ...

    def machine_check(self, lp: "LogicalProcessor", message: str) -> None: ...

    def triple_fault(self, lp: "LogicalProcessor", rip: int) -> None: ...

    def next_random(self) -> int: ...


class LogicalProcessor:
    """One LP: its root context, VMX unit, timer, pending interrupts and virtual clock. Besides its
    LpHost it uses RAM (the MSR and I/O bitmaps), the event stream, the I/O bus (a guest's I/O
    without an exit, and the completions of the bus's devices), the VMCS cache, the transition
    counters, and the machine's contexts by python id (the one the C loop runs)."""

    def __init__(self, index: int, root: ctxmod.ExecutionContext, host: LpHost, *, ram: "HostMemory",
                 events: "EventStream", io: "IoBus", vmcs_cache: "VmcsCache", counters: "VmxCounters",
                 context_by_id: dict[int, ctxmod.ExecutionContext], start_time: int = 0):
        self.host = host
        self.ram = ram
        self.events = events
        self.io = io
        self.counters = counters
        self.context_by_id = context_by_id
        self.index = index
        self.root = root
        # What root and guest share on this LP (docs/machine.md 7.4); TSC_AUX starts at the LP index.
        self.shared = fast.new_shared_state(self.root.fast.ctx)
        self.root.uc.msr_write(msrs.IA32_TSC_AUX, index)
        self.vmx = VmxUnit(self, ram, vmcs_cache, counters)
        self.timer = Timer()
        self.pending_vectors: list[int] = []
        self.guest: ActiveVmcs | None = None
        self.halted = False
        self.preemption_deadline: int | None = None
        self.cr2_history: list[int] = []
        self._time = start_time   # after a reset, virtual time goes on (docs/machine.md 4.3)
        self.instructions = 0   # retired on this LP, root and guest, excluding idle time
        self._running: ctxmod.ExecutionContext | None = None
        self._run_mark = 0
        # The C transition loop (emu/fastpath.c, hhr_run_transitions) and whether it is running.
        self._transitions = fast.ffi.new("hhr_lp *")
        self._transitions.root = self.root.fast.ctx
        self._transitions.vmx = self.root.fast_vmx
        self._transitions.handover = fast.HANDOVER_REGISTERS
        self._transitions.handover_count = fast.HANDOVER_REGISTER_COUNT
        self._transitions.shared = self.shared
        self._transitions.python_id = python_id = next(_next_loop_id)
        self.root.follow_lp(self._transitions, io.CONSOLE_PORT)
        _loop_event_publishers[python_id] = weakref.WeakMethod(self._publish_from_loop)
        weakref.finalize(self, _loop_event_publishers.pop, python_id, None)
        self._loop_error: BaseException | None = None   # raised by a subscriber the loop called
        self._in_transitions = False
        self.transitions_in_c = 0    # VM exits and entries (VMCALLR and its return too) the C loop carried out

    # --- snapshots (emu/snapshot.py) -------------------------------------------------------------------
    def save_state(self) -> LpState:
        """Between runs: its clock, interrupts, timer, VMX state and who holds its shared state."""
        shared = self.shared
        holders = tuple((fast.ffi.cast("hhr_ctx *", shared.holder[cls]).python_id, shared.generation[cls])
                        for cls in range(fast.lib.HHR_SHARED_CLASSES))
        return LpState(self._time, self.instructions, list(self.pending_vectors), self.halted,
                       self.preemption_deadline, self.guest.address if self.guest is not None else None,
                       self.timer.save_state(), self.transitions_in_c, self.vmx.save_state(),
                       list(self.cr2_history), holders)

    def restore_state(self, state: LpState, active_vmcs: dict[int, ActiveVmcs],
                      context_by_id: dict[int, ctxmod.ExecutionContext]) -> None:
        """Back to `state`; the VMCSs and contexts it names are restored already."""
        self._time, self.instructions = state.time, state.instructions
        self.pending_vectors = list(state.pending_vectors)
        self.halted, self.preemption_deadline = state.halted, state.preemption_deadline
        self.guest = active_vmcs[state.guest] if state.guest is not None else None
        self.timer.restore_state(state.timer)
        self.transitions_in_c = state.transitions_in_c
        self.vmx.restore_state(state.vmx, active_vmcs)
        self.cr2_history = list(state.cr2_history)
        for cls, (holder, generation) in enumerate(state.shared):
            holder_ctx = context_by_id[holder].fast.ctx
            self.shared.holder[cls] = holder_ctx
            self.shared.generation[cls] = generation
            holder_ctx.holds |= 1 << cls

    # --- time ----------------------------------------------------------------------------------------
    @property
    def now(self) -> int:
        if self._in_transitions:
            loop = self._transitions
            running = loop.running
            if running == fast.ffi.NULL:
                return loop.time
            return loop.run_time_base + running.retired - loop.run_mark
        if self._running is not None:
            return self._time + self._running.retired - self._run_mark
        return self._time

    @property
    def run_state(self):
        """This LP's hhr_lp (emu/fastpath.h), for C code that follows the LP: its shared state, its
        VMX unit, and the clock of the run under way (`run_time_base` + the running instance's
        retired - `run_mark`), kept by the C loop and by Python's own runs alike."""
        return self._transitions

    def charge(self, context, count: int) -> None:
        """Counts instructions the machine carried out itself (emulated or trapped ones)."""
        context.add_retired(count)
        self._account(count)

    def _account(self, retired: int) -> None:
        """Instructions retired on this LP move its virtual time and the machine's count."""
        self._time += retired
        self.instructions += retired
        self.host.retired += retired

    def end_run_by(self, deadline: int) -> None:
        """A deadline set while the LP runs (a timer armed by the running code) ends the run then."""
        if self._in_transitions:
            loop = self._transitions
            loop.deadline = min(loop.deadline, deadline)
            ctx = loop.running
        else:
            ctx = self._running.fast.ctx if self._running is not None else fast.ffi.NULL
        if ctx != fast.ffi.NULL:
            ctx.stop_at = min(ctx.stop_at, ctx.retired + max(deadline - self.now, 0))

    def running_context(self) -> ctxmod.ExecutionContext:
        """The context executing on this LP right now (inside a run), else the one that runs next."""
        if self._in_transitions:
            loop = self._transitions
            running = loop.running
            if running == fast.ffi.NULL:   # between two of the loop's runs: the one it runs next
                current = loop.vmx.current
                running = current.guest_ctx if loop.in_guest and current != fast.ffi.NULL else loop.root
            return self.context_by_id[running.python_id]
        return self._running if self._running is not None else self.context

    def publish(self, kind: str, **data) -> None:
        self.events.publish(self.now, self.index, kind, **data)

    # --- mode ----------------------------------------------------------------------------------------
    @property
    def context(self) -> ctxmod.ExecutionContext:
        return self.guest.context if self.guest is not None else self.root

    def enter_guest(self, vmcs: ActiveVmcs) -> None:
        self.guest = vmcs

    def leave_guest(self) -> None:
        self.guest = None
        self.preemption_deadline = None

    def raise_interrupt(self, vector: int) -> None:
        if vector not in self.pending_vectors:
            bisect.insort(self.pending_vectors, vector)
        if self._in_transitions:
            self._transitions.attention = 1   # Python decides how the vector is taken
        elif self._interrupts_enabled_in_root():
            self.halted = False

    def is_stuck(self) -> bool:
        """Halted with nothing that could ever wake it: no timer or preemption deadline, and no
        pending vector it could take (root with IF=0, a guest that neither exits on external
        interrupts nor has IF=1, or a guest in an inverse hypercall, which takes none)."""
        if self.timer.deadline is not None or self.preemption_deadline is not None:
            return False
        if self.io.deadline(self.index) is not None:
            return False
        if self.guest is None:
            return self.halted and not (self.pending_vectors and self._interrupts_enabled_in_root())
        vmcs = self.guest
        if not vmcs.halted:
            return False
        if vmcs.inverse_call_saved is not None:
            return True   # interrupts are held pending during an inverse hypercall: only its timer wakes it
        takes_interrupts = bool(vmcs.read("PIN_BASED_VM_EXEC_CONTROL") & PinBasedControls.EXTERNAL_INTERRUPT_EXITING) \
            or bool(vmcs.read("GUEST_RFLAGS") & Rflags.IF)
        return not (self.pending_vectors and takes_interrupts)

    def _interrupts_enabled_in_root(self) -> bool:
        return self.guest is None and bool(self.root.reg(x86.UC_X86_REG_RFLAGS) & Rflags.IF)

    # --- the run loop --------------------------------------------------------------------------------
    def run_slice(self, slice_end: int) -> None:
        host = self.host
        while self.now < slice_end and not host.stop_requested:
            if self._service_events():
                continue
            if self.halted or (self.guest is not None and self.guest.halted):
                self._idle_until(slice_end)
                continue
            deadline = self._next_event_by(min(slice_end, host.instruction_limit_time()))
            if self._transitions_allowed() and self._run_transitions(deadline):
                if host.instruction_limit_reached():
                    break
                continue
            context = self.context
            budget = max(deadline - self.now, 1)
            watch = self._wants_window()
            self._run_and_handle(context, lambda: context.run(budget, watch_interrupt_window=watch))
            if host.instruction_limit_reached():
                break

    # --- the C transition loop -------------------------------------------------------------------------
    def _transitions_allowed(self) -> bool:
        """The loop carries out only transitions that need nothing of Python: no vector pending, no
        HLT state (it re-checks the rest itself, and leaves every end of an inverse hypercall but
        the guest's VMCALL to Python)."""
        if not self.host.fast_transitions or not self.vmx.on or self.pending_vectors or self.halted:
            return False
        guest = self.guest
        return guest is None or not guest.halted

    def _run_transitions(self, deadline: int) -> bool:
        """Runs the C loop; False if it declined to run anything (Python takes this turn)."""
        loop = self._transitions
        vmcs = self.vmx.current
        contexts = [self.root] + ([vmcs.context] if vmcs is not None and vmcs.context is not None else [])
        for context in contexts:
            context.clear_stop_request()
            context.uc._hook_exception = None
        loop.in_guest = 1 if self.guest is not None else 0
        loop.time = self._time
        loop.deadline = deadline
        loop.preemption_active = 1 if self.preemption_deadline is not None else 0
        loop.preemption_deadline = self.preemption_deadline or 0
        loop.attention = 0
        self._in_transitions = True
        self.events.before_publish = self._publish_transition_events
        try:
            result = fast.lib.hhr_run_transitions(loop)
        finally:
            self._in_transitions = False
            self.events.before_publish = None
        self._publish_transition_events()
        if not loop.runs:
            return False
        self._time = loop.time
        self.preemption_deadline = loop.preemption_deadline if loop.preemption_active else None
        self.instructions += loop.retired
        self.host.retired += loop.retired
        for context in contexts:
            if context.uc._hook_exception is not None:
                raise context.uc._hook_exception
        if self._loop_error is not None:
            error, self._loop_error = self._loop_error, None
            raise error
        if loop.in_guest:
            self.guest = vmcs
            vmcs.lp_index = self.index
        elif self.guest is not None:
            self.leave_guest()
        if result != fast.lib.HHR_LOOP_CLASSIFY:
            return True
        context = vmcs.context if loop.in_guest else self.root
        self._run_and_handle(context, lambda: context.classify(loop.last_error))
        return True

    def _run_and_handle(self, context: ctxmod.ExecutionContext, run: Callable[[], ctxmod.Stop]) -> None:
        """Carries out `run` (one run of `context`, or the classification of one), counts what it
        retired on this LP, and gives its stop its architectural effect."""
        self._running, self._run_mark = context, context.retired
        loop = self._transitions     # the run's clock, as the C loop keeps it for its own runs
        loop.running, loop.run_mark, loop.run_time_base = context.fast.ctx, self._run_mark, self._time
        try:
            stop = run()
        finally:
            self._account(context.retired - self._run_mark)
            self._running = None
            loop.running = fast.ffi.NULL
        if self.guest is not None and context is not self.root:
            self._handle_guest_stop(stop)
        else:
            self._handle_root_stop(stop)

    def _publish_transition_events(self) -> None:
        """The loop's VM exits and entries, published in order before any later event."""
        loop = self._transitions
        count = loop.event_count
        if not count:
            return
        loop.event_count = 0
        events = self.events
        hook, events.before_publish = events.before_publish, None
        queued = loop.events
        for index in range(count):
            event = queued[index]
            kind = event.kind
            if kind == _LOOP_CONSOLE_OUT:     # not a transition: root's OUT to the console, in its run
                self.io.queued_console_write(event.time, self.index, event.rip, event.qualification)
                continue
            if kind != _LOOP_INVERSE_CALL:   # a VMCALLR is one transition: its vm-entry
                self.transitions_in_c += 1
            if kind == _LOOP_VM_EXIT:
                self.counters.last_exits[event.vmcs] = event.time
                events.publish(event.time, self.index, "vm-exit", vmcs=event.vmcs, reason=event.reason,
                               qualification=event.qualification, rip=event.rip)
                self.counters.count_exit(event.reason)
            elif kind == _LOOP_VM_ENTRY:
                events.publish(event.time, self.index, "vm-entry", vmcs=event.vmcs, launch=False, rip=event.rip)
            elif kind == _LOOP_INVERSE_CALL:   # as VmxUnit.vmcallr publishes and counts it
                events.publish(event.time, self.index, "vmcallr", vmcs=event.vmcs, call=event.qualification)
                self.counters.count_inverse_call(event.qualification)
            else:                                            # as VmxUnit._end_inverse_call, on success
                events.publish(event.time, self.index, "vmcallr-return", vmcs=event.vmcs, ok=True,
                               result=event.qualification, exit_reason=None)
        events.before_publish = hook

    def _publish_from_loop(self) -> int:
        """Called by the C loop between two runs while a trace follows the LP (hhr_lp.publish_each):
        the events it queued are published now, before the next instruction runs. Nonzero when the
        loop must end: the machine is stopping, or a subscriber failed (raised once the loop is out)."""
        try:
            self._publish_transition_events()
        except BaseException as exc:   # a C caller cannot carry it
            self._loop_error = exc
            return 1
        return 1 if self.host.stop_requested else 0

    def _next_event_by(self, limit: int) -> int:
        """The earlier of `limit` and the LP's timer and VMX-preemption-timer deadlines."""
        return min([limit] + [deadline for deadline in (self.timer.deadline, self.preemption_deadline,
                                                        self.io.deadline(self.index))
                              if deadline is not None])

    def _idle_until(self, slice_end: int) -> None:
        self._time = max(self._time, self._next_event_by(slice_end))

    def _wants_window(self) -> bool:
        if self.guest is None:
            return bool(self.pending_vectors)
        if self.guest.inverse_call_saved is not None:
            return False  # interrupts are held pending while an inverse hypercall runs
        controls = self.guest.read("CPU_BASED_VM_EXEC_CONTROL")
        pin = self.guest.read("PIN_BASED_VM_EXEC_CONTROL")
        return bool(controls & PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING) or \
            (bool(self.pending_vectors) and not pin & PinBasedControls.EXTERNAL_INTERRUPT_EXITING)

    def _service_events(self) -> bool:
        """Timers, interrupt acceptance and guest event exits at an instruction boundary. True if
        something changed what the LP runs next."""
        vector = self.timer.expire(self.now)
        if vector:
            self.raise_interrupt(vector)
        for vector in self.io.completed_vectors(self.index, self.now):
            self.raise_interrupt(vector)
        if self.guest is None:
            if self.pending_vectors and self._interrupts_enabled_in_root():
                self._deliver_root(self.pending_vectors.pop(), None, self.root.reg(x86.UC_X86_REG_RIP))
                self.halted = False
                return True
            return False
        vmcs = self.guest
        if self.preemption_deadline is not None and self.now >= self.preemption_deadline:
            # Also during an inverse hypercall: the timer bounds the call and ends it (exit_guest).
            self.vmx.exit_guest(vmcs, ExitReason.PREEMPTION_TIMER)
            return True
        if vmcs.inverse_call_saved is not None:
            return False  # interrupts and interrupt windows are held pending while an inverse hypercall runs
        pin = vmcs.read("PIN_BASED_VM_EXEC_CONTROL")
        if self.pending_vectors and pin & PinBasedControls.EXTERNAL_INTERRUPT_EXITING:
            info = 0
            if vmcs.read("VM_EXIT_CONTROLS") & ExitControls.ACKNOWLEDGE_INTERRUPT_ON_EXIT:
                info = make_interruption_info(self.pending_vectors.pop(), InterruptionType.EXTERNAL_INTERRUPT)
            self.vmx.exit_guest(vmcs, ExitReason.EXTERNAL_INTERRUPT, interruption_info=info)
            return True
        guest_if = bool(vmcs.read("GUEST_RFLAGS") & Rflags.IF)
        if guest_if and vmcs.read("CPU_BASED_VM_EXEC_CONTROL") & PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING:
            self.vmx.exit_guest(vmcs, ExitReason.INTERRUPT_WINDOW)
            return True
        if guest_if and self.pending_vectors:
            vmcs.halted = False
            self._deliver_guest(vmcs, self.pending_vectors.pop(), None, vmcs.read("GUEST_RIP"),
                                InterruptionType.EXTERNAL_INTERRUPT)
            return True
        return False

    # --- root mode -----------------------------------------------------------------------------------
    def _handle_root_stop(self, stop: ctxmod.Stop) -> None:
        kind = stop.kind
        if kind in (ctxmod.STOP_BUDGET, ctxmod.STOP_INTERRUPT_WINDOW, ctxmod.STOP_REQUESTED):
            return
        try:
            if kind == ctxmod.STOP_INVALID_OPCODE:
                self._root_invalid_opcode(stop.rip)
            elif kind == ctxmod.STOP_TRAPPED_INSTRUCTION:
                self._notify_trapped(self.root, stop.instruction)
                self._root_trapped(stop.instruction)
            elif kind == ctxmod.STOP_HLT:
                self.halted = True
                self.publish("hlt", rip=stop.rip)
            elif kind == ctxmod.STOP_EXCEPTION:
                self._root_exception(stop)
            elif kind == ctxmod.STOP_NONCANONICAL:
                self._deliver_root(ExceptionVector.GP, 0, stop.rip)
            elif kind == ctxmod.STOP_TRANSLATION_FAULT:
                self._root_translation_fault(stop)
            else:
                self._root_emulator_error(stop)
        except RaiseException as exc:
            if exc.cr2 is not None:
                self.root.write_shared(x86.UC_X86_REG_CR2, exc.cr2)
            self._deliver_root(exc.vector, exc.error_code, stop.rip)

    def _root_invalid_opcode(self, rip: int) -> None:
        code = self.root.fetch(rip)
        if code.startswith(decode.VMCALLR_OPCODE):
            outcome = self.vmx.vmcallr(decode.VMCALLR_LENGTH)
            if outcome == "next":
                self.root.set_reg(x86.UC_X86_REG_RIP, rip + decode.VMCALLR_LENGTH)
                self.charge(self.root, 1)
            return
        insn = decode.decode_one(code, rip)
        if insn is None or traps.invalid_opcode_trap(insn.mnemonic) is None:
            raise RaiseException(ExceptionVector.UD)
        outcome = self.vmx.execute(insn, insn.mnemonic)
        if outcome == "next":
            self.root.set_reg(x86.UC_X86_REG_RIP, rip + insn.size)
            self.charge(self.root, 1)
        elif outcome == "stay":
            self.charge(self.root, 1)

    def _notify_trapped(self, context: ctxmod.ExecutionContext, insn: decode.Instruction) -> None:
        """A tracer, if one listens, sees the trapped instruction Unicorn does not run."""
        observer = self.host.trapped_instruction_observer
        if observer is not None:
            observer(self, context, insn)

    def _root_trapped(self, insn: decode.Instruction) -> None:
        """Root mode carries out every instruction it traps (emu/traps.py, Catch.EXIT_POINT)."""
        trap = traps.exit_point_trap(insn.mnemonic, insn.op_str, guest=False)
        traps.resolve(trap.emulation)(self, self.root, insn)

    def _root_exception(self, stop: ctxmod.Stop) -> None:
        kind, _length = self._classify_event(self.root, stop.rip, stop.vector)
        hardware = kind == InterruptionType.HARDWARE_EXCEPTION
        error_code = 0 if hardware and stop.vector in EXCEPTIONS_WITH_ERROR_CODE else None
        self._deliver_root(stop.vector, error_code, stop.rip)

    @staticmethod
    def _classify_event(context, rip: int, vector: int) -> tuple[InterruptionType, int]:
        """What raised a vector Unicorn reports: INT3 (CC) and INTO (CE) are software exceptions
        of length 1 and INT n (CD n) a software interrupt of length 2, all with RIP after the
        instruction; anything else is a hardware exception at RIP (SDM Vol. 3C 25.8.3, 27.6.1.1)."""
        last = context.read_linear(rip - SOFTWARE_EXCEPTION_LENGTH, SOFTWARE_EXCEPTION_LENGTH, fast.ACCESS_FETCH)
        if last is not None and ((last[0] == INT3_OPCODE and vector == ExceptionVector.BP) or
                                 (last[0] == INTO_OPCODE and vector == ExceptionVector.OF)):
            return InterruptionType.SOFTWARE_EXCEPTION, SOFTWARE_EXCEPTION_LENGTH
        before = context.read_linear(rip - INT_N_LENGTH, INT_N_LENGTH, fast.ACCESS_FETCH)
        if before is not None and before[0] == INT_N_OPCODE and before[1] == vector:
            return InterruptionType.SOFTWARE_INTERRUPT, INT_N_LENGTH
        return InterruptionType.HARDWARE_EXCEPTION, 0

    def _root_translation_fault(self, stop: ctxmod.Stop) -> None:
        fault = stop.fault
        if fault.kind == fast.FAULT_PAGE_FAULT:
            self.root.write_shared(x86.UC_X86_REG_CR2, fault.linear)
            self.publish("page-fault", rip=stop.rip, address=fault.linear, error_code=fault.page_fault_error_code)
            self._deliver_root(ExceptionVector.PF, fault.page_fault_error_code, stop.rip)
            return
        self.host.machine_check(self, f"access to nonexistent host-physical memory "
                                         f"{fault.guest_physical:#x} at RIP {stop.rip:#x}")

    def _root_emulator_error(self, stop: ctxmod.Stop) -> None:
        if stop.error in PROTECTION_ERRORS:
            self._deliver_root(ExceptionVector.GP, 0, stop.rip)
            return
        self.host.machine_check(self, f"emulator error {stop.error} at RIP {stop.rip:#x}")

    def _deliver_root(self, vector: int, error_code: int | None, return_rip: int) -> None:
        """Delivers through the root IDT; a fault while delivering becomes #DF, then a triple fault."""
        self.publish("exception" if vector < FIRST_DEVICE_VECTOR else "interrupt",
                     vector=vector, rip=return_rip, error_code=error_code)
        for attempt_vector, attempt_error in ((vector, error_code), (ExceptionVector.DF, 0)):
            try:
                interrupts.deliver(self.root, attempt_vector, attempt_error, return_rip, self.cr2_history)
                return
            except interrupts.DeliveryFault as fault:
                self.publish("delivery-fault", vector=attempt_vector, fault_vector=fault.vector)
                if attempt_vector == ExceptionVector.DF:
                    break
        self.host.triple_fault(self, return_rip)

    # --- non-root mode -------------------------------------------------------------------------------
    def _handle_guest_stop(self, stop: ctxmod.Stop) -> None:
        vmcs = self.guest
        context = vmcs.context
        kind = stop.kind
        if kind in (ctxmod.STOP_BUDGET, ctxmod.STOP_INTERRUPT_WINDOW, ctxmod.STOP_REQUESTED):
            return
        if kind == ctxmod.STOP_INVALID_OPCODE:
            code = context.fetch(stop.rip)
            if code.startswith(traps.VMCALLR.opcode):
                self.vmx.exit_guest(vmcs, traps.VMCALLR.exit_reason, instruction_length=decode.VMCALLR_LENGTH)
                return
            insn = decode.decode_one(code, stop.rip)
            trap = traps.invalid_opcode_trap(insn.mnemonic) if insn is not None else None
            if trap is traps.VMCALL and vmcs.inverse_call_saved is not None:
                self.vmx.return_from_inverse_call(vmcs)
                return
            if trap is not None:
                self.vmx.exit_guest(vmcs, trap.exit_reason, instruction_length=insn.size)
                return
            self._guest_exception(vmcs, ExceptionVector.UD, None, stop.rip)
        elif kind == ctxmod.STOP_TRAPPED_INSTRUCTION:
            self._notify_trapped(context, stop.instruction)
            self._guest_trapped(vmcs, stop.instruction)
        elif kind == ctxmod.STOP_HLT:   # a HLT that ran before its trap point was set
            rip = stop.rip - 1
            context.set_reg(x86.UC_X86_REG_RIP, rip)
            instruction = decode.decode_one(context.fetch(rip), rip)
            self._notify_trapped(context, instruction)
            self._guest_trapped(vmcs, instruction)
        elif kind == ctxmod.STOP_EXCEPTION:
            kind, length = self._classify_event(context, stop.rip, stop.vector)
            hardware = kind == InterruptionType.HARDWARE_EXCEPTION
            error_code = 0 if hardware and stop.vector in EXCEPTIONS_WITH_ERROR_CODE else None
            self._guest_exception(vmcs, stop.vector, error_code, stop.rip, kind=kind, length=length)
        elif kind == ctxmod.STOP_TRANSLATION_FAULT:
            self._guest_translation_fault(vmcs, stop)
        elif kind == ctxmod.STOP_EMULATOR_ERROR and stop.error not in PROTECTION_ERRORS:
            # Not an architectural event: the guest ends cleanly with a machine-specific exit.
            self.vmx.exit_guest(vmcs, ExitReason.GUEST_CANNOT_CONTINUE, stop.error)
        else:   # a non-canonical address, or an access Unicorn refused: #GP (SDM Vol. 1 3.3.7.1)
            self._guest_exception(vmcs, ExceptionVector.GP, 0, stop.rip)

    def _guest_translation_fault(self, vmcs: ActiveVmcs, stop: ctxmod.Stop) -> None:
        fault = stop.fault
        if fault.kind == fast.FAULT_PAGE_FAULT:
            self._guest_exception(vmcs, ExceptionVector.PF, fault.page_fault_error_code, stop.rip, cr2=fault.linear)
        elif fault.kind == fast.FAULT_EPT_VIOLATION:
            self.vmx.exit_guest(vmcs, ExitReason.EPT_VIOLATION, fault.ept_qualification,
                                guest_linear=fault.linear, guest_physical=fault.guest_physical)
        else:
            self.vmx.exit_guest(vmcs, ExitReason.EPT_MISCONFIG, guest_physical=fault.guest_physical)

    def _guest_exception(self, vmcs: ActiveVmcs, vector: int, error_code: int | None, rip: int, *,
                         kind: InterruptionType = InterruptionType.HARDWARE_EXCEPTION, length: int = 0,
                         cr2: int | None = None) -> None:
        """An exception in the guest: a VM exit if the exception bitmap says so, else delivery.

        INT n is a software interrupt and never consults the bitmap; a software exception that
        exits leaves GUEST_RIP at the INT3/INTO with its length in the exit information
        (SDM Vol. 3C 26.2, 28.2.5)."""
        if kind != InterruptionType.SOFTWARE_INTERRUPT and vmcs.read("EXCEPTION_BITMAP") >> vector & 1:
            info = make_interruption_info(vector, kind, deliver_error_code=error_code is not None)
            if length:
                vmcs.context.set_reg(x86.UC_X86_REG_RIP, rip - length)
            self.vmx.exit_guest(vmcs, ExitReason.EXCEPTION_NMI, cr2 if cr2 is not None else 0,
                                instruction_length=length, interruption_info=info, interruption_error=error_code)
            return
        if cr2 is not None:
            vmcs.context.write_shared(x86.UC_X86_REG_CR2, cr2)
        self._deliver_guest(vmcs, vector, error_code, rip, kind)

    def _deliver_guest(self, vmcs: ActiveVmcs, vector: int, error_code: int | None, rip: int,
                       interruption_type: InterruptionType) -> None:
        """Delivers through the guest IDT: #DF and triple-fault exits on nested faults, EPT faults exit."""
        attempts = ((vector, error_code), (ExceptionVector.DF, 0))
        for attempt_vector, attempt_error in attempts:
            try:
                interrupts.deliver(vmcs.context, attempt_vector, attempt_error, rip, [])
                return
            except interrupts.DeliveryFault as fault:
                if fault.translation is not None and fault.translation.kind == fast.FAULT_EPT_VIOLATION:
                    vectoring = make_interruption_info(attempt_vector, interruption_type,
                                                       deliver_error_code=attempt_error is not None)
                    self.vmx.exit_guest(vmcs, ExitReason.EPT_VIOLATION, fault.translation.ept_qualification,
                                        guest_linear=fault.translation.linear,
                                        guest_physical=fault.translation.guest_physical,
                                        idt_vectoring_info=vectoring, idt_vectoring_error=attempt_error or 0)
                    return
                if attempt_vector == ExceptionVector.DF:
                    break
                interruption_type = InterruptionType.HARDWARE_EXCEPTION
        self.vmx.exit_guest(vmcs, ExitReason.TRIPLE_FAULT)

    def inject_into_guest(self, vmcs: ActiveVmcs, info: int, error_code: int, instruction_length: int) -> None:
        """VM-entry event injection (SDM Vol. 3C 27.6)."""
        vector = info & INTR_INFO_VECTOR_MASK
        kind = InterruptionType((info & INTR_INFO_TYPE_MASK) >> INTR_INFO_TYPE_SHIFT)
        rip = vmcs.read("GUEST_RIP")
        if kind in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION,
                    InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION):
            rip += instruction_length
        vmcs.halted = False
        self.publish("inject", vmcs=vmcs.address, vector=vector, type=int(kind))
        self._deliver_guest(vmcs, vector, error_code if info & INTR_INFO_DELIVER_ERROR_CODE else None, rip, kind)

    def _guest_trapped(self, vmcs: ActiveVmcs, insn: decode.Instruction) -> None:
        """A guest's trapped instruction: the VM exit its row decides (emu/exit_conditions.py), or the
        row's emulation (emu/trap_emulation.py); a fault of the emulation is the guest's exception."""
        trap = traps.exit_point_trap(insn.mnemonic, insn.op_str, guest=True)
        if exit_conditions.instruction_exits(trap, vmcs, insn, self.ram):
            self.vmx.exit_guest(vmcs, trap.exit_reason, exit_conditions.qualification(trap, vmcs.context, insn),
                                instruction_length=insn.size)
            return
        try:
            traps.resolve(trap.emulation)(self, vmcs.context, insn)
        except RaiseException as exc:
            self._guest_exception(vmcs, exc.vector, exc.error_code, insn.address, cr2=exc.cr2)
