"""The machine: RAM, logical processors scheduled in quanta of virtual time, devices, firmware boot and statistics."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from unicorn import x86_const as x86

from emu import context as ctxmod
from emu import cpuid as cpuid_table
from emu import lifetime
from emu import snapshot as snapshot_module
from emu.devices import IoBus
from emu.disk import Disk
from emu.events import EventStream
from emu.lp import LogicalProcessor
from emu.memory import HostMemory, MIB
from emu.prng import Prng
from emu.vmcs_cache import VmcsCache
from emu.vmx_caps import MACHINE_MAXPHYADDR
from emu.vmx_counters import VmxCounters
from emu.vmx_defs import MSR_IA32_EFER, U64_MASK as U64

DEFAULT_RAM_SIZE = 64 * MIB
DEFAULT_QUANTUM = 50_000          # ticks each LP runs before the next LP's turn
INSTRUCTION_LIMIT = "instruction-limit"
MAX_LPS = 64

# Firmware (docs/machine.md "Reset and firmware"): identity page tables with 1 GiB pages.
FIRMWARE_PML4 = 0x1000
FIRMWARE_PDPT = 0x2000
FIRMWARE_RESERVED_END = 0x3000
GIB = 1 << 30
PTE_PRESENT_WRITABLE = 0x3
PTE_LARGE_PAGE = 0x80
CR0_AT_START = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31)  # PE MP ET NE WP PG
CR4_AT_START = (1 << 5) | (1 << 9) | (1 << 10)                                   # PAE OSFXSR OSXMMEXCPT
EFER_AT_START = (1 << 8) | (1 << 10) | (1 << 11)                                 # LME LMA NXE


@dataclass
class MachineStop:
    """Why the machine stopped: reason, exit status (debug exit), and a report for failures."""

    reason: str
    exit_status: int | None = None
    lp: int | None = None
    report: str = ""


@dataclass
class RunResult:
    stop: MachineStop
    instructions: int
    virtual_time: int
    exits_by_reason: dict[int, int] = field(default_factory=dict)


class Machine:
    """An x86-64 machine with a VMX-like extension; deterministic for the same inputs."""

    def __init__(self, ram_size: int = DEFAULT_RAM_SIZE, lps: int = 1, quantum: int = DEFAULT_QUANTUM,
                 record_events: bool = False, seed: int = 0, fast_transitions: bool = True,
                 disk: Disk | None = None, start_time: int = 0, block_devices: list | None = None):
        if not 1 <= lps <= MAX_LPS:
            raise ValueError(f"the machine has 1 to {MAX_LPS} logical processors, not {lps}")
        if quantum < 1:
            raise ValueError("the quantum is at least one tick")
        lifetime.note_new_machine(self)
        self.ram = HostMemory(ram_size)
        self.quantum = quantum
        self.events = EventStream(record_events)
        self.io = IoBus(self, self.events, self.ram, self.flush_code, disk, block_devices)
        self._settings = dict(ram_size=ram_size, lps=lps, quantum=quantum, record_events=record_events,
                              seed=seed, fast_transitions=fast_transitions)
        self.contexts: list[ctxmod.ExecutionContext] = []
        # Called with every context made from now on (a tracer hooks the guest instances made later).
        self.context_observers: list[Callable[[ctxmod.ExecutionContext], None]] = []
        # Called with (LP, context, instruction) before the machine carries out a trapped instruction
        # (docs/machine.md 5.4), which Unicorn never runs: a tracer sees it here. None: nobody listens.
        self.trapped_instruction_observer: Callable | None = None
        # Called with no argument between two LPs' slices of `run`, when no LP is running: a debugger
        # looks at its connection here (tools/gdb). Empty unless someone listens.
        self.slice_observers: list[Callable[[], None]] = []
        self.context_by_id: dict[int, ctxmod.ExecutionContext] = {}
        # Common VM exits and entries carried out in C (emu/fastpath.c); the same machine either way.
        self.fast_transitions = fast_transitions
        self.vmcs_cache = VmcsCache(lambda: self.new_context(ctxmod.GUEST, f"guest{len(self.contexts)}"))
        self.counters = VmxCounters()
        self.stop: MachineStop | None = None
        self.instruction_limit: int | None = None
        self.retired = 0    # instructions retired by the whole machine; LPs add to it
        self.round: tuple[int, int] | None = None   # the round under way: its end and next LP
        self.prng = Prng(seed)
        self.running_lp: LogicalProcessor | None = None
        self.lps = [LogicalProcessor(index, self.new_context(ctxmod.ROOT, f"lp{index}"), self, ram=self.ram,
                                     events=self.events, io=self.io, vmcs_cache=self.vmcs_cache,
                                     counters=self.counters, context_by_id=self.context_by_id,
                                     start_time=start_time)
                    for index in range(lps)]
        self.running_lp = self.lps[0]

    # --- contexts --------------------------------------------------------------------------------------
    def new_context(self, kind: str, name: str) -> ctxmod.ExecutionContext:
        context = ctxmod.ExecutionContext(self.ram, MACHINE_MAXPHYADDR, kind, name,
                                          self.io.read, self.io.write, self._cpuid)
        self.contexts.append(context)
        self.context_by_id[context.fast.python_id] = context
        if self.ram.dirty is not None:
            self.ram.dirty.attach(context)
        for observer in self.context_observers:
            observer(context)
        return context

    @property
    def active_vmcs(self) -> dict:
        """The active VMCSs by address (emu/vmcs_cache.py)."""
        return self.vmcs_cache.active

    # --- what the machine counts of VM transitions (emu/vmx_counters.py) -------------------------------
    @property
    def exit_counts(self):
        return self.counters.exit_counts

    @property
    def inverse_call_counts(self):
        return self.counters.inverse_call_counts

    @property
    def last_exits(self) -> dict[int, int]:
        """VMCS address: LP time of its latest VM exit (for measurements)."""
        return self.counters.last_exits

    @property
    def last_entry_failure(self):
        return self.counters.last_entry_failure

    # --- memory loading (the firmware and the operator write RAM from outside) --------------------------
    def load(self, address: int, data: bytes) -> None:
        self.ram.write(address, data)
        self.flush_code()

    def flush_code(self) -> None:
        """RAM was written from outside the processors (the firmware, the operator, DMA): translated code is dropped."""
        for context in self.contexts:
            context.flush_code()

    def build_firmware_page_tables(self) -> int:
        """Identity-maps all RAM with 1 GiB pages; returns the CR3 value (docs/machine.md)."""
        self.ram.write(FIRMWARE_PML4, bytes(FIRMWARE_RESERVED_END - FIRMWARE_PML4))
        self.ram.write_u64(FIRMWARE_PML4, FIRMWARE_PDPT | PTE_PRESENT_WRITABLE)
        for gib in range((self.ram.size + GIB - 1) // GIB):
            self.ram.write_u64(FIRMWARE_PDPT + 8 * gib, gib * GIB | PTE_PRESENT_WRITABLE | PTE_LARGE_PAGE)
        return FIRMWARE_PML4

    def start(self, entry: int, stack_tops: list[int], argument: int = 0) -> None:
        """Firmware hand-off: every LP in 64-bit mode at `entry`, RDI = LP index, RSI = `argument`."""
        if len(stack_tops) != len(self.lps):
            raise ValueError("one stack top per logical processor")
        cr3 = self.build_firmware_page_tables()
        for lp, stack_top in zip(self.lps, stack_tops):
            uc = lp.root.uc
            uc.reg_write(x86.UC_X86_REG_CR3, cr3)
            uc.reg_write(x86.UC_X86_REG_CR4, CR4_AT_START)
            uc.msr_write(MSR_IA32_EFER, EFER_AT_START)
            uc.reg_write(x86.UC_X86_REG_CR0, CR0_AT_START)
            uc.reg_write(x86.UC_X86_REG_RSP, stack_top)
            uc.reg_write(x86.UC_X86_REG_RIP, entry)
            uc.reg_write(x86.UC_X86_REG_RDI, lp.index)
            uc.reg_write(x86.UC_X86_REG_RSI, argument)
            lp.root.flush_code()

    # --- running -----------------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self.stop is not None

    def request_stop(self, reason: str, exit_status: int | None = None, lp: int | None = None,
                     report: str = "") -> None:
        if self.stop is None:
            self.stop = MachineStop(reason, exit_status, lp, report)
        if self.running_lp is not None:
            self.running_lp.running_context().request_stop()  # end the run at the current block's end

    @property
    def now(self) -> int:
        return max(lp.now for lp in self.lps)

    def instruction_limit_reached(self) -> bool:
        """True (and the machine stopping) once the machine-wide instruction limit is reached."""
        if self.instruction_limit is None or self.retired < self.instruction_limit:
            return False
        self.request_stop(INSTRUCTION_LIMIT)
        return True

    def instruction_limit_time(self) -> int:
        """The running LP's time at which the machine-wide instruction limit would be reached."""
        if self.instruction_limit is None:
            return U64
        return self.running_lp.now + max(self.instruction_limit - self.retired, 0)

    def run(self, max_instructions: int | None = None) -> RunResult:
        """Runs LPs round-robin, one quantum each, until a stop or the instruction limit."""
        self.instruction_limit = max_instructions
        if self.stop is not None and self.stop.reason == INSTRUCTION_LIMIT:
            self.stop = None        # the limit only paused the machine: a later run goes on
        while self.stop is None:
            if self.instruction_limit_reached():
                break
            if self.round is None:
                if all(lp.is_stuck() for lp in self.lps):
                    self.request_stop("idle", report="every logical processor is halted with nothing to wake it")
                    break
                self.round = (min(lp.now for lp in self.lps) + self.quantum, 0)
            round_end, first = self.round
            for index in range(first, len(self.lps)):
                lp = self.running_lp = self.lps[index]
                for observer in self.slice_observers:
                    observer()
                if self.stop is not None:    # an observer stopped the machine (a debugger's kill)
                    self.round = (round_end, index)
                    break
                lp.run_slice(round_end)
                if self.stop is not None:
                    # A pause keeps the round: the next run goes on with this LP's slice.
                    self.round = (round_end, index)
                    break
            else:
                self.round = None
        return RunResult(self.stop, self.retired, self.now, dict(self.exit_counts))

    def reset(self) -> "Machine":
        """The machine after a reset (power cycle): the same hardware with RAM zero, every LP in its
        state at power-on, devices cleared, and virtual time going on from the latest LP clock. The
        disk is kept, and so is the console's text: it was received at the other end of the COM1
        line. Returns the new machine; this one is left as it stopped."""
        self.io.disk.reset()
        self.io.block_devices.reset()
        machine = Machine(**self._settings, disk=self.io.disk, start_time=self.now,
                          block_devices=self.io.block_devices.devices)
        machine.io.console.channels = {channel: bytearray(text) for channel, text in self.io.console.channels.items()}
        machine.io.console.echo = self.io.console.echo
        machine.events.publish(machine.now, 0, "reset", previous_instructions=self.retired)
        return machine

    def snapshot(self) -> snapshot_module.MachineSnapshot:
        """The whole machine's state, between runs (emu/snapshot.py)."""
        return snapshot_module.take(self)

    def restore(self, snapshot: snapshot_module.MachineSnapshot) -> None:
        """Puts the machine back to a snapshot of it; running on gives what it gave then."""
        snapshot_module.restore(self, snapshot)

    def save_run_state(self) -> tuple:
        """The scheduler's own state, for a snapshot: instructions retired, the stop, the round under way."""
        return self.retired, copy.copy(self.stop), self.round

    def restore_run_state(self, state: tuple) -> None:
        self.retired, stop, self.round = state
        self.stop = copy.copy(stop)

    def statistics(self) -> dict:
        """Exits by reason, inverse hypercalls by call number, instructions by LP and by context."""
        return {
            "exits_by_reason": dict(sorted(self.exit_counts.items())),
            "inverse_calls_by_number": dict(sorted(self.inverse_call_counts.items())),
            "instructions_by_lp": {lp.index: lp.instructions for lp in self.lps},
            "instructions_by_context": {context.name: context.retired for context in self.contexts},
            "virtual_time_by_lp": {lp.index: lp.now for lp in self.lps},
            "transitions_in_c": sum(lp.transitions_in_c for lp in self.lps),
        }

    def ring_doorbell(self, words: list[int]) -> None:
        """The operator posts a request; LP 0 gets the doorbell vector if one is programmed."""
        self.io.doorbell.post(words)
        self.events.publish(self.lps[0].now, 0, "doorbell", words=len(words))
        if self.io.doorbell.vector:
            self.lps[0].raise_interrupt(self.io.doorbell.vector)

    # --- failures ----------------------------------------------------------------------------------------
    def _report(self, lp: LogicalProcessor, headline: str, rip: int) -> str:
        cr2 = lp.root.read_shared(x86.UC_X86_REG_CR2)
        lines = [headline, f"  LP {lp.index}  RIP {rip:#x}  CR2 {cr2:#x}  virtual time {lp.now}",
                 "  last events:"]
        lines += [f"    {e.time:>12} lp{e.lp} {e.kind} {e.data}" for e in self.events.recent()]
        return "\n".join(lines)

    def triple_fault(self, lp: LogicalProcessor, rip: int) -> None:
        lp.publish("triple-fault", rip=rip)
        self.request_stop("triple-fault", lp=lp.index, report=self._report(lp, "triple fault: machine stopped", rip))

    def machine_check(self, lp: LogicalProcessor, message: str) -> None:
        lp.publish("machine-check", message=message)
        rip = lp.root.reg(x86.UC_X86_REG_RIP)
        self.request_stop("machine-check", lp=lp.index, report=self._report(lp, f"machine check: {message}", rip))

    # --- the machine's share of trapped instructions (emu/traps.py) ----------------------------------------
    def _cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return cpuid_table.cpuid(leaf, subleaf, self.running_lp.index, len(self.lps))

    def next_random(self) -> int:
        """The next value of the machine's 64-bit generator (RDRAND and RDSEED, emu/trap_emulation.py)."""
        return self.prng.next()
