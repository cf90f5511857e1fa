"""The text and JSON Lines renderers' loop: one line per instruction straight from the trace file's records, with what is the same every time an instruction runs in a context (its site) made once. It writes what TextWriter.instruction and JsonLinesWriter.instruction would (a test compares them)."""
from __future__ import annotations

import collections
import json

from tools.trace import jsonl as jsonl_format
from tools.trace import text as text_format
from tools.trace import tracefile
from tools.trace.annotate import coalesce
from tools.trace.contexts import GUEST
from tools.trace.registers import REGISTER_NAMES, RIP_INDEX

RIP_BIT = 1 << RIP_INDEX
FLUSH_LINES = 4096                      # lines joined into one write


class _Site:
    """An instruction in a context: its line's fixed part, names, length and whether the context and
    symbol filters take it."""

    __slots__ = ("static", "context", "symbol", "length", "taken", "number")

    def __init__(self, static: str, context: str, symbol: str | None, length: int, taken: bool, number: int):
        self.static, self.context, self.symbol = static, context, symbol
        self.length, self.taken, self.number = length, taken, number


class _MaskFormat:
    """How a set of changed registers prints: a format string over their values, and where RIP is."""

    __slots__ = ("text", "json", "rip_position", "names")

    def __init__(self, mask: int):
        self.names = [name for bit, name in enumerate(REGISTER_NAMES) if mask >> bit & 1]
        self.text = "".join(f" {name}={{:#x}}" for name in self.names)
        self.json = ",".join(f'"{name}":"{{:#x}}"' for name in self.names)
        self.rip_position = self.names.index("rip") if "rip" in self.names else -1


def render(renderer, records) -> None:
    """Renders `records` with `renderer`'s writer (a TextWriter or JsonLinesWriter), names, filters
    and summary; every record but an instruction goes to renderer.other()."""
    is_text = renderer.format == "text"
    names, filters, summary = renderer.names, renderer.filters, renderer.summary
    unfiltered, wants_instructions = renderer.unfiltered, renderer.wants_instructions
    phases = renderer.phases
    sites: dict[tuple[int, int], _Site] = {}
    site_list: list[_Site] = []
    generation = -1
    formats: dict[int, _MaskFormat] = {}
    counts: collections.Counter[int] = collections.Counter()   # (site, phase, LP) packed in one int
    strings: dict[str, str] = {}
    out_lines: list[str] = []
    first_time = last_time = None
    lps = filters.lps
    time_range = filters.time_range
    other, instruction_bytes = renderer.other, renderer.instruction_bytes
    INSTRUCTION, CODE, RIP_ADVANCED = tracefile.INSTRUCTION, tracefile.CODE, tracefile.RIP_ADVANCED
    progress_every = renderer.PROGRESS_EVERY if renderer.progress is not None else 0
    read = 0

    def json_string(value: str) -> str:
        encoded = strings.get(value)
        if encoded is None:
            encoded = strings[value] = json.dumps(value)
        return encoded

    def flush() -> None:
        if out_lines:
            renderer.writer.out.write("".join(out_lines))
            out_lines.clear()

    def site_of(context: int, lp: int, address: int, size: int) -> _Site:
        info = names.context(context, lp, address)
        symbol = names.symbolizer.symbolize(address, info.partition if info.kind == GUEST else None)
        instruction = instruction_bytes(context, address, size)
        disassembly = renderer.disassembler.text(address, instruction)
        if is_text:
            static = text_format.static_columns_of(info.name, address, symbol, instruction, disassembly)
        else:   # the context, then (after the phase) the rest
            static = (json_string(info.name), jsonl_format.static_fields(address, symbol, instruction, disassembly))
        taken = unfiltered or filters.instruction_site(info.name, symbol)
        site = _Site(static, info.name, symbol, len(instruction), taken, len(site_list))
        site_list.append(site)
        return site

    for record in records:
        if record[0] != INSTRUCTION:
            flush()
            if record[0] == CODE:   # new bytes at an address: its site is made again
                sites.pop((record[1], record[2]), None)
            other(record)
            continue
        _, lp, phase_index, flags, context, size, mask, when, address, values, writes, _reads = record
        read += 1
        if progress_every and read % progress_every == 0:
            renderer.report_progress(renderer.read + read)
        if not wants_instructions:
            continue
        if names.generation != generation:      # a context may have another name now
            sites.clear()
            generation = names.generation
        key = (context, address)
        site = sites.get(key)
        if site is None:
            site = site_of(context, lp, address, size)
            if names.cacheable(context, address):
                sites[key] = site
        if not site.taken or (lps and lp not in lps):
            continue
        phase = phases[phase_index]
        if not unfiltered:
            if filters.phases and phase not in filters.phases:
                continue
            if time_range is not None and not time_range[0] <= when < time_range[1]:
                continue
        # The registers changed: RIP only when it is not the next instruction's address.
        fmt = None
        if mask:
            fmt = formats.get(mask)
            if fmt is None:
                fmt = formats[mask] = _MaskFormat(mask)
        if flags & RIP_ADVANCED and site.length != size:
            names_values = list(zip(fmt.names, values)) if fmt else []
            names_values = _sorted_changes(names_values + [("rip", address + size)])
        elif fmt is not None and fmt.rip_position >= 0 and values[fmt.rip_position] == address + site.length:
            names_values = [(name, value) for name, value in zip(fmt.names, values) if name != "rip"]
        else:
            names_values = None
        if writes and len(writes) > 1:
            writes = coalesce(writes)
        if is_text:
            if names_values is not None:
                effects = "".join(f" {name}={value:#x}" for name, value in names_values)
            else:
                effects = fmt.text.format(*values) if fmt is not None else ""
            if writes:
                effects += "".join(f" [{address:#x}]<-{data.hex(' ')}" for address, data in writes)
            if effects:
                out_lines.append(f"{when:>{text_format.TIME_WIDTH}} lp{lp} {site.static}{effects}\n")
            else:
                out_lines.append(f"{when:>{text_format.TIME_WIDTH}} lp{lp} {site.static}".rstrip() + "\n")
        else:
            if names_values is not None:
                registers = ",".join(f'"{name}":"{value:#x}"' for name, value in names_values)
            else:
                registers = fmt.json.format(*values) if fmt is not None else ""
            memory = ",".join(f'["{address:#x}","{data.hex()}"]' for address, data in writes) if writes else ""
            context_json, fixed = site.static
            out_lines.append(f'{{"type":"insn","t":{when},"lp":{lp},"ctx":{context_json},"phase":{json_string(phase)},'
                             f'{fixed}"regs":{{{registers}}},"mem":[{memory}]}}\n')
        counts[(site.number << 16) | (phase_index << 8) | lp] += 1
        if last_time is None or when > last_time:
            last_time = when
        if first_time is None or when < first_time:
            first_time = when
        if len(out_lines) >= FLUSH_LINES:
            flush()
    flush()
    renderer.read += read
    for packed, count in counts.items():
        site = site_list[packed >> 16]
        summary.add_instructions(site.context, phases[(packed >> 8) & 0xFF], packed & 0xFF, site.symbol, count)
    summary.add_times(first_time, last_time)


def _sorted_changes(changes: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(changes, key=lambda change: REGISTER_NAMES.index(change[0]))
