"""The machine's C instruction recorder (emu/tracepath.c) seen from Python: a trace file, C hooks on every instance of the machine while a trace runs, and the data records (header, events, names) Python adds between the instructions."""
from __future__ import annotations

import ctypes
import os
import weakref
from typing import Callable

from unicorn import unicorn_const as uc_const
from unicorn.unicorn_py3 import unicorn as uc_binding

from emu import fast
from emu.context import ExecutionContext
from tools.trace import tracefile
from tools.trace.decoder import Decoder
from tools.trace.registers import REGISTER_NAMES, TRACED_REGISTERS

ffi, lib = fast.ffi, fast.lib
_REGISTER_IDS = ffi.new("int[]", [register for _, register in TRACED_REGISTERS])
_READ_BATCH = ffi.cast("int (*)(void *, const int *, void **, int)",
                       ctypes.cast(uc_binding.uclib.uc_reg_read_batch, ctypes.c_void_p).value)
# emu/tracepath.h counts and places the traced registers as tools/trace/registers.py lists them.
assert len(TRACED_REGISTERS) == lib.HHR_TRACE_REGISTERS
assert REGISTER_NAMES.index("rip") == lib.HHR_TRACE_RIP_INDEX
assert REGISTER_NAMES.index("rflags") == lib.HHR_TRACE_RFLAGS_INDEX
assert REGISTER_NAMES.index("cr3") == lib.HHR_TRACE_CR3_INDEX

# The recorder's C callbacks find their recorder by its number; held weakly, as emu/fast.py does.
_recorders: dict[int, weakref.ReferenceType] = {}
_next_recorder_id = [1]


@ffi.def_extern()
def hhr_on_trace_vmcs(python_id, lp, vmcs):
    recorder = _recorders[python_id]()
    return recorder.answer_vmcs(lp, vmcs) if recorder is not None else 0


@ffi.def_extern()
def hhr_on_trace_lp_done(python_id, lp):
    recorder = _recorders[python_id]()
    if recorder is not None:
        recorder.lp_done(lp)


class RecorderError(OSError):
    """The trace file could not be written (a full disk, a closed file)."""


class Recorder:
    """Writes the trace file at `path`. `install()` puts the C hooks in every Unicorn instance of
    `machine` (also instances made later) when instructions are wanted; `recording` opens and
    closes the window; `data()` adds a record of Python's (an event, a name) in order with the
    instructions (after the instruction in progress). `on_vmcs(lp, vmcs)` names a VMCS the first time a guest instruction of it is
    recorded (after forget_names(), again) and answers HHR_VMCS_* flags; `on_lp_done(lp)` hears that
    an LP's window is over.

    While installed, the machine's C transition loop hands every VM exit and entry it carries out to
    Python as soon as it is made (hhr_lp.publish_each), so each is published before the next
    instruction runs, and it reports the trapped instructions it carries out (hhr_trace_trapped_in_loop) as
    Python's path does: the file is the same with the loop or without it."""

    def __init__(self, machine, path: str, on_vmcs: Callable[[int, int], int],
                 on_lp_done: Callable[[int], None], record_reads: bool = False, read_all_registers: bool = False):
        """`read_all_registers` reads every traced register after every instruction, instead of only
        those capstone says it may write inside a block (tools/trace/decoder.py): the same file,
        slower; tests hold the two to each other."""
        self.machine = machine
        self.path = path
        self.on_vmcs = on_vmcs
        self.on_lp_done = on_lp_done
        self.installed = False
        self.errors: list[BaseException] = []
        self._contexts: dict[ExecutionContext, object] = {}   # instance: its hhr_trace_context
        self._hooks: list[tuple[ExecutionContext, int]] = []
        trace = self._trace = ffi.new("hhr_trace *")
        self.python_id = _next_recorder_id[0]
        _next_recorder_id[0] += 1
        _recorders[self.python_id] = weakref.ref(self)
        trace.python_id = self.python_id
        trace.record_reads = int(record_reads)
        trace.register_ids = _REGISTER_IDS
        trace.reg_read_batch = _READ_BATCH
        self._decoder = Decoder()
        trace.decoder = self._decoder.state
        trace.read_all_registers = int(read_all_registers)
        trace.lp_count = len(machine.lps)
        for lp in machine.lps:
            trace.lps[lp.index].loop = ffi.cast("void *", lp.run_state)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, tracefile.MAGIC)
        if lib.hhr_trace_open(trace, self._fd) != 0:
            os.close(self._fd)
            raise MemoryError("no memory for the trace recorder's buffers")
        self._open = True

    # --- the window -------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return bool(self._trace.recording)

    @recording.setter
    def recording(self, value: bool) -> None:
        self._trace.recording = int(value)

    @property
    def per_lp_end(self) -> bool:
        return bool(self._trace.per_lp_end)

    @per_lp_end.setter
    def per_lp_end(self, value: bool) -> None:
        self._trace.per_lp_end = int(value)

    def set_time_window(self, start: int, end: int) -> None:
        """Only instructions that begin in [start, end) of their LP's clock are recorded."""
        self._trace.has_time_window = 1
        self._trace.window_start, self._trace.window_end = start, end

    def set_phase(self, lp: int, index: int) -> None:
        """LP `lp`'s instructions are stamped with phase `index` (tracefile: a `phase` data record)."""
        self._trace.lps[lp].phase = index

    def forget_names(self) -> None:
        """Every VMCS is named again at its next guest instruction."""
        lib.hhr_trace_forget_names(self._trace)

    @property
    def recorded(self) -> int:
        """Instructions written to the file."""
        return self._trace.recorded

    def lp_is_done(self, lp: int) -> bool:
        return bool(self._trace.lps[lp].done)

    # --- records of Python's -----------------------------------------------------------------------
    def data(self, payload: bytes, after_instruction: bool = False) -> None:
        """A data record: at once (what names the records around it), or `after_instruction` in
        progress (an event it caused or that followed it). Nothing once the file is closed."""
        if self._open:
            lib.hhr_trace_data(self._trace, payload, len(payload), int(after_instruction))

    def finish(self) -> None:
        """The instruction in progress is written now, with the data records held behind it (an
        instruction is otherwise complete when the next one begins: docs/tracing.md)."""
        if self._open:
            lib.hhr_trace_finish(self._trace)

    # --- installing -------------------------------------------------------------------------------
    def install(self, instructions: bool = True) -> None:
        """Between runs only: the transition loop publishes every event as it is made; with `instructions`,
        hooks every instance and drops its translated code, so that every block is translated again
        with the hooks in it."""
        if self.installed:
            return
        machine = self.machine
        for lp in machine.lps:
            lp.run_state.publish_each = 1
        if instructions:
            for context in machine.contexts:
                self._hook(context)
                context.flush_code()
            machine.context_observers.append(self._hook)
            machine.trapped_instruction_observer = self._on_trapped
        self.installed = True

    def remove(self) -> None:
        """Between runs only: the last instruction is written, the hooks go, translated code with
        them in it is dropped, and the machine is as it was."""
        if not self.installed:
            return
        self.finish()
        machine = self.machine
        for lp in machine.lps:
            lp.run_state.publish_each = 0
        if self._hook in machine.context_observers:
            for context, handle in self._hooks:
                fast.delete_hook(context.uc, handle)
            self._hooks.clear()
            for context in self._contexts:
                context.fast.ctx.trace = ffi.NULL
            for context in machine.contexts:
                context.flush_code()
            machine.context_observers.remove(self._hook)
            machine.trapped_instruction_observer = None
        self.installed = False

    def _hook(self, context: ExecutionContext) -> None:
        state = self._contexts.get(context)
        if state is None:
            state = ffi.new("hhr_trace_context *")
            state.trace = self._trace
            state.ctx = context.fast.ctx
            state.id = len(self._contexts)
            self._contexts[context] = state
        context.fast.ctx.trace = state
        uc = context.uc
        self._hooks.append((context, fast.add_c_hook(uc, uc_const.UC_HOOK_CODE, "hhr_trace_code_hook", state)))
        self._hooks.append((context, fast.add_c_hook(uc, uc_const.UC_HOOK_MEM_WRITE, "hhr_trace_write_hook", state)))
        if self._trace.record_reads:
            self._hooks.append((context, fast.add_c_hook(uc, uc_const.UC_HOOK_MEM_READ, "hhr_trace_read_hook", state)))

    def _on_trapped(self, lp, context: ExecutionContext, instruction) -> None:
        """A trapped instruction, which the machine carries out itself (its clock is exact here)."""
        state = self._contexts.get(context)
        if state is not None:
            lib.hhr_trace_trapped(state, lp.index, lp.now, instruction.address, instruction.size)

    # --- C's questions ------------------------------------------------------------------------------
    def answer_vmcs(self, lp: int, vmcs: int) -> int:
        try:
            return self.on_vmcs(lp, vmcs)
        except BaseException as exc:   # raised again by close(): a C hook cannot carry it
            self.errors.append(exc)
            return 0

    def lp_done(self, lp: int) -> None:
        try:
            self.on_lp_done(lp)
        except BaseException as exc:
            self.errors.append(exc)

    # --- the end ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Hooks out, everything buffered written, the file closed; raises what went wrong."""
        if not self._open:
            return
        self.remove()
        self._open = False
        lib.hhr_trace_close(self._trace)
        error = self._trace.error
        os.close(self._fd)
        _recorders.pop(self.python_id, None)
        if self.errors:
            raise self.errors[0]
        if error:
            raise RecorderError(f"cannot write the trace file {self.path}: {os.strerror(error)}")

    @property
    def lost_memory_entries(self) -> int:
        """Memory entries that did not fit the scratch space of one instruction."""
        return self._trace.writes_lost + self._trace.reads_lost
