"""Dirty-page tracking and checkpoints restored by reverting only the pages written since: the fuzzer's fast restore.

Tracking is off (one NULL test per TLB fill, no hook) unless a `DirtyPages` is started. While it is
on, every write to RAM marks its 4 KiB page: writes by emulated code through the C TLB-fill hook
(emu/fastpath.c: a page not yet dirty is filled without write permission, so its first write is
filled again, as a write), writes by the machine's Python (emu/memory.py). Nothing is hooked per
instruction. Pages code is fetched from are marked too, per context: a restore keeps the
translated code of every context that ran none of the pages whose bytes it changes, which is most
of a restore's saving. Byte ranges the owner knows hold data only (`Checkpoints.trust_data_ranges`)
do not count as a change to a page's code; a page Python wrote outside them always does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from emu import fast
from emu import snapshot as snapshot_module
from emu.vmx_defs import PAGE_SIZE

if TYPE_CHECKING:
    from emu.context import ExecutionContext
    from emu.machine import Machine
    from emu.memory import HostMemory

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


class DirtyPages:
    """One mark per host page, set by any write since the last `collect`. It uses RAM (which marks
    Python's writes) and the machine's list of contexts (whose C state marks theirs)."""

    def __init__(self, ram: "HostMemory", contexts: list["ExecutionContext"]):
        self.ram = ram
        self.contexts = contexts
        self.count = ram.size // PAGE_SIZE
        self.marks = fast.ffi.new("uint8_t[]", self.count)
        # Pages code was fetched from since tracking began, per context (by its python id).
        self.code: dict[int, Any] = {}
        self._found = fast.ffi.new("uint32_t[]", self.count)
        self.running = False
        # Pages Python wrote (not emulated code: Unicorn sees those and retranslates what they change)
        # outside the ranges trusted to hold data only, since the last restore: translated code from
        # them may be stale whatever they hold at the restore.
        self.python_written: set[int] = set()
        self.data_only: list[tuple[int, int]] = []
        # Writes told apart (`watch`): some contexts', and Python's while a condition holds; their own
        # marks, merged into `marks` at `unwatch`.
        self._watched: list["ExecutionContext"] = []
        self._python_while: Callable[[], bool] | None = None
        self._watched_marks = fast.ffi.new("uint8_t[]", self.count)

    def start(self) -> None:
        self.ram.dirty = self
        for context in self.contexts:
            self.attach(context)
        self.running = True

    def attach(self, context: "ExecutionContext") -> None:
        context.fast.ctx.dirty_pages = self.marks
        marks = self.code.setdefault(context.fast.python_id, fast.ffi.new("uint8_t[]", self.count))
        context.fast.ctx.code_pages = marks
        context.fast.ctx.dirty_page_count = self.count
        context.flush_translations()          # translations made before had write permission

    def stop(self) -> None:
        self.unwatch()
        for context in self.contexts:
            context.fast.ctx.dirty_pages = fast.ffi.NULL
            context.fast.ctx.code_pages = fast.ffi.NULL
            context.fast.ctx.dirty_page_count = 0
            context.flush_translations()
        self.ram.dirty = None
        self.running = False

    def mark(self, address: int, length: int) -> None:
        pages = range(address >> PAGE_SHIFT, ((address + max(length, 1) - 1) >> PAGE_SHIFT) + 1)
        for page in pages:
            self.marks[page] = 1
        if self._python_while is not None and self._python_while():
            for page in pages:
                self._watched_marks[page] = 1
        if not any(start <= address and address + length <= stop for start, stop in self.data_only):
            self.python_written.update(pages)

    def watch(self, contexts: list["ExecutionContext"], python_while: Callable[[], bool]) -> None:
        """From now on, until `unwatch`, the pages the `contexts`' emulated code writes, and those
        Python writes while `python_while()` holds, are told apart (they count as written for
        `collect` all the same)."""
        self.unwatch()
        for context in contexts:
            context.fast.ctx.dirty_pages = self._watched_marks
            context.flush_translations()      # a page it may write without a mark would go unseen
        self._watched, self._python_while = list(contexts), python_while

    def unwatch(self) -> list[int]:
        """The pages written as `watch` told apart since it was called (none if nothing is watched);
        the watched contexts' marks go back to the common ones."""
        contexts, self._watched, self._python_while = self._watched, [], None
        if not contexts:
            return []
        found = fast.lib.hhr_dirty_collect(self._watched_marks, self.count, self._found)
        pages = list(self._found[0:found])
        for page in pages:
            self.marks[page] = 1
        for context in contexts:              # (the pages they may write without a mark are marked)
            context.fast.ctx.dirty_pages = self.marks
        return pages

    def collect(self, rearm: bool = True) -> list[int]:
        """The pages written since the last collect (their marks cleared). Translations are dropped so
        that the next write to each page marks it again (`rearm=False` when the caller drops them)."""
        self.unwatch()
        found = fast.lib.hhr_dirty_collect(self.marks, self.count, self._found)
        if rearm:
            for context in self.contexts:
                context.flush_translations()
        return list(self._found[0:found])


class Checkpoints:
    """A whole-machine snapshot taken once (the base) and named points reached from it by running,
    each kept as the machine's state without RAM and the pages that differ from the base. Restoring a
    point writes back only the pages dirtied since the last restore and those the two points differ in."""

    def __init__(self, machine: "Machine"):
        self.machine = machine
        self.base = snapshot_module.take(machine)
        self.pages = DirtyPages(machine.ram, machine.contexts)
        self.pages.start()
        self.points: dict[str, tuple[snapshot_module.MachineSnapshot, dict[int, bytes]]] = {"base": (self.base, {})}
        self.current = "base"
        self.current_pages: set[int] = set()  # pages where RAM differs from the base at the current point
        self.pages_restored = 0               # statistics: pages written back by all restores
        self.code_flushes = 0                 # restores that dropped translated code
        # Host-physical byte ranges the owner knows no code was ever translated from (data beside code
        # in one page): a page whose bytes differ only there keeps its translated code. The owner
        # empties it (`trust_data_ranges(())`) as soon as it sees code run there.
        self._code_spans: dict[int, list[tuple[int, int]]] = {}

    def trust_data_ranges(self, ranges) -> None:
        """Sets the data-only ranges (host-physical [start, stop)); () trusts none."""
        spans: dict[int, list[tuple[int, int]]] = {}
        for start, stop in ranges:
            for page in range(start >> PAGE_SHIFT, ((stop - 1) >> PAGE_SHIFT) + 1):
                spans.setdefault(page, [])
        for page in spans:                    # the page's bytes outside every range: where code may be
            base, cursor, code = page << PAGE_SHIFT, 0, []
            for start, stop in sorted(ranges):
                low, high = max(start - base, 0), min(stop - base, PAGE_SIZE)
                if low >= high:
                    continue
                if low > cursor:
                    code.append((cursor, low))
                cursor = max(cursor, high)
            if cursor < PAGE_SIZE:
                code.append((cursor, PAGE_SIZE))
            spans[page] = code
        self._code_spans = spans
        self.pages.data_only = sorted(ranges)

    def _same_code(self, page: int, now, content) -> bool:
        """The page's bytes that code may have been translated from are the same in both."""
        spans = self._code_spans.get(page)
        if spans is None:
            return now == content
        return all(now[low:high] == content[low:high] for low, high in spans)

    def mark(self, name: str) -> None:
        """The machine's state now, between runs, as point `name`."""
        delta = dict(self.points[self.current][1])
        ram = self.machine.ram
        for page in self.pages.collect():
            address = page << PAGE_SHIFT
            content = ram.read(address, PAGE_SIZE)
            if content == self.base.ram[address:address + PAGE_SIZE]:
                delta.pop(page, None)
            else:
                delta[page] = content
        self.points[name] = (snapshot_module.take(self.machine, with_ram=False), delta)
        self.current, self.current_pages = name, set(delta)

    def read(self, name: str, address: int, length: int) -> bytes:
        """RAM's bytes at point `name` (without restoring it)."""
        delta = self.points[name][1]
        found = bytearray()
        while length > 0:
            page, offset = address >> PAGE_SHIFT, address & (PAGE_SIZE - 1)
            take = min(length, PAGE_SIZE - offset)
            content = delta.get(page)
            found += content[offset:offset + take] if content is not None else self.base.ram[address:address + take]
            address, length = address + take, length - take
        return bytes(found)

    def restore(self, name: str) -> None:
        state, delta = self.points[name]
        pages = set(self.pages.collect(rearm=False))
        python_written = self.pages.python_written
        pages |= python_written
        if name != self.current:
            pages |= self.current_pages | delta.keys()
        view, base, code = self.machine.ram.view(), self.base.ram, self.pages.code
        stale: set[int] = set()               # contexts whose translated code a page held
        for page in pages:
            address = page << PAGE_SHIFT
            content = delta.get(page)
            if content is None:
                content = base[address:address + PAGE_SIZE]
            ran = [python_id for python_id, marks in code.items() if marks[page]]
            if ran:
                now = view[address:address + PAGE_SIZE]
                if page in python_written:
                    stale.update(ran)         # code may have been translated from bytes Python overwrote
                elif now == content:
                    continue                  # written since, but with what it held: its code stands
                elif not self._same_code(page, now, content):
                    stale.update(ran)         # (only data beside the code changed: it stands)
            view[address:address + PAGE_SIZE] = content
        # Drops every translation (TLB), and the translated code of the contexts that ran a page written back.
        snapshot_module.restore(self.machine, state, with_ram=False, flush_code=frozenset(stale))
        self.pages.collect(rearm=False)
        python_written.clear()
        self.code_flushes += bool(stale)
        self.current, self.current_pages = name, set(delta)
        self.pages_restored += len(pages)

    def replace(self, name: str, point: tuple) -> None:
        """Puts a point back as it was (one `points[name]` held before it was marked anew)."""
        self.points[name] = point
        self.current = ""                     # RAM is at no known point: the next restore writes every page that may differ

    def close(self) -> None:
        self.pages.stop()
