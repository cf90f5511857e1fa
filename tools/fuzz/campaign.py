"""A fuzzing campaign: workers that mutate, run and keep inputs, live statistics, minimized findings, and replay."""
from __future__ import annotations

import multiprocessing
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from emu import fast
from hypervisors import build
from tools.fuzz import corpus as corpus_module
from tools.fuzz import coverage
from tools.fuzz import sync
from tools.fuzz.decoding import runnable
from tools.fuzz import oracles
from tools.fuzz.executor import Result, Setup, TransferMachine
from tools.fuzz import fields as fields_module
from tools.fuzz.inputs import Edit, FuzzInput, apply_edits
from tools.fuzz.mutators import MachineFacts, Mutator

TARGET_CHOICES = ("messages", "state", "vmcs", "all")
RECEIVER_SOURCE = "service.inc"          # the new hypervisor's side of the transfer
DEEP_KINDS = (oracles.GUEST_OUTPUT,)     # findings that need the guests run to their end to show
STATS_EVERY = 1.0                 # seconds between statistics lines
FRESH_SHARE = 0.1                # parents that are a message with no edit yet, the rest from the corpus
COST_SCALE = 50_000               # a parent's weight: COST_SCALE / (COST_SCALE + its instructions), as AFL
                                  # favours fast inputs: more of the campaign goes to what is cheap to run
CHILDREN_PER_PARENT = 16         # inputs made from one parent in a row (AFL's energy, fixed)
CORPUS_SYNC_EVERY = 200           # executions between looks at the shared corpus (several workers, or --output)
MINIMIZE_EXECUTIONS = 40          # a finding's minimization tries at most this many inputs
MINIMIZE_SECONDS = 30.0
# A committed input that changed a checkable field is judged by running the guests to their end
# (seconds): always when it reached new code, otherwise for this share of them.
GUEST_CHECK_SAMPLE = 0.1


@dataclass
class Options:
    setup: Setup
    target: str = "all"
    corpus: Path = Path("fuzz-corpus")
    findings: Path = Path("fuzz-findings")
    seconds: float | None = None
    runs: int | None = None
    workers: int = 1
    seed: int = 0
    quiet: bool = False
    output: Path | None = None        # an AFL++ sync directory: the corpus is OUT/hhr-<host>-<n>/queue (tools/fuzz/sync.py)
    host: str | None = None           # the host part of the instance names (default: this host's name)


@dataclass
class Stats:
    """One worker's figures (summed over workers for the terminal)."""

    executions: int = 0
    seconds: float = 0.0
    edges: int = 0
    blocks: int = 0                  # blocks of the receiving code (service.inc) entered
    blocks_total: int = 0            # its static basic blocks
    corpus: int = 0
    findings: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    setup_seconds: float = 0.0
    guest_checks: int = 0
    saved: list[str] = field(default_factory=list)
    edge_map: bytes = b""            # edges hit (a byte per counter, nonzero if hit): unions over workers
    block_map: bytes = b""           # blocks of the new hypervisor's image entered (final figures only)
    corpus_names: frozenset = frozenset()   # the corpus inputs' content digests
    imported: int = 0                # inputs imported from peers' queues (--output)


def targets_of(target: str) -> tuple[str, ...]:
    return ("messages", "state", "vmcs") if target == "all" else (target,)


def seeds(machine: TransferMachine, targets: tuple[str, ...]) -> list[FuzzInput]:
    """The messages of the real restart, unchanged: one input per message (and per target)."""
    found = []
    if "messages" in targets:
        for number in range(1, len(machine.messages) + 1):
            found += [FuzzInput("messages", number), FuzzInput("messages", number, fix_digest=True)]
    if "vmcs" in targets:
        found += [FuzzInput("vmcs", number, fix_digest=True) for number in machine.vmcs_messages]
    if "state" in targets:
        found.append(FuzzInput("state", 1))
    return found


def guest_check_wanted(result: Result, fresh: bool, rng: random.Random) -> bool:
    """A committed input that changed a checkable field is judged by its guests run to their end
    when it reached new code, and for a sample of the others (`GUEST_CHECK_SAMPLE`)."""
    return result.guest_check_due and (fresh or rng.random() < GUEST_CHECK_SAMPLE)


class Worker:
    """One machine, one random stream, its own view of the shared corpus."""

    def __init__(self, options: Options, index: int, machine: TransferMachine | None = None):
        started = time.perf_counter()
        self.options = options
        self.index = index
        self.rng = random.Random(options.seed * 1_000_003 + index)
        self.machine = machine or TransferMachine(options.setup)
        self.targets = targets_of(options.target)
        self.mutator = Mutator(self.rng, self.machine.messages,
                               MachineFacts(self.machine.machine.ram.size, self.machine.region),
                               self.machine.state_fields(), self.machine.read_state, self.machine.vmcs_messages)
        self.corpus = (sync.SyncQueue(options.output, sync.instance_name(options.host, index))
                       if options.output is not None else corpus_module.Corpus(options.corpus))
        self.seen = fast.ffi.new("uint8_t[]", fast.lib.HHR_EDGE_MAP_SIZE)
        self.signatures: set[tuple] = set()
        self.cost: dict[FuzzInput, int] = {}  # instructions each corpus input took: the cheaper, the likelier a parent
        self._next_sync = CORPUS_SYNC_EVERY
        self.stats = Stats(setup_seconds=time.perf_counter() - started)

    def edges(self) -> int:
        return fast.lib.HHR_EDGE_MAP_SIZE - bytes(fast.ffi.buffer(self.seen)).count(0)

    def run_one(self, entry: FuzzInput, keep: bool) -> Result:
        result = self.machine.execute(entry)
        self.stats.executions += 1
        self.stats.outcomes[result.outcome] += 1
        fresh = fast.lib.hhr_edge_map_merge(self.machine.edge_map, self.seen, fast.lib.HHR_EDGE_MAP_SIZE)
        if fresh or not keep:                 # (a corpus input: only they are drawn as parents)
            self.cost[entry] = result.instructions
        if guest_check_wanted(result, fresh, self.rng):
            self.stats.guest_checks += 1
            result.finding = self.machine.check_guests_after_commit(entry)
        if fresh and keep:
            self.corpus.add(entry)
        if result.finding is not None:
            self._found(entry, result)
        return result

    def _found(self, entry: FuzzInput, result: Result) -> None:
        signature = (result.finding.kind, entry.target, entry.message, tuple(result.replies[:1]))
        if signature in self.signatures:
            return
        self.signatures.add(signature)
        smallest, finding = minimize(self.machine, entry, result.finding.kind)
        smallest = anchored(self.machine, smallest, finding.kind)
        self.stats.findings[finding.kind] += 1
        path = corpus_module.save_finding(self.options.findings, finding.kind, finding.description,
                                          self.options.setup.as_json(), smallest)
        self.stats.saved.append(str(path))

    def fuzz(self, report=None) -> Stats:
        options = self.options
        started = time.perf_counter()
        deadline = started + options.seconds if options.seconds is not None else None
        self.sync()
        for entry in seeds(self.machine, self.targets):     # the real restart's messages, kept whatever they reach
            self.cost[entry] = self.run_one(entry, keep=True).instructions
            self.corpus.add(entry)
        pool = self._pool() or seeds(self.machine, self.targets)
        last_report = started
        while True:
            if options.runs is not None and self.stats.executions >= options.runs:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if (options.workers > 1 or options.output is not None) and self.stats.executions >= self._next_sync:
                self._next_sync += CORPUS_SYNC_EVERY
                self.sync()
            pool = self._pool() or pool
            if self.rng.random() < FRESH_SHARE:
                parent = self.mutator.fresh(self.rng.choice(self.targets))
            else:
                parent = self.rng.choices(pool, [COST_SCALE / (COST_SCALE + self.cost.get(entry, COST_SCALE))
                                                 for entry in pool])[0]
            for _ in range(CHILDREN_PER_PARENT):      # siblings start from the same checkpoint: cheap restores
                if options.runs is not None and self.stats.executions >= options.runs:
                    break
                self.run_one(self.mutator.mutate(parent), keep=True)
            now = time.perf_counter()
            if report is not None and now - last_report >= STATS_EVERY:
                last_report = now
                report(self._snapshot(now - started))
        return self._snapshot(time.perf_counter() - started, final=True)

    def sync(self) -> list[FuzzInput]:
        """Runs the inputs that appeared in the shared corpus (or the peers' queues) since the last
        look, made runnable on this setup; those of other targets are only kept."""
        found = self.corpus.load_new()
        if isinstance(self.corpus, sync.SyncQueue):
            self.stats.imported = sum(self.corpus.imported.values())
        for entry in found:
            if entry.target in self.targets:
                self.run_one(runnable(entry, len(self.machine.messages)), keep=False)
        return found

    def _pool(self) -> list[FuzzInput]:
        count = len(self.machine.messages)
        return [runnable(entry, count) for entry in self.corpus.entries if entry.target in self.targets]

    def _snapshot(self, seconds: float, final: bool = False) -> Stats:
        self.stats.seconds = seconds
        self.stats.edges = self.edges()
        self.stats.edge_map = bytes(fast.ffi.buffer(self.seen))
        if final:
            image = build.image(self.options.setup.to_hv)
            self.stats.block_map = bytes(fast.ffi.buffer(self.machine.block_map))
            self.stats.blocks = coverage.blocks_entered(image, self.stats.block_map, RECEIVER_SOURCE)
            self.stats.blocks_total = coverage.basic_blocks(image, RECEIVER_SOURCE)
            if isinstance(self.corpus, sync.SyncQueue):
                self.corpus.save_blocks(self.options.setup.to_hv, self.stats.block_map)
        self.stats.corpus = len(self.corpus.entries)
        self.stats.corpus_names = frozenset(self.corpus.names)
        return self.stats


def minimize(machine: TransferMachine, entry: FuzzInput, kind: str) -> tuple[FuzzInput, oracles.Finding]:
    """The input with as few edits as still give a finding of `kind` (and its finding)."""
    best = entry
    finding = machine.execute(entry, deep=kind in DEEP_KINDS).finding
    if finding is None or finding.kind != kind:          # not reproducible: keep it as it came
        return entry, finding or oracles.Finding(kind, "did not reproduce on its own")
    started, tries = time.perf_counter(), 0
    index = 0
    while index < len(best.edits) and tries < MINIMIZE_EXECUTIONS and time.perf_counter() - started < MINIMIZE_SECONDS:
        candidate = FuzzInput(best.target, best.message, best.edits[:index] + best.edits[index + 1:],
                              best.fix_digest, best.fix_length)
        tries += 1
        again = machine.execute(candidate, deep=kind in DEEP_KINDS).finding
        if again is not None and again.kind == kind:
            best, finding = candidate, again
        else:
            index += 1
    return best, finding


def anchored(machine: TransferMachine, entry: FuzzInput, kind: str) -> FuzzInput:
    """The input with each edit of a message field given relative to that field (`at`), so that the
    finding file means the same field in a build that lays messages out otherwise; as it was if
    that does not give the same kind of finding."""
    if entry.target == "state" or not entry.edits:
        return entry
    current = machine.messages[machine.message_number(entry.message) - 1]
    edits = []
    for edit in entry.edits:
        field = None
        if edit.op in ("set", "xor") and not edit.at:
            field = fields_module.field_at(fields_module.message_fields(current), edit.offset)
        edits.append(Edit(edit.op, edit.offset - field.offset, edit.width, edit.value, edit.data, edit.field,
                          field.name) if field is not None else edit)
        current = bytes(apply_edits(current, (edit,)))
    candidate = FuzzInput(entry.target, entry.message, tuple(edits), entry.fix_digest, entry.fix_length)
    again = machine.execute(candidate, deep=kind in DEEP_KINDS).finding
    return candidate if again is not None and again.kind == kind else entry


def _worker_main(options: Options, index: int, queue) -> None:
    worker = Worker(options, index)
    final = worker.fuzz(report=lambda stats: queue.put((index, stats, False)))
    queue.put((index, final, True))


def findings_text(all_stats: list[Stats]) -> str:
    """Every worker's findings, by kind: `guest-output 1, hang 2`, or `none`."""
    findings = Counter()
    for s in all_stats:
        findings.update(s.findings)
    return ", ".join(f"{kind} {count}" for kind, count in sorted(findings.items())) or "none"


def union_edges(all_stats: list[Stats]) -> int:
    """Edges hit by any worker of the campaign."""
    return coverage.marks_in_union([s.edge_map for s in all_stats]) if any(s.edge_map for s in all_stats) else \
        max((s.edges for s in all_stats), default=0)


def union_corpus(all_stats: list[Stats]) -> int:
    """Distinct inputs in the corpora of all workers."""
    return len(frozenset().union(*(s.corpus_names for s in all_stats))) or max((s.corpus for s in all_stats), default=0)


def status_line(all_stats: list[Stats], workers: int) -> str:
    executions = sum(s.executions for s in all_stats)
    rate = sum(s.executions / s.seconds for s in all_stats if s.seconds > 0)
    found = findings_text(all_stats)
    imported = sum(s.imported for s in all_stats)
    return (f"execs {executions}  {rate:.0f}/s ({rate / max(workers, 1):.0f}/s per worker)  "
            f"edges {union_edges(all_stats)}  corpus {union_corpus(all_stats)}  "
            + (f"imported {imported}  " if imported else "") + f"findings: {found}")


def run_campaign(options: Options) -> list[Stats]:
    """Runs the workers to the end (seconds or runs); statistics go to stderr as it runs."""
    def show(line: str, end: str = "\r") -> None:
        if not options.quiet:
            print(line, end=end, file=sys.stderr, flush=True)

    if options.workers == 1:
        worker = Worker(options, 0)
        show(f"setup {worker.stats.setup_seconds:.1f} s: {len(worker.machine.messages)} messages, "
             f"{worker.machine.reference_instructions} instructions from the first to the commit", "\n")
        final = worker.fuzz(report=lambda stats: show(status_line([stats], 1)))
        show(status_line([final], 1), "\n")
        return [final]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_worker_main, args=(options, index, queue)) for index in range(options.workers)]
    for process in processes:
        process.start()
    latest: dict[int, Stats] = {}
    finished: set[int] = set()
    while len(finished) < options.workers:
        index, stats, final = queue.get()
        latest[index] = stats
        if final:
            finished.add(index)
        show(status_line(list(latest.values()), options.workers))
    for process in processes:
        process.join()
    show(status_line(list(latest.values()), options.workers), "\n")
    return [latest[index] for index in sorted(latest)]


def summary(all_stats: list[Stats], options: Options) -> str:
    executions = sum(s.executions for s in all_stats)
    seconds = max((s.seconds for s in all_stats), default=0.0)
    per_worker = [s.executions / s.seconds for s in all_stats if s.seconds > 0]
    found = findings_text(all_stats)
    return (f"fuzz {options.setup.from_hv} -> {options.setup.to_hv} ({options.target}): {executions} executions in "
            f"{seconds:.1f} s, {sum(per_worker) / max(len(per_worker), 1):.0f} execs/s per worker, "
            f"{union_edges(all_stats)} edges of {options.setup.to_hv} "
            f"({union_blocks(all_stats, options.setup.to_hv)} of the {max((s.blocks_total for s in all_stats), default=0)} "
            f"basic blocks of its {RECEIVER_SOURCE} entered), "
            f"corpus {union_corpus(all_stats)}, findings: {found}")


def union_blocks(all_stats: list[Stats], hypervisor: str) -> int:
    """Blocks of the receiving code entered by any worker."""
    maps = [s.block_map for s in all_stats if s.block_map]
    if not maps:
        return max((s.blocks for s in all_stats), default=0)
    return coverage.blocks_entered(build.image(hypervisor), coverage.union_map(maps), RECEIVER_SOURCE)


def replay(path: Path, setup: Setup | None, machine: TransferMachine | None = None) -> tuple[Result, str | None, Setup]:
    """Runs a finding (or corpus) file again, with the deep checks on; (result, kind recorded, setup).
    `machine` is used if it has the file's setup."""
    recorded_setup, entry, kind = corpus_module.load_replay(path)
    chosen = Setup.from_json(recorded_setup) if recorded_setup else (setup or Setup())
    if machine is None or machine.setup != chosen:
        machine = TransferMachine(chosen)
    return machine.execute(runnable(entry, len(machine.messages)), deep=True), kind, chosen


def replay_text(path: Path, result: Result, kind: str | None) -> str:
    finding = result.finding
    verdict = f"finding {finding.kind}: {finding.description}" if finding else "no finding"
    expected = f" (recorded: {kind})" if kind else ""
    return f"{path}: {result.outcome}, replies {result.replies}: {verdict}{expected}"
