"""The `hhr` command: selftest, run, restart, trace, fuzz, and benchmarks."""
from __future__ import annotations

import argparse
import sys

from tools.lab import cli as lab_cli

SELFTEST_GUEST = """
  lea rsi, [rip + message]
next_byte:
  lodsb
  test al, al
  jz finished
  out 0xE9, al
  jmp next_byte
finished:
  mov eax, 1
  cpuid
  mov eax, 42
  vmcall
  xor eax, eax
  hlt
message:
  .asciz "hello from a guest under VMX on the emulated machine\\n"
"""


def selftest(args: argparse.Namespace) -> int:
    """Boots the bare machine with a tiny root-mode monitor that launches a guest, and reports."""
    from hypervisors import bare_monitor
    from emu.vmx_defs import ExitReason

    run = bare_monitor.run_guest(SELFTEST_GUEST, record_events=True)
    stop = run.result.stop
    sys.stdout.write(run.console)
    print(f"machine stop: {stop.reason}, exit status {stop.exit_status}")
    print(f"instructions retired: {run.result.instructions}, virtual time: {run.result.virtual_time} ticks, "
          f"host time: {run.seconds * 1000:.1f} ms")
    print("VM exits by reason:")
    for reason, count in sorted(run.result.exits_by_reason.items()):
        print(f"  {ExitReason(reason).name:<20} {count}")
    kinds: dict[str, int] = {}
    for event in run.machine.events.events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    print("machine events: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())))
    ok = stop.reason == "debug-exit" and stop.exit_status == 1 and "hello from a guest" in run.console
    print("selftest " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def bench(args: argparse.Namespace) -> int:
    """Without a flag: the hot-restart scenarios (bench/README.md); --machine, --hypervisor, --trace, --fuzz: those benches."""
    if args.hypervisor:
        from bench import hypervisor_speed

        return hypervisor_speed.main(args.json, args.hv)
    if args.machine:
        from bench import machine_speed

        return machine_speed.main(args.json)
    if args.trace:
        from bench import trace_speed

        return trace_speed.main(args.json)
    if args.fuzz:
        from bench import fuzz_speed

        return fuzz_speed.main(args.json, against=args.against, afl_seconds=args.afl_seconds)
    from bench import restart_scenarios

    return restart_scenarios.main(quick=args.quick, json_path=args.json, output=args.output)


def run(args: argparse.Namespace) -> int:
    """Boots the machine with a hypervisor and guests and reports every guest."""
    import json

    from guests.catalog import GuestSpecError, parse_size
    from hypervisors.boot import BootError
    from tools import run as run_module

    try:
        ram = parse_size(args.ram) if args.ram else None
        report = run_module.run(args.hv, args.guest, lps=args.lps, ram_size=ram,
                                max_instructions=args.max_instructions)
    except (GuestSpecError, BootError, ValueError) as error:
        print(f"hhr run: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.document, indent=2) if args.json else run_module.text(report))
    stop = report.document["machine_stop"]["reason"]
    return 0 if stop == "debug-exit" else 1


def restart(args: argparse.Namespace) -> int:
    """Runs guests under --from, hot-restarts at each --at, reports phases and blackout."""
    import json

    from guests.catalog import GuestSpecError, parse_size
    from hypervisors.boot import BootError
    from tools import restart as restart_module

    try:
        ram = parse_size(args.ram) if args.ram else None
        document = restart_module.restart(args.from_hv, args.to_hv, args.guest or RESTART_DEMO_GUESTS,
                                          lps=args.lps, ram_size=ram, request_at=args.at or [DEFAULT_AT],
                                          max_instructions=args.max_instructions, inject=args.inject,
                                          mode=args.mode)
    except (GuestSpecError, BootError, ValueError) as error:
        print(f"hhr restart: {error}", file=sys.stderr)
        return 2
    print(json.dumps(document, indent=2) if args.json else restart_module.text(document))
    committed = all(entry["outcome"] in ("committed", "resumed") for entry in document["restarts"])
    return 0 if committed and document["machine_stop"]["reason"] == "debug-exit" else 1


def trace(args: argparse.Namespace) -> int:
    """Hot-restarts as `hhr restart` does and writes every instruction and event of the window."""
    from guests.catalog import GuestSpecError, parse_size
    from hypervisors import transfer
    from hypervisors.boot import BootError
    from tools.trace import session as trace_session
    from tools.trace.filters import Filters
    from tools.trace.tracefile import TraceFileError
    from tools.trace.window import Window, WindowError, parse_ticks_range

    try:
        ram = parse_size(args.ram) if args.ram else None
        if args.window and (args.from_event or args.to_event):
            raise WindowError("give either --window or --from-event/--to-event")
        if args.window:
            window = Window.of_time(*parse_ticks_range(args.window, "--window"))
        else:
            window = Window(start_event=args.from_event or "doorbell",
                            end_event=args.to_event or "first-guest-instruction")
        phase_names = [phase.name.lower() for phase in transfer.Phase]
        for name in args.phase or ():
            if name.lower() not in phase_names:
                raise WindowError(f"--phase {name!r}: one of {', '.join(phase_names)}")
        for lp in args.lp or ():
            if args.input is None and not 0 <= lp < args.lps:
                raise WindowError(f"--lp {lp}: the machine has LPs 0 to {args.lps - 1}")
        filters = Filters(lps=frozenset(args.lp or ()), contexts=frozenset(args.context or ()),
                          phases=frozenset(name.lower() for name in args.phase or ()),
                          symbols=tuple(args.symbol or ()),
                          time_range=parse_ticks_range(args.range, "--range") if args.range else None,
                          events_only=args.events_only)
        options = trace_session.TraceOptions(
            from_hypervisor=args.from_hv, to_hypervisor=args.to_hv, guests=args.guest or RESTART_DEMO_GUESTS,
            lps=args.lps, ram_size=ram, request_at=args.at or [DEFAULT_AT], max_instructions=args.max_instructions,
            inject=args.inject, mode=args.mode, format=args.format, output=args.output, window=window,
            filters=filters, to_end=args.to_end, progress=None if args.quiet else sys.stderr, input=args.input,
            record_reads=args.record_reads)
        result = trace_session.trace(options)
    except (GuestSpecError, BootError, WindowError, ValueError, OSError, TraceFileError) as error:
        print(f"hhr trace: {error}", file=sys.stderr)
        return 2
    out = sys.stderr if args.output is None else sys.stdout
    try:
        _print_trace_summary(result, args, out)
    except BrokenPipeError:     # `hhr trace -o FILE | head`: the reader has gone
        pass
    return 0


def _print_trace_summary(result, args: argparse.Namespace, out) -> None:
    if args.json:   # the summary, and with --to-end the run's document as `hhr restart --json` gives it
        import json

        print(json.dumps({"summary": result.summary.as_dict(), "recorded": result.recorded,
                          "outputs": [str(path) for path in result.outputs], "run": result.document},
                         indent=2), file=out)
        return
    if args.format != "hhrt":
        for line in result.summary.lines():
            print(line, file=out)
    if args.input is None:
        figures = f"host time {result.host_seconds:.2f} s for {result.recorded} instructions recorded"
        if result.host_seconds and result.recorded:
            figures += f" ({result.recorded / result.host_seconds:,.0f} per second)"
        figures += f", trace file {result.trace_file_bytes:,} bytes"
    else:
        figures = f"{result.recorded} instructions in the trace file"
    if args.format != "hhrt":
        figures += f"; rendered in {result.render_seconds:.2f} s"
    if result.outputs:
        shown = ", ".join(str(path) for path in result.outputs[:SHOWN_OUTPUTS])
        figures += f"; written to {shown}" + (" ..." if len(result.outputs) > SHOWN_OUTPUTS else "")
    print(figures, file=out)


SHOWN_OUTPUTS = 4       # files named after a trace (a Tenet trace has one per context and LP)


def fuzz(args: argparse.Namespace) -> int:
    """Fuzzes the state transfer of a restart --from into --to (docs/fuzzing.md), or replays a finding."""
    from pathlib import Path

    from guests.catalog import GuestSpecError
    from hypervisors.boot import BootError
    from tools.fuzz import campaign
    from tools.fuzz.executor import Setup

    guests = args.guest or (FUZZ_GUESTS if args.lps == 1 else FUZZ_GUESTS_SEVERAL_LPS)
    setup = Setup(args.from_hv, args.to_hv, tuple(guests), args.lps, args.at, args.mode)
    try:
        if args.replay:
            result, kind, _ = campaign.replay(Path(args.replay), setup)
            print(campaign.replay_text(Path(args.replay), result, kind))
            return 1 if result.finding else 0
        if args.report:
            from tools.fuzz import report
            print(report.report_text(Path(args.report)))
            return 0
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        if args.engine == "afl":
            return fuzz_with_afl(args, setup)
        options = campaign.Options(setup, args.target, Path(args.corpus), Path(args.findings), args.seconds,
                                   args.runs, args.workers, args.seed,
                                   output=Path(args.output) if args.output else None, host=args.host)
        if args.seconds is None and args.runs is None:
            options.seconds = FUZZ_DEFAULT_SECONDS
        stats = campaign.run_campaign(options)
    except (GuestSpecError, BootError, ValueError, OSError) as error:
        print(f"hhr fuzz: {error}", file=sys.stderr)
        return 2
    print(campaign.summary(stats, options))
    for worker in stats:
        for path in worker.saved:
            print(f"  finding: {path}")
    return 1 if any(worker.findings for worker in stats) else 0


def fuzz_with_afl(args: argparse.Namespace, setup) -> int:
    """`hhr fuzz --engine afl`: --workers afl-fuzz instances and --native-workers native workers in
    one AFL++ sync directory (docs/fuzzing.md)."""
    from pathlib import Path

    from tools.fuzz import afl_engine, campaign

    if not args.output:
        raise ValueError("--engine afl needs --output OUT (afl-fuzz's sync directory)")
    if args.runs is not None:
        raise ValueError("--engine afl runs for --seconds, not --runs (afl-fuzz counts no runs)")
    if args.native_workers < 0:
        raise ValueError("--native-workers must be at least 0")
    options = campaign.Options(setup, args.target, Path(args.corpus), Path(args.findings),
                               args.seconds if args.seconds is not None else FUZZ_DEFAULT_SECONDS, None,
                               args.native_workers, args.seed, output=Path(args.output), host=args.host)
    try:
        native, afl = afl_engine.run(options, args.workers)
    except afl_engine.AflError as error:
        print(f"hhr fuzz: {error}", file=sys.stderr)
        return 2
    print(afl_engine.summary(native, afl, options))
    for worker in native:
        for path in worker.saved:
            print(f"  finding: {path}")
    return 1 if afl_engine.found_anything(native, afl) else 0


FUZZ_GUESTS = ["storm", "hashchain"]
# With several LPs the restart's request phase takes longer (LP 0 digests the image between its
# guests' slices) while the other LPs run theirs: hashchain ends first. A counter lives long enough.
FUZZ_GUESTS_SEVERAL_LPS = ["storm,mem=8M", "counter,mem=4M"]
FUZZ_DEFAULT_SECONDS = 60
DEFAULT_AT = 1_000_000
RESTART_DEMO_GUESTS = ["storm,vps=2", "heartbeat", "hashchain", "timer"]


def symbols(args: argparse.Namespace) -> int:
    """Writes an ELF symbol file of an image at the address it runs at (docs/gdb.md)."""
    from tools.gdb import elf_symbols

    try:
        written = elf_symbols.write(args.image, args.output, int(args.at, 0) if args.at else None, args.prefix)
    except (ValueError, OSError) as error:
        print(f"hhr symbols: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(written.image.symbols)} symbols of {written.image_name} at {written.address:#x}; "
          f"in gdb: add-symbol-file {args.output}")
    return 0


def _add_machine_arguments(parser: argparse.ArgumentParser, *, lps: int = 1, guests: list[str] | None = None) -> None:
    parser.add_argument("--lps", type=int, default=lps, help=f"logical processors (default {lps})")
    parser.add_argument("--ram", help="machine RAM, e.g. 512M (default: what the guests need)")
    parser.add_argument("--guest", action="append", required=guests is None, metavar="SPEC",
                        help="a built-in guest name or a flat binary, optionally ,vps=N,mem=SIZE (repeatable)"
                             + (f"; default {' '.join(guests)}" if guests else ""))
    parser.add_argument("--max-instructions", type=int, default=2_000_000_000,
                        help="stop after this many instructions (default 2e9)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gdb", metavar="[HOST:]PORT",
                        help="serve gdb on this port (host 127.0.0.1 unless given): the machine starts stopped "
                             "before its first instruction and waits for gdb (docs/gdb.md)")


def _add_restart_arguments(parser: argparse.ArgumentParser, suspend: bool = True) -> None:
    """The arguments of `hhr restart`; `suspend` False leaves out the suspend mode (a trace follows one
    machine, and a suspend resets it)."""
    parser.add_argument("--from", dest="from_hv", default="hv1", help="the hypervisor booted (default hv1)")
    parser.add_argument("--to", dest="to_hv", default="hv2", help="the hypervisor it becomes (default hv2)")
    parser.add_argument("--at", type=int, action="append",
                        help="request a restart when the machine has retired this many instructions "
                             "(default 1e6; repeatable: the restarts alternate --to and --from)")
    modes = ["precopy", "stop-and-copy", "postcopy"] + (["suspend"] if suspend else [])
    parser.add_argument("--mode", default="precopy", choices=modes,
                        help="state sent while guests run (default), all of it in the blackout, only what VPs "
                             "need in the blackout and the map windows after the take-over (postcopy)"
                             + (", or suspend to the disk, reset and resume under --to" if suspend else ""))
    parser.add_argument("--inject", default="none", metavar="STEP:FAULT",
                        help="a fault at a protocol step (request, boot, invariants, precopy, blackout, "
                             "verify, commit; postcopy: the old hypervisor's fetches after a post-copy's "
                             "commit) of the first restart: hang, crash, refuse or corrupt"
                             + ("; with --mode suspend: resume:corrupt (a byte of the image on the disk)"
                                if suspend else ""))
    _add_machine_arguments(parser, lps=2, guests=RESTART_DEMO_GUESTS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hhr", description="Hypervisor hot restart on an emulated x86-64 machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("selftest", help="boot the machine, launch a guest under VMX, report").set_defaults(func=selftest)
    run_parser = commands.add_parser("run", help="run guests under a hypervisor")
    run_parser.add_argument("--hv", default="hv1", help="the hypervisor (default hv1)")
    _add_machine_arguments(run_parser)
    run_parser.set_defaults(func=run)
    restart_parser = commands.add_parser("restart", help="hot-restart the hypervisor while guests run")
    _add_restart_arguments(restart_parser)
    restart_parser.set_defaults(func=restart)
    trace_parser = commands.add_parser("trace", help="hot-restart and trace every instruction and event of the "
                                                     "hand-off (docs/tracing.md)")
    _add_restart_arguments(trace_parser, suspend=False)
    trace_parser.add_argument("--input", "-i", metavar="FILE.hhrt",
                              help="render this trace file (written with --format hhrt) instead of running the "
                                   "machine; the window is the file's, filters and format are chosen anew")
    trace_parser.add_argument("--record-reads", action="store_true",
                              help="with --format hhrt: keep the memory each instruction reads too (what Tenet's "
                                   "mr= entries show; --format tenet records them anyway)")
    trace_parser.add_argument("--format", default="text",
                              choices=["text", "jsonl", "tenet", "chrome", "parquet", "hhrt"],
                              help="annotated text (default), JSON Lines, Tenet (a directory of files, one per "
                                   "context and LP), Chrome Trace Event JSON of the phases for Perfetto, Parquet "
                                   "(a directory of tables: instructions, events, loads; needs pyarrow), or the "
                                   "recorded trace file itself (hhrt)")
    trace_parser.add_argument("--output", "-o", metavar="PATH",
                              help="the trace file (for tenet and parquet: a directory); default standard output")
    trace_parser.add_argument("--from-event", metavar="KIND",
                              help="the window begins at the first event of this kind from the doorbell on "
                                   "(default: the doorbell)")
    trace_parser.add_argument("--to-event", metavar="KIND",
                              help="the window ends at the first event of this kind after its beginning "
                                   "(default: the first guest instruction under the new hypervisor)")
    trace_parser.add_argument("--window", metavar="START:END",
                              help="the window is this range of virtual time instead (ticks, END excluded)")
    trace_parser.add_argument("--lp", type=int, action="append", help="only this LP (repeatable)")
    trace_parser.add_argument("--context", action="append", metavar="NAME",
                              help="only instructions of this context, as printed: hv1@root, hv2@service, "
                                   "hv2@root, p0.vp1 (repeatable)")
    trace_parser.add_argument("--phase", action="append", metavar="NAME",
                              help="only while this protocol phase is current: requested, service, invariants, "
                                   "precopy, blackout, commit, devirtualize, resumed (repeatable)")
    trace_parser.add_argument("--symbol", action="append", metavar="NAME",
                              help="only instructions inside this symbol (hv2:receive_records, or a name found "
                                   "in either image; `name.local` labels count as inside `name`)")
    trace_parser.add_argument("--range", metavar="START:END", help="only this range of virtual time (ticks)")
    trace_parser.add_argument("--events-only", action="store_true",
                              help="no instruction lines (no per-instruction hook is installed)")
    trace_parser.add_argument("--to-end", action="store_true",
                              help="after the window, run on to the guests' end as `hhr restart` does")
    trace_parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on standard error")
    trace_parser.set_defaults(func=trace)
    fuzz_parser = commands.add_parser("fuzz", help="fuzz the state transfer of a hot restart (docs/fuzzing.md)")
    fuzz_parser.add_argument("--from", dest="from_hv", default="hv1", help="the old hypervisor (default hv1)")
    fuzz_parser.add_argument("--to", dest="to_hv", default="hv2", help="the new hypervisor, fuzzed (default hv2)")
    fuzz_parser.add_argument("--guest", action="append", metavar="SPEC",
                             help=f"a guest as for hhr run (repeatable; default {' '.join(FUZZ_GUESTS)}, "
                                  f"with --lps 2 or more {' '.join(FUZZ_GUESTS_SEVERAL_LPS)})")
    fuzz_parser.add_argument("--lps", type=int, default=1, help="logical processors (default 1)")
    fuzz_parser.add_argument("--at", type=int, default=400_000, help="the restart is requested after this many "
                                                                      "instructions (default 400000)")
    fuzz_parser.add_argument("--mode", default="precopy", choices=["precopy", "stop-and-copy", "postcopy"],
                             help="the restart's mode (default precopy); postcopy fuzzes its blackout's POSTCOPY "
                                  "record and pending frames, and the receiver's rules for them")
    fuzz_parser.add_argument("--target", default="all", choices=["messages", "state", "vmcs", "all"],
                             help="what inputs change: messages in flight, the old hypervisor's records, the "
                                  "VMCS images, or all (default)")
    fuzz_parser.add_argument("--corpus", default="fuzz-corpus", metavar="DIR",
                             help="the corpus directory, one input per file (default fuzz-corpus)")
    fuzz_parser.add_argument("--findings", default="fuzz-findings", metavar="DIR",
                             help="where findings are saved (default fuzz-findings)")
    fuzz_parser.add_argument("--seconds", type=float, help=f"campaign length (default {FUZZ_DEFAULT_SECONDS} s "
                                                           "unless --runs)")
    fuzz_parser.add_argument("--runs", type=int, help="stop each worker after this many inputs")
    fuzz_parser.add_argument("--workers", type=int, default=1, help="parallel workers sharing the corpus (with --engine afl: afl-fuzz instances, one -M, the others -S)")
    fuzz_parser.add_argument("--seed", type=int, default=0, help="random seed (one worker: the same run)")
    fuzz_parser.add_argument("--replay", metavar="FILE", help="run one finding or corpus file again and report")
    fuzz_parser.add_argument("--output", "-o", metavar="OUT",
                             help="an AFL++ sync directory, instead of --corpus: inputs go to "
                                  "OUT/hhr-HOST-N/queue/id:NNNNNN,..., the other instances' queues are imported")
    fuzz_parser.add_argument("--host", help="the HOST of the instance names under --output (default: this host's name)")
    fuzz_parser.add_argument("--engine", choices=["native", "afl"], default="native",
                             help="afl: --workers afl-fuzz instances (Debian's afl++) with hhr as their target, "
                                  "beside --native-workers native ones, all in --output OUT")
    fuzz_parser.add_argument("--native-workers", type=int, default=1,
                             help="with --engine afl: native workers beside the afl-fuzz instances (default 1)")
    fuzz_parser.add_argument("--report", metavar="OUT", help="print the blocks of the receiving code (service.inc, "
                             "guest_state.inc, every include of hypervisors/common) the campaigns in OUT entered")
    fuzz_parser.set_defaults(func=fuzz)
    symbols_parser = commands.add_parser("symbols", help="write an ELF with an image's symbols at its run address, "
                                                         "for gdb's add-symbol-file (docs/gdb.md)")
    symbols_parser.add_argument("image", help="hv1, hv2 or a built-in guest")
    symbols_parser.add_argument("-o", "--output", required=True, help="the ELF file to write")
    symbols_parser.add_argument("--at", help="where the image runs (default: where it is assembled to run; "
                                             "`monitor where` in gdb says where each hypervisor is)")
    symbols_parser.add_argument("--prefix", default="", help="put this before every name (hv2_: hv2_receive_vp)")
    symbols_parser.set_defaults(func=symbols)
    bench_parser = commands.add_parser("bench", help="benchmarks: hot restart against the alternatives (default), "
                                                     "--machine, --hypervisor")
    bench_parser.add_argument("--machine", action="store_true", help="the machine's own speed against bare Unicorn")
    bench_parser.add_argument("--trace", action="store_true",
                              help="hhr trace on the demo's hand-off: recording and each format's rendering, "
                                   "beside the hand-off untraced")
    bench_parser.add_argument("--hypervisor", action="store_true",
                              help="a hypervisor's figures: boot, mixed workload, map storm, host memory")
    bench_parser.add_argument("--fuzz", action="store_true",
                              help="hhr fuzz: one worker's executions a second per target on a fixed seed")
    bench_parser.add_argument("--against", metavar="TREE", action="append", default=[],
                              help="--fuzz: another source tree (an earlier build) run beside this one, round by "
                                   "round (repeatable)")
    bench_parser.add_argument("--afl-seconds", type=float, default=0.0,
                              help="--fuzz: also run --engine afl (one afl-fuzz instance, one native worker) this long")
    bench_parser.add_argument("--hv", default="hv1", help="the hypervisor for --hypervisor (default hv1)")
    bench_parser.add_argument("--json", metavar="FILE",
                              help="also write every figure to FILE (restart scenarios: instead of DIR/"
                                   "restart_scenarios.json)")
    bench_parser.add_argument("--quick", action="store_true",
                              help="restart scenarios: every scenario and sweep at small sizes (about a minute)")
    bench_parser.add_argument("--output", metavar="DIR",
                              help="restart scenarios: where the JSON, Markdown table and plots go "
                                   "(default ./hhr-bench-results; the committed reference results are "
                                   "replaced only with --output bench/results)")
    bench_parser.set_defaults(func=bench)
    lab_parser = commands.add_parser("lab", help="the lab book: write a hypervisor, then hot-restart it "
                                                 "(docs/labs/); list, start, run, hint, grade")
    lab_cli.add_arguments(lab_parser)
    lab_parser.set_defaults(func=lab_cli.run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "gdb", None):
        from tools.gdb import control

        try:
            return control.serve_while(args.gdb, lambda: args.func(args))
        except (ValueError, OSError) as error:
            print(f"hhr {args.command}: --gdb: {error}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
