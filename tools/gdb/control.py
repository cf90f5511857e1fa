"""The machine side of the stub: attaches to each machine booted, stops it before its first instruction, between slices on Ctrl-C, and inside its debugger hook at breakpoints and steps, and serves gdb while it is stopped."""
from __future__ import annotations

import contextlib
import signal
import sys
import traceback
import weakref
from typing import IO

from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from emu import fast
from hypervisors import boot
from tools.gdb import target as tdesc
from tools.gdb.commands import Detach, Dispatcher, Resume
from tools.gdb.monitor import EventBreak, Monitor, describe_event
from tools.gdb.naming import ContextNamer, namer_for
from tools.gdb.packets import BadPacket, Interrupt, Packet
from tools.gdb.server import ConnectionLost, GdbServer

ffi, lib = fast.ffi, fast.lib
MAX_BREAKPOINTS = lib.HHR_DEBUG_BREAKPOINTS_MAX
PAGE_SIZE = 4096
LINEAR_ADDRESS_BITS = 48                 # docs/machine.md 2.1; an address beyond is not canonical


def canonical(address: int) -> bool:
    """Bits 63:47 all equal (SDM Vol. 1 3.3.7.1)."""
    top = address >> (LINEAR_ADDRESS_BITS - 1)
    return top == 0 or top == (1 << (64 - LINEAR_ADDRESS_BITS + 1)) - 1

_stubs: dict[int, weakref.ReferenceType] = {}
_next_stub_id = [1]


@ffi.def_extern()
def hhr_on_debug_stop(python_id, context_id, address):
    stub = _stubs[python_id]()
    if stub is not None:
        stub.on_instruction(context_id, address)


def thread_of(lp_index: int) -> int:
    """gdb numbers threads from 1; thread n is LP n - 1."""
    return lp_index + 1


class GdbStub:
    """Serves one gdb client for the machines booted while it is registered (`register()`): the newest
    machine is the one debugged (a suspend's resume makes a new one). All-stop: while gdb looks, no LP
    runs; `c` and `s` let the machine go on exactly as it would without gdb."""

    def __init__(self, server: GdbServer, log: IO[str] = sys.stderr):
        self.server = server
        self.log = log
        self.dispatcher = Dispatcher(self)
        self.booted = None
        self.machine = None
        self.namer: ContextNamer | None = None
        self.stopped_lp = 0
        self.stop_signal = signal.SIGTRAP
        self.stop_before_next_slice = True       # the machine starts stopped before its first instruction
        self.resumed = False                     # gdb waits for a stop reply
        self.breakpoints: dict[int, int] = {}    # address: Z kind (0 software, 1 hardware)
        self.stop_kind: int | None = None        # the breakpoint kind (Z0, Z1) of the stop, if it is one
        self.step_lp: int | None = None
        self._step_skip: int | None = None       # the stepped LP's RIP when it was not inside an instruction
        self.python_id = _next_stub_id[0]
        _next_stub_id[0] += 1
        _stubs[self.python_id] = weakref.ref(self)
        self._debug = ffi.new("hhr_debug *")
        self._debug.python_id = self.python_id
        self._hooks_installed = False
        self._hook_states: list = []
        self._stop_context = None                # the context stopped inside the hook, if any
        self.event_breaks: list[EventBreak] = []
        self._subscribed_kinds: frozenset[str] = frozenset()
        self._saved_fast_transitions: bool | None = None
        self._previous_trapped_observer = None
        self._stop_message: str | None = None    # why the coming stop happens, told to gdb with it
        self.monitor_commands = Monitor(self)

    # --- attaching ------------------------------------------------------------------------------
    def register(self) -> None:
        boot.BOOT_OBSERVERS.append(self.attach)

    def unregister(self) -> None:
        if self.attach in boot.BOOT_OBSERVERS:
            boot.BOOT_OBSERVERS.remove(self.attach)

    def attach(self, booted) -> None:
        """A machine was booted: it is the one debugged from now on."""
        if self.machine is not None:
            self._subscribe(frozenset())
            self.machine.slice_observers.remove(self._between_slices)
            if self._hooks_installed:
                self.machine.context_observers.remove(self._hook)
        self.booted, self.machine = booted, booted.machine
        self.namer = namer_for(booted)
        self.machine.slice_observers.append(self._between_slices)
        self._saved_fast_transitions = self._previous_trapped_observer = None
        self.event_breaks_changed()
        if self._hooks_installed:
            self._hooks_installed = False
            self._install_hooks()
        self._arm()

    # --- the debugger hook (emu/debugpath.c) -------------------------------------------------------
    def _install_hooks(self) -> None:
        """Between runs only: the hook goes into every instance (and those made later) and translated
        code is dropped, so that every block is translated again with it, as the trace recorder does."""
        if self._hooks_installed:
            return
        for context in self.machine.contexts:
            self._hook(context)
            context.flush_code()
        self.machine.context_observers.append(self._hook)
        self._hooks_installed = True

    def _hook(self, context) -> None:
        state = ffi.new("hhr_debug_context *")
        state.debug = self._debug
        state.ctx = context.fast.ctx
        self._hook_states.append(state)
        fast.add_c_hook(context.uc, uc_const.UC_HOOK_CODE, "hhr_debug_code_hook", state)

    def _arm(self) -> None:
        """The hook's breakpoints and step as gdb left them. While any stop is wanted the hook is in,
        the machine's trapped instructions are watched (the C transition loop leaves those it would
        carry out itself to Python when the debugger stops there), and, while an event break is set,
        VM transitions are all carried out in Python (the machine is the same, docs/machine.md 1.2):
        the loop publishes its events late."""
        debug = self._debug
        addresses = sorted(self.breakpoints)
        debug.breakpoint_count = len(addresses)
        for index, address in enumerate(addresses):
            debug.breakpoints[index] = address
        debug.step_loop = self.machine.lps[self.step_lp].run_state if self.step_lp is not None else ffi.NULL
        watching = bool(addresses or self.step_lp is not None or self.event_breaks)
        if watching and not self._hooks_installed:
            self._install_hooks()
        if watching:
            self._watch_trapped()
        elif self.machine.trapped_instruction_observer == self._on_trapped:
            self.machine.trapped_instruction_observer = self._previous_trapped_observer
        for lp in self.machine.lps:   # the C transition loop asks before it carries out a guest's exit
            lp.run_state.debug = self._debug if watching else ffi.NULL
        machine = self.machine
        if self.event_breaks and self._saved_fast_transitions is None:
            self._saved_fast_transitions, machine.fast_transitions = machine.fast_transitions, False
        elif not self.event_breaks and self._saved_fast_transitions is not None:
            machine.fast_transitions, self._saved_fast_transitions = self._saved_fast_transitions, None

    def _watch_trapped(self) -> None:
        """The machine's trapped-instruction observer is this stub's, calling the one it replaced (a
        trace recorder's) first. Instructions the machine carries out itself never reach the hook:
        Unicorn stops in front of them (docs/machine.md 5.4, 7.8.2)."""
        current = self.machine.trapped_instruction_observer
        if current != self._on_trapped:
            self._previous_trapped_observer = current
            self.machine.trapped_instruction_observer = self._on_trapped

    def _on_trapped(self, lp, context, instruction) -> None:
        previous = self._previous_trapped_observer
        if previous is not None:
            previous(lp, context, instruction)
        with self._guard():
            self._instruction(lp, context, instruction.address)

    def on_instruction(self, context_id: int, address: int) -> None:
        """The hook found a breakpoint address or the stepped LP's next instruction."""
        with self._guard():
            self._instruction(self.machine.running_lp, self.machine.context_by_id[context_id], address)

    @contextlib.contextmanager
    def _guard(self):
        """A failure of the stub's own never reaches the machine: it is reported, and gdb is let go."""
        try:
            yield
        except Exception as exc:   # noqa: BLE001 - the machine must run on whatever the stub did
            self.log.write(f"hhr gdb: internal error {exc.__class__.__name__}: {exc}; letting gdb go\n")
            traceback.print_exc(file=self.log)
            self.server.drop("the stub failed")
            self._forget_client()

    def _instruction(self, lp, context, address: int) -> None:
        if self.step_lp is not None and lp.index == self.step_lp:
            skip, self._step_skip = self._step_skip, None
            if skip == address:
                return                       # the instruction the step begins with
        elif address not in self.breakpoints:
            return
        kind = self.breakpoints.get(address) if self.step_lp is None else None
        self.step_lp = None
        self._stop_context = context
        message, self._stop_message = self._stop_message, None
        try:
            self._stopped(lp.index, signal.SIGTRAP, message=message, kind=kind)
        finally:
            self._stop_context = None

    # --- event breaks (tools/gdb/monitor.py) ---------------------------------------------------------
    def event_breaks_changed(self) -> None:
        """Subscribes to the kinds the event breaks want (the transition loop is off meanwhile, _arm:
        an exit's event is then published before the LP's next instruction)."""
        self._subscribe(frozenset(entry.kind for entry in self.event_breaks))

    def _subscribe(self, kinds: frozenset[str]) -> None:
        if kinds == self._subscribed_kinds:
            return
        events = self.machine.events
        if self._subscribed_kinds:
            events.unsubscribe(self._on_event)
        if kinds:
            events.subscribe(self._on_event, kinds)
        self._subscribed_kinds = kinds

    def _on_event(self, event) -> None:
        with self._guard():
            self._match_event(event)

    def _match_event(self, event) -> None:
        for entry in self.event_breaks:
            if entry.matches(event):
                self.step_lp = event.lp
                self._stop_message = f"hhr: {entry.label}: {describe_event(event)}\n"
                self._arm()
                return

    # --- between slices ---------------------------------------------------------------------------
    def _between_slices(self) -> None:
        with self._guard():
            self._look_between_slices()

    def _look_between_slices(self) -> None:
        lp = self.machine.running_lp.index
        if self.stop_before_next_slice:
            self.stop_before_next_slice = False
            self.log.write(f"hhr gdb: waiting for gdb on {self.server.address[0]}:{self.server.address[1]}\n")
            self.log.flush()
            self.server.accept(block=True)
            self._stopped(lp, signal.SIGTRAP, announce=False)
            return
        if self._debug.breakpoint_count or self._debug.step_loop != ffi.NULL or self.event_breaks:
            self._watch_trapped()            # a trace recorder may have put its own in since
        if not self.server.connected:
            if self.server.accept(block=False):      # a client (again): the machine stops for it
                self._stopped(lp, signal.SIGTRAP, announce=False)
            return
        try:
            items = self.server.receive(block=False)
        except ConnectionLost:
            self._forget_client()
            return
        if any(isinstance(item, Interrupt) for item in items):
            self._stopped(lp, signal.SIGINT)

    # --- a stop ----------------------------------------------------------------------------------
    def _stopped(self, lp: int, signo: int, announce: bool = True, message: str | None = None,
                 kind: int | None = None) -> None:
        """The machine is stopped with LP `lp` current: gdb is told (if it waits) and served until it
        resumes, detaches or goes away."""
        self.stopped_lp, self.stop_signal, self.stop_kind = lp, signo, kind
        self.dispatcher.general_thread = self.dispatcher.continue_thread = 0
        try:
            if announce and self.resumed:
                if message:
                    self.server.send(b"O" + message.encode().hex().encode())
                self.server.send(self.stop_reply())
            self.resumed = False
            self._serve()
        except ConnectionLost:
            self._forget_client()
        self._arm()

    def _serve(self) -> None:
        while True:
            for item in self.server.receive(block=True):
                if isinstance(item, Packet):
                    answer = self.dispatcher.handle(item.data)
                    if isinstance(answer, Resume):
                        self._resume(answer.step)
                        self.resumed = True
                        return
                    if isinstance(answer, Detach):
                        self.server.send(b"OK")
                        self._detach(answer.kill)
                        return
                    self.server.send(answer)
                elif isinstance(item, BadPacket):
                    continue                      # NACKed; gdb sends it again

    def _resume(self, step_thread: int | None) -> None:
        """A step of an LP that is not stopped inside an instruction (any LP at a stop between
        slices, another LP at a breakpoint) first lets it begin the instruction at its RIP."""
        self.step_lp = None if step_thread is None else step_thread - 1
        self._step_skip = None
        if self.step_lp is not None and not (self._stop_context is not None and self.step_lp == self.stopped_lp):
            lp = self.machine.lps[self.step_lp]
            self._step_skip = self._context(lp).reg(x86.UC_X86_REG_RIP)

    def _detach(self, kill: bool) -> None:
        self.server.drop("gdb detached" if not kill else "gdb killed the machine")
        self._forget_client()
        if kill:
            self.machine.request_stop("killed", report="killed from gdb")

    def _forget_client(self) -> None:
        """No client: no breakpoint or step is left to stop the machine."""
        self.breakpoints.clear()
        self.step_lp = None
        self.event_breaks.clear()
        self._stop_message = None
        self.resumed = False
        if self.machine is not None:
            self.event_breaks_changed()
            self._arm()

    def finish(self) -> None:
        """The command is over: a gdb waiting for the machine hears that it exited."""
        if self.server.connected and self.resumed:
            try:
                self.server.send(b"W00")
            except ConnectionLost:
                pass
        self.server.close()
        self.unregister()

    # --- the Target the dispatcher asks (tools/gdb/commands.py) --------------------------------------
    def thread_ids(self) -> list[int]:
        return [thread_of(lp.index) for lp in self.machine.lps]

    def _lp(self, thread: int):
        index = thread - 1
        if not 0 <= index < len(self.machine.lps):
            raise KeyError(thread)
        return self.machine.lps[index]

    def _context(self, lp):
        if self._stop_context is not None and lp.index == self.stopped_lp:
            return self._stop_context
        return lp.running_context()

    def thread_name(self, thread: int) -> str:
        lp = self._lp(thread)
        try:
            return f"lp{lp.index} {self.namer.name(lp, self._context(lp))}"
        except Exception as exc:   # noqa: BLE001 - a name is a courtesy; never fail the session for it
            return f"lp{lp.index} ({exc.__class__.__name__})"

    def stopped_thread(self) -> int:
        return thread_of(self.stopped_lp)

    def stop_reply(self) -> bytes:
        """`T05thread:N;`, with `swbreak:;` or `hwbreak:;` at a breakpoint (gdb asked for them in qSupported)."""
        reason = {0: b"swbreak:;", 1: b"hwbreak:;"}.get(self.stop_kind, b"")
        return b"T%02xthread:%x;%s" % (self.stop_signal, thread_of(self.stopped_lp), reason)

    def registers(self, thread: int) -> tdesc.RegisterAccess:
        lp = self._lp(thread)
        machine = self.machine

        def holder_of(shared_class: int):
            holder = lp.shared.holder[shared_class]
            if holder == ffi.NULL:
                return self._context(lp)
            return machine.context_by_id[ffi.cast("hhr_ctx *", holder).python_id]
        return tdesc.RegisterAccess(self._context(lp), holder_of)

    def read_memory(self, thread: int, address: int, length: int) -> bytes | None:
        """Through the context's own translation (paging, and EPT for a guest); the readable prefix,
        None if not even the first byte translates."""
        context = self._context(self._lp(thread))
        out = bytearray()
        while length > 0 and canonical(address) and canonical(address + min(length, PAGE_SIZE) - 1):
            chunk = min(length, PAGE_SIZE - address % PAGE_SIZE)
            data = context.read_linear(address, chunk)
            if data is None:
                break
            out += data
            address += chunk
            length -= chunk
        return bytes(out) if out or length == 0 else None

    def write_memory(self, thread: int, address: int, data: bytes) -> bool:
        context = self._context(self._lp(thread))
        if not (canonical(address) and canonical(address + max(len(data), 1) - 1)):
            return False
        return context.write_linear(address, data) is None

    def set_breakpoint(self, kind: int, address: int, insert: bool) -> bool:
        if insert:
            if address not in self.breakpoints and len(self.breakpoints) >= MAX_BREAKPOINTS:
                return False
            self.breakpoints[address] = kind
        else:
            self.breakpoints.pop(address, None)
        return True

    def selected_lp(self, index: int | None = None):
        """LP `index`, or the one stopped (gdb does not say which thread a `monitor` is for)."""
        return self._lp(thread_of(index) if index is not None else self.stopped_thread())

    def vmcs_name(self, address: int) -> str:
        return self.namer.vmcs_name(address)

    def service_image(self) -> tuple[str, int] | None:
        """The hypervisor image in the service region of the one in charge, and where, if any."""
        return self.namer.service_image()

    def monitor(self, command: str) -> str:
        return self.monitor_commands(command)


def serve_while(address: str, command) -> int:
    """Runs `command` with a stub on `address` ([HOST:]PORT) attached to every machine it boots."""
    from tools.gdb.server import parse_address

    server = GdbServer(*parse_address(address))
    stub = GdbStub(server)
    stub.register()
    try:
        return command()
    finally:
        stub.finish()
