"""Unicorn code and memory-write (and, when asked, memory-read) hooks on every instance of the machine, installed only while a trace runs: an InstructionRecord per instruction, with its clock, bytes, registers before and after, and memory written and read."""
from __future__ import annotations

from typing import Callable

from unicorn import unicorn_const as uc_const

from emu import decode, fast
from emu.context import ExecutionContext
from emu.vmx_defs import PAGE_OFFSET_MASK, PAGE_SIZE
from tools.trace.records import InstructionRecord
from tools.trace.registers import REGISTER_NAMES, RegisterReader

CR3_INDEX = REGISTER_NAMES.index("cr3")
WORD_BYTES = 8                          # Unicorn reports the value of a write of up to 8 bytes
BITS_PER_BYTE = 8
PAGE_CACHE_LIMIT = 1 << 14              # code pages whose translation is remembered, per trace


class Recorder:
    """Hooks every Unicorn instance of `machine` (also instances made later) and reports each
    instruction when it is complete: when the next instruction comes, or when finish() is called
    (before an event is written, so that events and instructions stay in order).

    While installed, the machine's C transition loop is off (the machine is the same without it,
    docs/machine.md 1.2): every VM exit and entry then happens, and is published, in Python, between
    the instructions around it. `recording` gates what is reported; the hooks stay until remove()."""

    def __init__(self, machine, on_instruction: Callable[[InstructionRecord], None], record_reads: bool = False):
        """`record_reads` adds a memory-read hook (a cost on every load): only the formats that
        print reads ask for it."""
        self.machine = machine
        self.on_instruction = on_instruction
        self.record_reads = record_reads
        self.recording = False
        self.installed = False
        self.admit_time: Callable[[int], bool] | None = None   # a time window's test, if any
        self._hooks: list[tuple[ExecutionContext, int]] = []
        self._readers: dict[ExecutionContext, RegisterReader] = {}
        self._blocks: dict[ExecutionContext, tuple[int, int, int]] = {}   # blocks seen, base time, index
        self._pages: dict[tuple, int] = {}
        self._exact_code: dict[tuple[int, bytes], bytes] = {}   # (address, Unicorn's bytes): the instruction's
        self._pending: InstructionRecord | None = None
        self._pending_context: ExecutionContext | None = None
        self._wide_writes = False           # the pending instruction wrote more than a word at once
        self._saved_fast_transitions = machine.fast_transitions

    # --- installing -----------------------------------------------------------------------------------
    def install(self) -> None:
        """Between runs only: hooks every instance and drops its translated code, so that every
        block is translated again with the hooks in it."""
        if self.installed:
            return
        machine = self.machine
        self._saved_fast_transitions = machine.fast_transitions
        machine.fast_transitions = False
        for context in machine.contexts:
            self._hook(context)
            context.flush_code()
        machine.context_observers.append(self._hook)
        machine.trapped_instruction_observer = self._on_trapped
        self.installed = True

    def remove(self) -> None:
        """Between runs only: the last instruction is reported, the hooks go, translated code with
        them in it is dropped, and the machine is as it was."""
        if not self.installed:
            return
        self.finish()
        machine = self.machine
        for context, handle in self._hooks:
            context.uc.hook_del(handle)
        self._hooks.clear()
        for context in machine.contexts:
            context.flush_code()
        machine.context_observers.remove(self._hook)
        machine.trapped_instruction_observer = None
        machine.fast_transitions = self._saved_fast_transitions
        self.installed = False

    def _hook(self, context: ExecutionContext) -> None:
        uc = context.uc
        self._readers[context] = RegisterReader(uc)
        self._hooks.append((context, uc.hook_add(uc_const.UC_HOOK_CODE, self._on_code, context)))
        self._hooks.append((context, uc.hook_add(uc_const.UC_HOOK_MEM_WRITE, self._on_write, context)))
        if self.record_reads:
            self._hooks.append((context, uc.hook_add(uc_const.UC_HOOK_MEM_READ, self._on_read, context)))

    # --- hooks --------------------------------------------------------------------------------------------
    def _on_code(self, uc, address: int, size: int, context: ExecutionContext) -> None:
        lp = self.machine.running_lp
        ctx = context.fast.ctx
        blocks = ctx.blocks
        mark = self._blocks.get(context)
        if mark is not None and mark[0] == blocks:
            pending = self._pending
            if pending is not None and pending.address == address and self._pending_context is context:
                return  # another iteration of a REP string instruction: still the same instruction
            base, index = mark[1], mark[2] + 1
        else:   # the first instruction of a block, which the block hook has just counted whole
            base, index = lp.now - ctx.block_icount, 0
        self._blocks[context] = (blocks, base, index)
        self._begin(lp, context, address, size, base + index)

    def _on_trapped(self, lp, context: ExecutionContext, instruction) -> None:
        """A trapped instruction, which the machine carries out itself (its clock is exact here)."""
        self._begin(lp, context, instruction.address, instruction.size, lp.now)

    def _begin(self, lp, context: ExecutionContext, address: int, size: int, time: int) -> None:
        pending = self._pending
        registers = None
        if pending is not None:
            if self._pending_context is context:
                registers = self._readers[context].read()
                pending.after = registers
                self._pending = None
                self._report(pending)
            else:
                self.finish()
        if not self.recording or (self.admit_time is not None and not self.admit_time(time)):
            return
        if registers is None:
            registers = self._readers[context].read()
        guest = lp.guest
        vmcs = guest.address if guest is not None and context is not lp.root else None
        self._pending = InstructionRecord(time, lp.index, context, vmcs, address,
                                          self._code(context, address, size, registers[CR3_INDEX]), registers)
        self._pending_context = context

    def _on_write(self, uc, _access, address: int, size: int, value: int, context: ExecutionContext) -> None:
        pending = self._pending
        if pending is not None and self._pending_context is context:
            if size <= WORD_BYTES:
                data = (value & ((1 << (BITS_PER_BYTE * size)) - 1)).to_bytes(size, "little")
            else:   # wider than Unicorn reports: read back once the instruction is done
                data = size
                self._wide_writes = True
            pending.writes.append((address, data))

    def _on_read(self, uc, _access, address: int, size: int, _value, context: ExecutionContext) -> None:
        """Unicorn calls this before the load, with the linear address the instruction used and no
        value: the bytes are read through the instance's own translation, as the load will."""
        pending = self._pending
        if pending is not None and self._pending_context is context:
            pending.reads.append((address, context.read_linear(address, size) or b""))

    # --- reporting ------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Reports the instruction in progress with the registers as they are now."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        pending.after = self._readers[self._pending_context].read()
        self._report(pending)

    def _report(self, record: InstructionRecord) -> None:
        writes = record.writes
        if self._wide_writes:
            self._wide_writes = False
            context = record.context
            writes = [(address, data if not isinstance(data, int) else (context.read_linear(address, data) or b""))
                      for address, data in writes]
        if len(writes) > 1:
            record.writes = coalesce(writes)
        if len(record.reads) > 1:
            record.reads = coalesce(record.reads)
        self.on_instruction(record)

    def _code(self, context: ExecutionContext, address: int, size: int, cr3: int) -> bytes:
        """The instruction's bytes. Unicorn's size is wrong for an instruction it cannot translate
        (every VMX instruction: none, or the bytes it read before giving up), so each new
        instruction is decoded once to check it."""
        code = self._read_code(context, address, min(size, decode.MAX_INSTRUCTION_LENGTH), cr3)
        key = (address, code)
        exact = self._exact_code.get(key)
        if exact is None:
            longest = self._read_code(context, address, decode.MAX_INSTRUCTION_LENGTH, cr3) or code
            if longest.startswith(decode.VMCALLR_OPCODE):
                exact = longest[:decode.VMCALLR_LENGTH]
            else:
                instruction = decode.decode_one(longest, address)
                exact = longest[:instruction.size] if instruction is not None else code
            if len(self._exact_code) >= PAGE_CACHE_LIMIT:
                self._exact_code.clear()
            self._exact_code[key] = exact
        return exact

    def _read_code(self, context: ExecutionContext, address: int, size: int, cr3: int) -> bytes:
        """Bytes at a linear address through a cache of code-page translations."""
        page = address & ~PAGE_OFFSET_MASK
        if (address & PAGE_OFFSET_MASK) + size > PAGE_SIZE:
            return context.read_linear(address, size, fast.ACCESS_FETCH) or b""
        key = (context, cr3, context.fast.ctx.eptp, page)
        physical = self._pages.get(key)
        if physical is None:
            physical, fault = context.translate(page, fast.ACCESS_FETCH)
            if fault is not None:
                return b""
            if len(self._pages) >= PAGE_CACHE_LIMIT:
                self._pages.clear()
            self._pages[key] = physical
        return self.machine.ram.read(physical + (address & PAGE_OFFSET_MASK), size)


def coalesce(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Writes that continue one another (a REP STOS, a PUSH pair) as one run of bytes, in order."""
    runs: list[tuple[int, bytearray]] = []
    for address, data in writes:
        if runs and runs[-1][0] + len(runs[-1][1]) == address:
            runs[-1][1].extend(data)
        else:
            runs.append((address, bytearray(data)))
    return [(address, bytes(data)) for address, data in runs]
