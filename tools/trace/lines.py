"""The text and JSON Lines renderers' loop: emu/trace_lines.c writes one line per instruction straight from the trace file; Python describes each instruction's site once (context name, symbol, bytes, disassembly) and handles every record that is not an instruction. It writes what TextWriter.instruction and JsonLinesWriter.instruction would (a test compares them)."""
from __future__ import annotations

import json

from emu import fast
from tools.trace import jsonl as jsonl_format
from tools.trace import text as text_format
from tools.trace import tracefile
from tools.trace.contexts import GUEST
from tools.trace.registers import REGISTER_NAMES

ffi, lib = fast.ffi, fast.lib
SITE_SLOTS = 1 << 17                    # sites the C table holds before it is cleared and refilled
COUNT_SLOTS = 1 << 17                   # (site, phase, LP) counters before they are taken
OUTPUT_BYTES = 1 << 22
LP_FIELD_BITS, PHASE_FIELD_BITS = 8, 8  # a count's key: site << 16 | phase << 8 | LP
_REGISTER_NAMES = [ffi.new("char[]", name.encode()) for name in REGISTER_NAMES]


class _Site:
    """What Python keeps of a site the C table holds: the names the summary counts it under, and
    the C strings the table points to."""

    __slots__ = ("context", "symbol", "strings")

    def __init__(self, context: str, symbol: str | None, strings: tuple):
        self.context, self.symbol, self.strings = context, symbol, strings


def render(renderer, reader: tracefile.TraceReader) -> None:
    """Renders the file of `reader` with `renderer`'s writer (a TextWriter or JsonLinesWriter),
    names, filters and summary; every record but an instruction goes to renderer.other()."""
    loop = _LineLoop(renderer, reader)
    try:
        loop.run()
    finally:
        loop.release()


class _LineLoop:
    def __init__(self, renderer, reader: tracefile.TraceReader):
        self.renderer = renderer
        self.reader = reader
        self.json = renderer.format == "jsonl"
        self.sites: list[_Site] = []
        self.phase_strings: dict[int, object] = {}
        self.generation = renderer.names.generation
        r = self.state = ffi.new("hhr_render *")
        self._buffer = ffi.from_buffer(reader.buffer)
        r.file = ffi.cast("const uint8_t *", self._buffer)
        r.size = reader.size
        r.offset = len(tracefile.MAGIC)
        r.json = int(self.json)
        r.wants_instructions = int(renderer.wants_instructions)
        filters = renderer.filters
        for lp in range(lib.HHR_RENDER_MAX_LPS):
            r.lp_taken[lp] = int(not filters.lps or lp in filters.lps)
        if filters.time_range is not None:
            r.has_range = 1
            r.range_start, r.range_end = filters.time_range
        for index, name in enumerate(REGISTER_NAMES):
            r.register_names[index] = _REGISTER_NAMES[index]
        self._sites = ffi.new("hhr_render_site[]", SITE_SLOTS)
        r.sites, r.site_mask = self._sites, SITE_SLOTS - 1
        self._count_keys = ffi.new("uint64_t[]", COUNT_SLOTS)
        self._count_values = ffi.new("uint64_t[]", COUNT_SLOTS)
        r.count_keys, r.count_values, r.count_mask = self._count_keys, self._count_values, COUNT_SLOTS - 1
        self._output = ffi.new("char[]", OUTPUT_BYTES)
        r.out, r.out_capacity = self._output, OUTPUT_BYTES
        self.out = getattr(renderer.writer, "out", None)
        self._strings: dict[str, str] = {}

    def run(self) -> None:
        r, renderer = self.state, self.renderer
        progress_every = renderer.PROGRESS_EVERY if renderer.progress is not None else 0
        next_progress = progress_every
        while True:
            status = lib.hhr_render_lines(r)
            if progress_every and r.instructions >= next_progress:
                renderer.report_progress(r.instructions)
                next_progress = r.instructions - r.instructions % progress_every + progress_every
            if status == lib.HHR_RENDER_END:
                break
            if status == lib.HHR_RENDER_RECORD:
                self._flush()
                record, r.offset = self.reader.record_at(r.offset)
                self._other(record)
            elif status == lib.HHR_RENDER_SITE:
                self._describe(r.miss_context, r.miss_lp, r.miss_address, r.miss_size)
            elif status == lib.HHR_RENDER_OUTPUT_FULL:
                self._flush()
                if r.needed > r.out_capacity:
                    self._output = ffi.new("char[]", int(r.needed))
                    r.out, r.out_capacity = self._output, r.needed
            elif status == lib.HHR_RENDER_COUNTS_FULL:
                self._take_counts()
            else:
                raise tracefile.TraceFileError(f"{self.reader.path}: damaged or cut short near byte {r.offset}")
        self._flush()
        self._take_counts()
        renderer.read += r.instructions
        if r.have_time:
            renderer.summary.add_times(r.first_time, r.last_time)

    def release(self) -> None:
        """The file's map is the reader's again (it can be closed)."""
        ffi.release(self._buffer)

    # --- what C hands back -----------------------------------------------------------------------
    def _other(self, record: tuple) -> None:
        renderer, r = self.renderer, self.state
        kind = record[0]
        if kind == tracefile.CODE:   # new bytes at an address: its site is described again
            lib.hhr_render_forget_site(r, record[1], record[2])
        renderer.other(record)
        if self.out is None and renderer.writer is not None:
            self.out = getattr(renderer.writer, "out", None)
        if kind == tracefile.DATA and record[1]["type"] == "phase":
            index, name = record[1]["index"], record[1]["name"]
            filters = renderer.filters
            encoded = self.phase_strings[index] = ffi.new("char[]", json.dumps(name).encode())
            r.phase_json[index], r.phase_json_length[index] = encoded, len(encoded) - 1
            r.phase_taken[index] = int(not filters.phases or name in filters.phases)
        if renderer.names.generation != self.generation:   # a context may have another name now
            self.generation = renderer.names.generation
            lib.hhr_render_forget_sites(r)

    def _describe(self, context: int, lp: int, address: int, size: int) -> None:
        renderer, r = self.renderer, self.state
        names = renderer.names
        info = names.context(context, lp, address)
        symbol = names.symbolizer.symbolize(address, info.partition if info.kind == GUEST else None)
        instruction = renderer.instruction_bytes(context, address, size)
        disassembly = renderer.disassembler.text(address, instruction)
        if self.json:
            fixed = jsonl_format.static_fields(address, symbol, instruction, disassembly)
            context_json = self._json_string(info.name)
        else:
            fixed = text_format.static_columns_of(info.name, address, symbol, instruction, disassembly)
            context_json = ""
        fixed_bytes, context_bytes = fixed.encode(), context_json.encode()
        strings = (ffi.new("char[]", fixed_bytes), ffi.new("char[]", context_bytes))
        site = ffi.new("hhr_render_site *")
        site.address, site.context = address, context
        site.fixed, site.fixed_length = strings[0], len(fixed_bytes)
        site.fixed_trimmed_length = len(fixed.rstrip().encode())
        site.context_json, site.context_json_length = strings[1], len(context_bytes)
        site.exact_length = len(instruction)
        site.taken = int(renderer.unfiltered or renderer.filters.instruction_site(info.name, symbol))
        # Root code outside both images is named by the hypervisor that ran last on its LP, which
        # this loop does not follow: such a site keeps the name it had when first described.
        site.number = len(self.sites)
        if not lib.hhr_render_add_site(r, site):   # the table is full: counted, cleared, refilled
            self._take_counts()
            self.sites.clear()
            lib.hhr_render_forget_sites(r)
            site.number = 0
            lib.hhr_render_add_site(r, site)
        self.sites.append(_Site(info.name, symbol, strings))

    def _json_string(self, value: str) -> str:
        encoded = self._strings.get(value)
        if encoded is None:
            encoded = self._strings[value] = json.dumps(value)
        return encoded

    def _flush(self) -> None:
        r = self.state
        if r.out_used:
            self.out.write(ffi.buffer(r.out, r.out_used)[:].decode("utf-8"))
            r.out_used = 0

    def _take_counts(self) -> None:
        """The C counters into the summary, and cleared."""
        r, summary, phases = self.state, self.renderer.summary, self.renderer.phases
        keys, values = self._count_keys, self._count_values
        lp_mask, phase_mask = (1 << LP_FIELD_BITS) - 1, (1 << PHASE_FIELD_BITS) - 1
        for index in range(COUNT_SLOTS):
            stored = keys[index]
            if stored:
                packed = stored - 1
                site = self.sites[packed >> (LP_FIELD_BITS + PHASE_FIELD_BITS)]
                summary.add_instructions(site.context, phases[(packed >> LP_FIELD_BITS) & phase_mask],
                                         packed & lp_mask, site.symbol, values[index])
        ffi.memmove(self._count_keys, b"\0" * (8 * COUNT_SLOTS), 8 * COUNT_SLOTS)
        r.count_used = 0
