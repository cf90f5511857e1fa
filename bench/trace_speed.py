"""How fast `hhr trace` records the demo's hand-off and renders each format, beside the same hand-off untraced, in one run (docs/tracing.md, "Speed")."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from hypervisors import transfer
from tools import restart as restart_module
from tools.trace import render, session
from tools.trace.session import TraceOptions

RENDERED_FORMATS = ("text", "jsonl", "chrome", "tenet")
TARGETS = {"record_rate": 2_000_000, "record_slowdown": 5.0, "render_rate": 500_000, "record_seconds": 10.0}


def untraced_handoff(options: TraceOptions) -> tuple[float, int]:
    """Host time of the demo's hot restart, from its request until it has settled, with no trace,
    and the instructions the machine retired meanwhile."""
    booted = session.boot_options(options)
    machine = booted.machine
    machine.run(max_instructions=options.request_at[0])
    recorder = restart_module.RestartRecorder(booted, options.to_hypervisor, None, check_memory=False)
    recorder.follow(machine.events)
    started, first = time.perf_counter(), machine.retired
    try:
        restart_module.stage(booted, options.to_hypervisor, None, transfer.Mode.PRECOPY)
        limit = machine.retired + restart_module.RESTART_BUDGET
        while not recorder.settled and machine.retired < limit and not session.final_stop(machine):
            machine.run(max_instructions=min(limit, machine.retired + session.TRACE_STEP))
    finally:
        recorder.leave(machine.events)
    return time.perf_counter() - started, machine.retired - first


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(child.stat().st_size for child in path.iterdir())
    return path.stat().st_size


def measure(folder: Path) -> dict:
    options = TraceOptions(format=session.RECORDING_FORMAT, output=str(folder / "handoff.hhrt"))
    untraced, untraced_instructions = untraced_handoff(TraceOptions())
    recorded = session.trace(options)
    figures = {
        "instructions": recorded.recorded,
        "untraced_seconds": untraced,
        "untraced_instructions": untraced_instructions,
        "record_seconds": recorded.host_seconds,
        "record_rate": recorded.recorded / recorded.host_seconds,
        "record_slowdown": recorded.host_seconds / untraced,
        "trace_file_bytes": recorded.trace_file_bytes,
        "render": {},
    }
    for format in RENDERED_FORMATS:
        output = folder / (f"handoff-{format}" + ("" if format == "tenet" else f".{format}"))
        result = render.render(options.output, format, str(output))
        figures["render"][format] = {"seconds": result.host_seconds,
                                     "rate": result.instructions_read / result.host_seconds,
                                     "bytes": _size(output)}
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    return figures


def table(figures: dict) -> str:
    count = figures["instructions"]
    lines = [f"Demo hand-off: {count:,} instructions (doorbell to each LP's first guest instruction).", "",
             "| step | host seconds | instructions/s | bytes | target |", "|---|---|---|---|---|",
             f"| untraced hand-off (request to settled, {figures['untraced_instructions']:,} instructions) | "
             f"{figures['untraced_seconds']:.2f} | {figures['untraced_instructions'] / figures['untraced_seconds']:,.0f} "
             "| | |",
             f"| record (trace file) | {figures['record_seconds']:.2f} | {figures['record_rate']:,.0f} | "
             f"{figures['trace_file_bytes']:,} | >= {TARGETS['record_rate']:,}/s, < {TARGETS['record_seconds']:.0f} s, "
             f"<= {TARGETS['record_slowdown']:.0f}x untraced (here {figures['record_slowdown']:.1f}x) |"]
    for format, step in figures["render"].items():
        target = f">= {TARGETS['render_rate']:,}/s" if format in render.LINE_FORMATS else ""
        lines.append(f"| render {format} | {step['seconds']:.2f} | {step['rate']:,.0f} | {step['bytes']:,} | {target} |")
    return "\n".join(lines)


def main(json_path: str | None = None) -> int:
    folder = Path(tempfile.mkdtemp(prefix="hhr-trace-bench-"))
    try:
        figures = measure(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
