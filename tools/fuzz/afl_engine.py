"""`hhr fuzz --engine afl`: afl-fuzz instances (one -M, the others -S) with hhr as their target, and native workers beside them, all peers in one AFL++ sync directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.fuzz import campaign
from tools.fuzz import fields as fields_module
from tools.fuzz import sync
from tools.fuzz.corpus import write_whole
from tools.fuzz.decoding import EDITS_MAX, RAW_WIDTH_MAX, encode_raw
from tools.fuzz.executor import TransferMachine
from tools.fuzz.inputs import Edit, FuzzInput

AFL_FUZZ = "afl-fuzz"
TIMEOUT_MS = 5000                # afl-fuzz's -t: above the slowest input (a commit judged by its guests, about 1 s)
SETUP_TIMEOUT_MS = 600_000       # AFL_FORKSRV_INIT_TMOUT: the target's setup (boot, reference restart and guests) comes first
SYNC_MINUTES = 1                 # AFL_SYNC_TIME: how often an -S instance imports its peers' queues (-M: twice as often)
STOP_SECONDS = 30.0              # an instance asked to stop (SIGINT) gets this long before it is killed
RAW_SEED_FIELDS = 16             # fields one raw seed sets to the value sent (AFL's mutations of them become field edits)
RAW_SEEDS_FIXED = 2              # raw seeds per message with the digest fixed, each over other fields
RAW_SEEDS_UNFIXED = 1            # ... and without
ENGINE_DIRECTORY = ".hhr-afl"    # OUT's dot directory (no peer reads it): seeds, logs, the targets' figures
SEEDS = "seeds"
ENVIRONMENT = {                  # afl-fuzz in a container, on a target that is a Python program
    "AFL_SKIP_BIN_CHECK": "1",   # the target is no instrumented ELF: the fork server is its own
    "AFL_NO_UI": "1",
    "AFL_AUTORESUME": "1",       # an OUT fuzzed before is resumed
    "AFL_NO_AFFINITY": "1",
    "AFL_SKIP_CPUFREQ": "1",
    "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1",
    "AFL_FORKSRV_INIT_TMOUT": str(SETUP_TIMEOUT_MS),
    "AFL_FAST_CAL": "1",          # three calibration runs of a new entry, not eight: each may be a whole transfer
    "AFL_SYNC_TIME": str(SYNC_MINUTES),
    "AFL_KILL_SIGNAL": str(int(signal.SIGTERM)),   # the target, ended so, writes its figures first
}
FIGURES = ("execs_done", "corpus_count", "corpus_found", "corpus_imported", "saved_crashes", "saved_hangs",
           "bitmap_cvg", "run_time")


class AflError(RuntimeError):
    """afl-fuzz is missing, or an instance did not run."""


@dataclass
class Instance:
    """One afl-fuzz process of the campaign."""

    name: str
    process: subprocess.Popen
    log: Path
    stats: Path


@dataclass
class InstanceFigures:
    name: str
    executions: int = 0
    seconds: float = 0.0                  # from the target's hello on (its setup left out)
    queue: int = 0
    seeds: int = 0
    crashes: list[Path] = field(default_factory=list)
    hangs: list[Path] = field(default_factory=list)
    afl_stats: dict = field(default_factory=dict)   # fuzzer_stats as afl-fuzz wrote it

    @property
    def rate(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0


def available() -> bool:
    return shutil.which(AFL_FUZZ) is not None


def raw_seeds(machine: TransferMachine, targets: tuple[str, ...]) -> list[FuzzInput]:
    """Inputs in raw form (`decoding.encode_raw`) that each set some fields of one message to the
    value sent: they change nothing, and afl-fuzz's byte mutations of their values, offsets and
    widths become edits of those fields. For `messages`, every message; for `vmcs`, the VMCS
    fields of the blackout's message. With the digest fixed, checkable fields only (a change of a
    trusted one is accepted by design, and costs a whole transfer); without, any field (the
    digest must refuse every change)."""
    found = []
    for number, message in enumerate(machine.messages, 1):
        wanted = [f for f in fields_module.message_fields(message) if 1 <= f.width <= RAW_WIDTH_MAX
                  and f.offset < 1 << 16 and ("messages" in targets or
                                              (number in machine.vmcs_messages and f.name.startswith("vmcs[")))]
        for fix_digest, seeds in ((True, RAW_SEEDS_FIXED), (False, RAW_SEEDS_UNFIXED)):
            aimed = [f for f in wanted if f.checkable or not fix_digest]
            for shift in range(min(seeds, len(aimed))):
                chosen = aimed[shift::max(1, len(aimed) // RAW_SEED_FIELDS)][:min(RAW_SEED_FIELDS, EDITS_MAX)]
                found.append(FuzzInput("messages", number, tuple(
                    Edit("set", f.offset, f.width, int.from_bytes(message[f.offset:f.offset + f.width], "little"))
                    for f in chosen), fix_digest=fix_digest))
    return found


def write_seeds(directory: Path, machine: TransferMachine, targets: tuple[str, ...]) -> int:
    """afl-fuzz's input directory: the native seeds (`campaign.seeds`, hhr's JSON) and the raw
    seeds; how many."""
    directory.mkdir(parents=True, exist_ok=True)
    native = [entry.encode() for entry in campaign.seeds(machine, targets)]
    raw = [encode_raw(entry) for entry in raw_seeds(machine, targets)]
    for number, data in enumerate(native + raw):
        write_whole(directory, f"seed-{number:04d}", data)
    return len(native) + len(raw)


def target_command(options: campaign.Options, stats: Path) -> list[str]:
    return [sys.executable, "-m", "tools.fuzz.afl_target", "--setup", json.dumps(options.setup.as_json()),
            "--timeout-ms", str(TIMEOUT_MS), "--findings", str(options.findings), "--stats", str(stats), "@@"]


def start(options: campaign.Options, count: int, seeds: Path) -> list[Instance]:
    """`count` afl-fuzz instances in OUT: `<host>_afl1` the -M, the others -S."""
    engine = options.output / ENGINE_DIRECTORY
    environment = {**os.environ, **ENVIRONMENT}
    instances = []
    for number in range(1, count + 1):
        name = sync.afl_instance_name(options.host, number)
        log, stats = engine / f"{name}.log", engine / f"{name}.target.json"
        stats.unlink(missing_ok=True)
        command = [AFL_FUZZ, "-i", str(seeds), "-o", str(options.output), "-M" if number == 1 else "-S", name,
                   "-t", str(TIMEOUT_MS), "--"] + target_command(options, stats)
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                       env=environment)
        instances.append(Instance(name, process, log, stats))
    return instances


def stop(instances: list[Instance]) -> None:
    """Each instance asked to stop as Ctrl-C does (it saves its state and ends its target), then killed
    if it has not within `STOP_SECONDS`."""
    for instance in instances:
        if instance.process.poll() is None:
            instance.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for instance in instances:
        try:
            instance.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            instance.process.kill()
            instance.process.wait()


def figures(out: Path, instance: Instance) -> InstanceFigures:
    """What an instance did: afl-fuzz's fuzzer_stats and queue, its target's own count."""
    directory = out / instance.name
    stats_file = directory / "fuzzer_stats"
    if not stats_file.is_file():
        tail = instance.log.read_text(errors="replace")[-2000:] if instance.log.is_file() else ""
        raise AflError(f"{AFL_FUZZ} instance {instance.name} did not run (exit {instance.process.returncode}): "
                           f"{tail.strip()}")
    afl_stats = {}
    for line in stats_file.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in FIGURES:
            afl_stats[key.strip()] = value.strip()
    queue = [path for path in (directory / "queue").iterdir() if path.name.startswith("id:")]
    result = InstanceFigures(instance.name, queue=len(queue),
                             seeds=sum(1 for path in queue if ",orig:" in path.name),
                             crashes=sorted((directory / "crashes").glob("id:*")),
                             hangs=sorted((directory / "hangs").glob("id:*")), afl_stats=afl_stats)
    if instance.stats.is_file():
        own = json.loads(instance.stats.read_text())
        result.executions, result.seconds = own["executions"], own["seconds"]
    else:                                 # the target was killed: afl-fuzz's count, over its whole run
        result.executions = int(afl_stats.get("execs_done", 0))
        result.seconds = float(afl_stats.get("run_time", 0))
    return result


def run(options: campaign.Options, afl_instances: int) -> tuple[list[campaign.Stats], list[InstanceFigures]]:
    """The campaign: seeds written, `afl_instances` afl-fuzz instances and `options.workers` native
    workers fuzzing `options.seconds` in `options.output`, then the instances stopped."""
    if options.output is None:
        raise ValueError("--engine afl needs --output OUT (afl-fuzz's sync directory)")
    if afl_instances < 1:
        raise ValueError("--engine afl needs at least one afl-fuzz instance (--workers)")
    if not available():
        raise AflError(f"{AFL_FUZZ} is not installed (Debian's afl++ package)")
    engine = options.output / ENGINE_DIRECTORY
    seeds = engine / SEEDS
    machine = TransferMachine(options.setup, check_guests=False)
    write_seeds(seeds, machine, campaign.targets_of(options.target))
    del machine
    instances = start(options, afl_instances, seeds)
    try:
        native = campaign.run_campaign(options) if options.workers > 0 else []
        if options.workers == 0:
            time.sleep(options.seconds or 0)
    finally:
        stop(instances)
    return native, [figures(options.output, instance) for instance in instances]


def summary(native: list[campaign.Stats], afl: list[InstanceFigures], options: campaign.Options) -> str:
    """The native workers' summary line and afl-fuzz's beside it (executions per second each)."""
    lines = [campaign.summary(native, options)] if native else []
    executions = sum(figure.executions for figure in afl)
    rates = [figure.rate for figure in afl if figure.seconds > 0]
    crashes = sum(len(figure.crashes) for figure in afl)
    hangs = sum(len(figure.hangs) for figure in afl)
    lines.append(f"afl-fuzz ({options.target}): {len(afl)} instance(s), {executions} executions, "
                 f"{sum(rates) / max(len(rates), 1):.0f} execs/s per instance, queue "
                 + ", ".join(f"{figure.name} {figure.queue} ({figure.seeds} seeds)" for figure in afl)
                 + f", crashes {crashes}, hangs {hangs}")
    for figure in afl:
        lines += [f"  crash: {path}" for path in figure.crashes] + [f"  hang: {path}" for path in figure.hangs]
    return "\n".join(lines)


def found_anything(native: list[campaign.Stats], afl: list[InstanceFigures]) -> bool:
    return any(worker.findings for worker in native) or any(figure.crashes or figure.hangs for figure in afl)
