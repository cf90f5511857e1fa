"""Renders a trace file in a readable format: names each record's context, symbol, phase and instruction, applies the filters, and hands the lines to the format's writer and to the summary. No machine runs."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from emu import decode
from emu.events import Event
from hypervisors import build
from tools.trace import annotate, lines, tracefile
from tools.trace import parquet as parquet_trace
from tools.trace.contexts import GUEST, ContextInfo, RootClassifier
from tools.trace.filters import Filters
from tools.trace.jsonl import JsonLinesWriter
from tools.trace.registers import REGISTER_NAMES, RIP_INDEX
from tools.trace.summary import Summary
from tools.trace.symbols import Placement, Symbolizer, builtin_guest_image
from tools.trace.tenet import TenetWriter
from tools.trace.text import TextWriter

FORMATS = ("text", "jsonl", "tenet", "chrome", "parquet")
DIRECTORY_FORMATS = ("tenet", "parquet")     # formats that write a directory of files
LINE_FORMATS = ("text", "jsonl")        # rendered by tools/trace/lines.py's loop
OUTPUT_BUFFER = 1 << 20
PROGRESS_EVERY = 1_000_000              # instructions rendered between two progress lines
NAMES_BY_BIT = [(bit, REGISTER_NAMES[bit]) for bit in range(len(REGISTER_NAMES))]


@dataclass
class RenderResult:
    summary: Summary
    outputs: list[Path]
    instructions_read: int              # instructions in the file (before filters)
    host_seconds: float
    recording: dict = field(default_factory=dict)   # the file's `end` record: what its recording said


def check_output(format: str, output: str | None) -> None:
    """Raises ValueError for an output the format cannot write to."""
    if format not in FORMATS:
        raise ValueError(f"bad --format {format!r}: one of {', '.join(FORMATS)}")
    directory = format in DIRECTORY_FORMATS
    if directory and output is None:
        raise ValueError(f"--format {format} writes a directory of files: give it with --output")
    if format == "parquet":
        parquet_trace.pyarrow_modules()         # without pyarrow, say how to install it before running
    if output is not None:
        target = Path(output)
        folder = target if directory else target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or (target.exists() and target.is_dir() != directory):
            raise ValueError(f"cannot write the trace to {output!r}"
                             + (": it must be a directory" if directory else ""))


class _Names:
    """Context names as the recording gave them: guests by VMCS (`name` records, and which VMCS each
    guest instance runs: `bind` records), root code by the image its RIP is in."""

    def __init__(self):
        self.roots: RootClassifier | None = None
        self.symbolizer: Symbolizer | None = None
        self.guests: dict[int, ContextInfo] = {}
        self.bound: dict[int, int] = {}   # context number: VMCS (0: root)
        self.identities: dict[int, object] = {}
        self.generation = 0               # moves whenever a context's name may have changed

    def place(self, record: dict) -> None:
        """A `placements` record: where the two hypervisors and the built-in guests run."""
        placements = []
        for image in record["hypervisors"]:
            built = build.image(image["hypervisor"])
            if image.get("image_digest", tracefile.image_digest(built)) != tracefile.image_digest(built):
                raise tracefile.TraceFileError(
                    f"the trace file was recorded with another build of {image['hypervisor']}: render it with the "
                    "hhr that recorded it (symbols come from the images this build assembles)")
            placements.append(Placement(image["label"], built, image["load_address"]))
        old, new = placements
        self.roots = RootClassifier(old, new)
        guests = {}
        for partition, name in record["guests"].items():
            image = builtin_guest_image(name)
            if image is not None:
                guests[int(partition)] = Placement(name, image, record["guest_load_address"])
        self.symbolizer = Symbolizer([old, new], guests)
        self.generation += 1

    def name(self, vmcs: int, info: ContextInfo) -> None:
        self.guests[vmcs] = info
        self.generation += 1

    def rebound(self, context: int) -> None:
        self.generation += 1

    def context(self, context: int, lp: int, address: int) -> ContextInfo:
        vmcs = self.bound.get(context, 0)
        if not vmcs:
            return self.roots.root(lp, address)
        info = self.guests.get(vmcs)
        if info is None:
            info = self.guests[vmcs] = ContextInfo(f"vmcs@{vmcs:#x}", GUEST, None)
        return info


def exact_code(raw: bytes, size: int) -> bytes:
    """The instruction's bytes from the 15 the recorder read at its address. Unicorn's size is wrong
    for an instruction it cannot translate (every VMX instruction), so each is decoded."""
    code = raw[:min(size, decode.MAX_INSTRUCTION_LENGTH)]
    longest = raw or code
    if longest.startswith(decode.VMCALLR_OPCODE):
        return longest[:decode.VMCALLR_LENGTH]
    instruction = decode.decode_one(longest, 0)
    return longest[:instruction.size] if instruction is not None else code


class _ChromeAdapter:
    """The Chrome Trace Event writer of tools/trace_chrome.py behind the writers' interface; VMCSs
    are placed as the recording placed them (each event's `identity`)."""

    def __init__(self, stream: IO[str], header: dict, names: _Names):
        from tools import trace_chrome

        self.trace_chrome = trace_chrome
        self.names = names
        restart = header["restart"]
        self.chrome = trace_chrome.ChromeTraceWriter(
            stream, lps=header["machine"]["lps"], metadata={"hhr_trace": header},
            hypervisors=[restart["from"], restart["to"]], describe_vmcs=self._describe)

    def _describe(self, vmcs: int):
        identity = self.names.identities.get(vmcs)
        return self.trace_chrome.VmcsIdentity(*identity) if identity is not None else None

    def instruction(self, _line) -> None:
        pass

    def event(self, line) -> None:
        self.chrome.on_event(line.source)

    def load(self, _line) -> None:
        pass

    def close(self, _summary, _figures) -> None:
        self.chrome.close()


class Renderer:
    """Reads the trace file at `path` and writes it as `format` to `output` (a file, a directory for
    Tenet, or standard output), with `filters`."""

    PROGRESS_EVERY = PROGRESS_EVERY

    def __init__(self, path: str, format: str = "text", output: str | None = None,
                 filters: Filters | None = None, progress: IO[str] | None = None):
        check_output(format, output)
        self.path = path
        self.format = format
        self.output = output
        self.filters = filters or Filters()
        self.progress = progress
        self.summary = Summary()
        self.outputs: list[Path] = []
        self.names = _Names()
        self.disassembler = annotate.Disassembler()
        self._stream: IO[str] | None = None
        self.writer = None

    def _make_writer(self, header: dict):
        header = dict(header, filters=self.filters.describe())
        if self.format == "tenet":
            return TenetWriter(self.output, header)
        if self.format == "parquet":
            writer = parquet_trace.ParquetWriter(self.output, header)
            self.outputs += writer.paths
            return writer
        if self.output is None:
            stream = sys.stdout
        else:
            stream = self._stream = open(self.output, "w", encoding="utf-8", buffering=OUTPUT_BUFFER, newline="\n")
            self.outputs.append(Path(self.output))
        if self.format == "text":
            return TextWriter(stream, header)
        if self.format == "jsonl":
            return JsonLinesWriter(stream, header)
        return _ChromeAdapter(stream, header, self.names)

    def run(self) -> RenderResult:
        started = time.perf_counter()
        self._started = started
        filters = self.filters
        self.unfiltered = filters == Filters()
        self.wants_instructions = not filters.events_only and self.format != "chrome"
        self.phases: dict[int, str] = {}
        self.code: dict[tuple[int, int], bytes] = {}
        self.exact: dict[tuple[bytes, int], bytes] = {}
        self.registers: dict[int, list[int]] = {}
        self.recording: dict = {}
        self.read = 0
        try:
            with tracefile.TraceReader(self.path) as reader:
                if self.format in LINE_FORMATS or not self.wants_instructions:
                    lines.render(self, reader)   # C's loop (which also skips instructions no one wants)
                else:
                    self._render(reader.records())
            if self.writer is None:
                raise tracefile.TraceFileError(f"{self.path}: no header record")
            if not self.recording:
                raise tracefile.TraceFileError(f"{self.path}: cut short (no end record)")
            self.writer.close(self.summary.lines(), self.summary.as_dict())
            if isinstance(self.writer, TenetWriter):
                self.outputs += self.writer.paths
        finally:
            if self._stream is not None:
                self._stream.close()
            elif self.format not in DIRECTORY_FORMATS:
                sys.stdout.flush()
        return RenderResult(self.summary, self.outputs, self.read, time.perf_counter() - started, self.recording)

    def _render(self, records) -> None:
        """Every format: each instruction as a TracedInstruction, for the writer and the summary."""
        names, filters, summary = self.names, self.filters, self.summary
        unfiltered, wants_instructions = self.unfiltered, self.wants_instructions
        full_registers = self.format == "tenet"
        disassemble = self.format != "tenet"
        disassembler = self.disassembler
        phases, registers = self.phases, self.registers
        for record in records:
            if record[0] != tracefile.INSTRUCTION:
                self.other(record)
                continue
            _, lp, phase_index, flags, context, size, mask, when, address, values, writes, reads = record
            self.read += 1
            state = registers[context]
            if not wants_instructions:
                _apply(state, mask, values, flags, address, size)
                continue
            info = names.context(context, lp, address)
            symbol = names.symbolizer.symbolize(address, info.partition if info.kind == GUEST else None)
            phase = phases[phase_index]
            if not (unfiltered or filters.instruction(lp, info.name, phase, when, symbol)):
                _apply(state, mask, values, flags, address, size)
                continue
            instruction = self.instruction_bytes(context, address, size)
            before = tuple(state) if full_registers else None
            rip_before = state[RIP_INDEX]
            changes = [(name, value) for (bit, name), value in zip(_bits(mask), values)] if mask else []
            _apply(state, mask, values, flags, address, size)
            rip_after = state[RIP_INDEX]
            # RIP counts as changed only when it is not the next instruction's address.
            if rip_after == address + len(instruction):
                if mask >> RIP_INDEX & 1:
                    changes = [(name, value) for name, value in changes if name != "rip"]
            elif rip_after != rip_before and not mask >> RIP_INDEX & 1:
                changes = _with_rip(changes, rip_after)
            text = disassembler.text(address, instruction) if disassemble else ""
            line = annotate.TracedInstruction(when, lp, info, phase, address, symbol, instruction, text, changes,
                                              annotate.coalesce(writes) if len(writes) > 1 else writes,
                                              annotate.coalesce(reads) if len(reads) > 1 else reads,
                                              before, tuple(state) if full_registers else None)
            self.writer.instruction(line)
            summary.instruction(line)
            if self.progress is not None and self.read % PROGRESS_EVERY == 0:
                self.report_progress(self.read)

    def instruction_bytes(self, context: int, address: int, size: int) -> bytes:
        raw = self.code.get((context, address), b"")
        key = (raw, size)
        instruction = self.exact.get(key)
        if instruction is None:
            instruction = self.exact[key] = exact_code(raw, size)
        return instruction

    def other(self, record: tuple) -> None:
        """Every record but an instruction: code bytes, bindings, register loads, data records."""
        kind, names = record[0], self.names
        if kind == tracefile.CODE:
            self.code[(record[1], record[2])] = record[3]
        elif kind == tracefile.BIND:
            names.bound[record[1]] = record[2]
            names.rebound(record[1])
        elif kind == tracefile.LOAD:
            _, lp, phase_index, initial, context, mask, when, values = record
            state = self.registers.setdefault(context, [0] * tracefile.REGISTER_COUNT)
            changes = [(name, value) for (bit, name), value in zip(_bits(mask), values)]
            for (bit, _name), value in zip(_bits(mask), values):
                state[bit] = value
            if initial or not self.wants_instructions:
                return
            resume = state[RIP_INDEX]
            info = names.context(context, lp, resume)
            phase = self.phases[phase_index]
            symbol = names.symbolizer.symbolize(resume, info.partition if info.kind == GUEST else None) \
                if self.filters.needs_symbols else None
            if self.unfiltered or self.filters.instruction(lp, info.name, phase, when, symbol):
                self.writer.load(annotate.TracedLoad(when, lp, info, phase, changes))
        else:
            data = record[1]
            kind = data["type"]
            if kind == "event":
                line = _event_line(data, names)
                if self.unfiltered or self.filters.event(line.lp, line.phase, line.time):
                    self.writer.event(line)
                    self.summary.event(line)
            elif kind == "name":
                names.name(data["vmcs"], ContextInfo(data["name"], data["kind"], data["hypervisor"], data["partition"],
                                                     data["vp"]))
            elif kind == "phase":
                self.phases[data["index"]] = data["name"]
            elif kind == "placements":
                names.place(data)
            elif kind == "header":
                self.writer = self._make_writer(data["header"])
            elif kind == "end":
                self.recording = data

    def report_progress(self, read: int) -> None:
        rate = read / max(time.perf_counter() - self._started, 1e-9)
        self.progress.write(f"hhr trace: rendered {read} instructions, {rate:,.0f} instructions/s\n")
        self.progress.flush()


_BITS_CACHE: dict[int, list[tuple[int, str]]] = {}


def _bits(mask: int) -> list[tuple[int, str]]:
    """(register number, name) of each register in `mask`, in order."""
    bits = _BITS_CACHE.get(mask)
    if bits is None:
        bits = _BITS_CACHE[mask] = [(bit, name) for bit, name in NAMES_BY_BIT if mask >> bit & 1]
    return bits


def _apply(state: list[int], mask: int, values: tuple[int, ...], flags: int, address: int, size: int) -> None:
    """The context's registers after an instruction."""
    if mask:
        for (bit, _name), value in zip(_bits(mask), values):
            state[bit] = value
    if flags & tracefile.RIP_ADVANCED:
        state[RIP_INDEX] = address + size


def _with_rip(changes: list[tuple[str, int]], rip: int) -> list[tuple[str, int]]:
    """`changes` with RIP in its place (an instruction Unicorn sized wrongly went on elsewhere)."""
    result = [(name, value) for name, value in changes if REGISTER_NAMES.index(name) < RIP_INDEX]
    result.append(("rip", rip))
    result += [(name, value) for name, value in changes if REGISTER_NAMES.index(name) > RIP_INDEX]
    return result


def _event_line(record: dict, names: _Names) -> annotate.TracedEvent:
    data = record["data"]
    vmcs = data.get("vmcs")
    identity = record.get("identity")
    if vmcs and identity is not None:
        names.identities[vmcs] = identity
    added = record["added"]
    machine_data = {name: value for name, value in data.items() if name not in added}
    source = Event(record["seq"], record["time"], record["lp"], record["kind"], machine_data)
    return annotate.TracedEvent(record["seq"], record["time"], record["lp"], record["kind"], record["phase"],
                                data, source)


def render(path: str, format: str = "text", output: str | None = None, filters: Filters | None = None,
           progress: IO[str] | None = None) -> RenderResult:
    """Renders the trace file at `path` (docs/tracing.md)."""
    return Renderer(path, format, output, filters, progress).run()
