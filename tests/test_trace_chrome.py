"""The Chrome Trace Event JSON of a hot restart (tools/trace_chrome.py): valid, every track named, the
phases in protocol order inside the restart, exits and inverse hypercalls as named instants, each
VP's blackout as the gap on its track, and the same run giving the same bytes."""
from __future__ import annotations

import io
import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from emu.events import Event
from emu.vmx_defs import ExitReason
from guests import catalog
from hypervisors import boot, transfer
from tools import restart as restart_module
from tools.cli import DEFAULT_AT, RESTART_DEMO_GUESTS
from tools.restart import RestartRecorder
from tools.trace_chrome import (PARTITION_PID_BASE, RESTART_PID, TICKS_PER_MICROSECOND, UNKNOWN_VMCS_PID,
                                ChromeTraceWriter,
                                booted_vmcs_describer, microseconds)

DEMO_LPS = 2
FROM_HYPERVISOR, TO_HYPERVISOR = "hv1", "hv2"
AFTER_RESTART = 200_000                 # instructions the new hypervisor runs guests before the trace ends


def handoff_trace(path_or_stream, *, request_at: int = DEFAULT_AT) -> RestartRecorder:
    """The demo restart of `hhr restart` (hv1 to hv2, its guests on two LPs), traced from boot to a
    little after the new hypervisor has resumed every guest; returns the restart's recorder."""
    booted = boot.boot([catalog.parse(spec) for spec in RESTART_DEMO_GUESTS], hypervisor=FROM_HYPERVISOR, lps=DEMO_LPS)
    writer = ChromeTraceWriter(path_or_stream, lps=DEMO_LPS, metadata={"from": FROM_HYPERVISOR, "to": TO_HYPERVISOR},
                               hypervisors=(FROM_HYPERVISOR, TO_HYPERVISOR),
                               describe_vmcs=booted_vmcs_describer(booted))
    booted.machine.events.subscribe(writer.on_event)
    booted.machine.run(max_instructions=request_at)
    recorder = restart_module.request(booted, TO_HYPERVISOR)
    booted.machine.run(max_instructions=booted.machine.retired + AFTER_RESTART)
    writer.close()
    return recorder


def ticks(value) -> int:
    """A trace time stamp (microseconds) back to ticks, exactly."""
    return int(Decimal(str(value)) * TICKS_PER_MICROSECOND)


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> tuple[Path, dict, RestartRecorder]:
    path = tmp_path_factory.mktemp("trace") / "handoff.json"
    recorder = handoff_trace(str(path))
    assert recorder.finished and recorder.marks[-1].phase == transfer.Phase.RESUMED, "the restart did not commit"
    return path, json.loads(path.read_text(), parse_float=Decimal), recorder


def thread_names(trace: dict) -> dict[tuple[int, int], str]:
    return {(event["pid"], event["tid"]): event["args"]["name"] for event in trace["traceEvents"]
            if event["ph"] == "M" and event["name"] == "thread_name"}


def on_thread(trace: dict, process_name: str, name: str) -> list[dict]:
    """The events of the thread `name` of the process `process_name`, by time."""
    pids = {event["pid"] for event in trace["traceEvents"]
            if event["ph"] == "M" and event["name"] == "process_name" and event["args"]["name"] == process_name}
    keys = {key for key, thread in thread_names(trace).items() if thread == name and key[0] in pids}
    assert keys, f"no thread {name!r} in {process_name!r}"
    events = [event for event in trace["traceEvents"] if event["ph"] != "M" and (event["pid"], event["tid"]) in keys]
    return sorted(events, key=lambda event: (event["ts"], -event.get("dur", 0)))


def test_the_trace_is_one_json_object_of_events_with_its_clock_and_metadata(traced):
    path, trace, _ = traced
    assert set(trace) == {"traceEvents", "displayTimeUnit", "metadata"}
    assert trace["displayTimeUnit"] == "ns"
    assert trace["metadata"]["lps"] == DEMO_LPS and trace["metadata"]["to"] == TO_HYPERVISOR
    assert trace["metadata"]["ticks_per_microsecond"] == TICKS_PER_MICROSECOND
    assert {event["ph"] for event in trace["traceEvents"]} == {"M", "X", "i"}
    assert all(event["dur"] >= 0 for event in trace["traceEvents"] if event["ph"] == "X")


def test_every_process_and_thread_is_named(traced):
    _, trace, _ = traced
    processes = {event["pid"] for event in trace["traceEvents"]
                 if event["ph"] == "M" and event["name"] == "process_name"}
    threads = thread_names(trace)
    used = {(event["pid"], event["tid"]) for event in trace["traceEvents"] if event["ph"] != "M"}
    assert used and used <= set(threads), sorted(used - set(threads))
    assert {pid for pid, _ in used} <= processes
    assert len(set(threads)) == len({tid for _, tid in threads}), "a thread id is used in two processes"


def test_the_phases_are_slices_in_protocol_order_inside_the_restart(traced):
    _, trace, recorder = traced
    events = on_thread(trace, "hot restart protocol", "phases")
    restart, phases = events[0], events[1:]
    assert restart["ph"] == "X" and restart["name"] == "hot restart 1"
    slices = [event for event in phases if event["ph"] == "X"]
    # Every phase the machine published (the recorder reads the same event stream), in order; RESUMED ends it.
    assert [event["name"] for event in slices] + ["RESUMED"] == [mark.phase.name for mark in recorder.marks]
    assert [ticks(event["ts"]) for event in slices] == [mark.virtual_time for mark in recorder.marks[:-1]]
    assert all(event["dur"] > 0 for event in slices)
    for event, following in zip(slices, slices[1:]):
        assert event["ts"] + event["dur"] == following["ts"], "phases must follow each other without a gap"
    assert slices[0]["ts"] == restart["ts"] and slices[-1]["ts"] + slices[-1]["dur"] == restart["ts"] + restart["dur"]
    resumed = phases[-1]
    assert resumed["ph"] == "i" and resumed["name"] == "RESUMED" and resumed["ts"] == restart["ts"] + restart["dur"]


def test_every_thread_holds_slices_that_nest_or_follow_each_other(traced):
    _, trace, _ = traced
    by_thread = defaultdict(list)
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            by_thread[(event["pid"], event["tid"])].append(event)
    for key, slices in by_thread.items():
        open_ends: list[Decimal] = []
        for event in sorted(slices, key=lambda event: (event["ts"], -event["dur"])):
            while open_ends and open_ends[-1] <= event["ts"]:
                open_ends.pop()
            end = event["ts"] + event["dur"]
            assert not open_ends or end <= open_ends[-1], f"{event['name']} overlaps its neighbour on {key}"
            open_ends.append(end)


def test_exits_and_inverse_hypercalls_are_named_instants(traced):
    _, trace, recorder = traced
    instants = [event for event in trace["traceEvents"] if event["ph"] == "i"]
    exits = [event for event in instants if event["cat"] == "exit"]
    assert {"IO_INSTRUCTION", "VMCALL", "PREEMPTION_TIMER"} <= {event["name"] for event in exits}
    assert {event["name"] for event in exits} <= {reason.name for reason in ExitReason}
    assert all(event["args"]["qualification"].startswith("0x") for event in exits)
    calls = [event for event in instants if event["name"].startswith("VMCALLR ")]
    assert len(calls) == recorder.inverse_calls
    assert {event["name"] for event in calls} == {f"VMCALLR {call.name}" for call in transfer.Call
                                                  if call not in transfer.DRAIN_CALLS}     # a pre-copy's
    replies = [event for event in instants if event["name"] == "VMCALL reply ACCEPT"]
    assert len(replies) == recorder.inverse_calls, "every inverse call of a committed restart is accepted"
    for name in ("doorbell", "VMXON", "VMXOFF", "MOV to CR3"):
        assert any(event["name"] == name for event in instants), name
    served = on_thread(trace, "hot restart protocol", "inverse hypercalls")
    assert [event["name"] for event in served] == [event["name"] for event in calls]
    assert all(event["args"]["outcome"] == "reply ACCEPT" for event in served)


def test_each_vp_is_a_track_whose_gap_is_its_blackout(traced):
    _, trace, recorder = traced
    measured = [vp for vp in recorder.vp_blackouts() if vp["blackout_ticks"] is not None]
    assert measured
    names = {event["pid"]: event["args"]["name"] for event in trace["traceEvents"]
             if event["ph"] == "M" and event["name"] == "process_name"}
    shifts = [0, *trace["metadata"].get("lp_shifts", {}).values()]
    for vp in measured:
        process = names[PARTITION_PID_BASE + vp["partition"]]
        runs = [event for event in on_thread(trace, process, f"VP {vp['vp']}") if event["ph"] == "X"]
        ends = [ticks(event["ts"] + event["dur"]) for event in runs]
        starts = [ticks(event["ts"]) for event in runs]
        # An LP that waited for the commit is drawn later by its shift from its devirtualization on.
        first_entry = next(vp["first_entry"] + shift for shift in shifts if vp["first_entry"] + shift in starts)
        assert vp["last_exit"] in ends
        gap = [event for event in runs if vp["last_exit"] < ticks(event["ts"] + event["dur"])
               and ticks(event["ts"]) < first_entry]
        assert not gap, f"{process} VP {vp['vp']} runs inside its blackout"
        before, after = runs[ends.index(vp["last_exit"])], runs[starts.index(first_entry)]
        assert before["args"]["vmcs"] != after["args"]["vmcs"], "the new hypervisor runs the VP on a VMCS of its own"


def test_each_lp_root_shows_the_old_hypervisor_then_the_new_from_its_vmxoff(traced):
    _, trace, _ = traced
    for lp in range(DEMO_LPS):
        events = on_thread(trace, f"LP {lp}", "root")
        hypervisors = [event for event in events if event["ph"] == "X"]
        assert [event["name"] for event in hypervisors] == [f"old hypervisor {FROM_HYPERVISOR}",
                                                             f"new hypervisor {TO_HYPERVISOR}"]
        vmxoff = [event for event in events if event["name"] == "VMXOFF"]
        assert len(vmxoff) == 1 and hypervisors[1]["ts"] == vmxoff[0]["ts"]
        assert hypervisors[0]["ts"] + hypervisors[0]["dur"] == hypervisors[1]["ts"]
        guest_mode = [event for event in on_thread(trace, f"LP {lp}", "guest mode") if event["ph"] == "X"]
        assert guest_mode and all(event["cat"] == "guest" for event in guest_mode)


def test_no_lp_devirtualizes_before_the_commit_is_drawn(traced):
    """LP 1's clock is behind LP 0's at the hand-off: its track is drawn later from its first step
    of devirtualization on, so every LP's MOV to CR3 and VMXOFF come after the COMMIT slice."""
    _, trace, _ = traced
    commit = [event for event in trace["traceEvents"] if event.get("cat") == "phase" and event["name"] == "COMMIT"]
    assert len(commit) == 1
    commit_end = ticks(commit[0]["ts"]) + ticks(commit[0]["dur"])
    for lp in range(DEMO_LPS):
        root = on_thread(trace, f"LP {lp}", "root")
        vmxoff = [event for event in root if event["name"] == "VMXOFF"]
        cr3 = [event for event in root if event["name"] == "MOV to CR3" and ticks(event["ts"]) >= commit_end]
        assert len(vmxoff) == 1 and ticks(vmxoff[0]["ts"]) >= commit_end, lp
        assert cr3 and ticks(cr3[-1]["ts"]) <= ticks(vmxoff[0]["ts"])
    shifts = trace["metadata"]["lp_shifts"]
    assert set(shifts) == {"1"} and shifts["1"] > 0, "LP 1's own clock had its VMXOFF before the commit"


def test_each_lp_has_a_phase_track_and_lp_1_devirtualizes_after_the_commit_begins(traced):
    """Phases per LP (docs/tracing.md): each LP's `phase` thread has a slice per phase it was in, one
    after the other. LP 0 is in every phase it announces; LP 1 stays in BLACKOUT while LP 0 commits
    and enters DEVIRTUALIZE at its own MOV to CR3, drawn with its shift, after the COMMIT began."""
    _, trace, recorder = traced
    tracks = {}
    for lp in range(DEMO_LPS):
        slices = [event for event in on_thread(trace, f"LP {lp}", "phase") if event["ph"] == "X"]
        assert slices and all(event["cat"] == "lp-phase" for event in slices), lp
        for event, following in zip(slices, slices[1:]):
            assert event["ts"] + event["dur"] == following["ts"] and event["name"] != following["name"], lp
        tracks[lp] = slices
    announced = [mark.phase.name for mark in recorder.marks]
    lp0 = [event["name"] for event in tracks[0]]
    assert lp0[lp0.index(announced[0]):] == announced
    assert [ticks(event["ts"]) for event in tracks[0][lp0.index(announced[0]):]] == \
        [mark.virtual_time for mark in recorder.marks], "LP 0 enters each phase when it announces it"
    lp1 = [event["name"] for event in tracks[1]]
    assert "COMMIT" not in lp1 and lp1[-3:] == ["BLACKOUT", "DEVIRTUALIZE", "RESUMED"]
    commit = next(event for event in on_thread(trace, "hot restart protocol", "phases") if event["name"] == "COMMIT")
    devirtualize = tracks[1][-2]
    assert ticks(devirtualize["ts"]) > ticks(commit["ts"])
    cr3 = next(event for event in on_thread(trace, "LP 1", "root")
               if event["name"] == "MOV to CR3" and event["ts"] >= commit["ts"])
    assert devirtualize["ts"] == cr3["ts"], "LP 1 devirtualizes at its own MOV to CR3, as drawn"


def test_the_same_run_gives_the_same_file(traced):
    path, _, _ = traced
    again = io.StringIO()
    handoff_trace(again)
    assert again.getvalue() == path.read_text()


def test_time_stamps_are_exact_microseconds():
    assert [microseconds(value) for value in (0, 5, 999, 1000, 5_316_366)] == ["0.000", "0.005", "0.999", "1.000",
                                                                                "5316.366"]


def synthetic(events: list[tuple[int, int, str, dict]]) -> dict:
    """A trace of hand-made events (time, LP, kind, data), without a machine or a VMCS describer."""
    stream = io.StringIO()
    writer = ChromeTraceWriter(stream, lps=1)
    for seq, (time, lp, kind, data) in enumerate(events):
        writer.on_event(Event(seq, time, lp, kind, data))
    writer.close()
    return json.loads(stream.getvalue())


def test_an_aborted_restart_ends_at_idle_and_what_is_open_ends_with_the_trace():
    trace = synthetic([
        (10, 0, "restart-phase", {"phase": transfer.Phase.REQUESTED}),
        (20, 0, "vm-entry", {"vmcs": 0x5000, "launch": True, "rip": 0x1000}),
        (25, 0, "vm-exit", {"vmcs": 0x5000, "reason": 0x8000_0000 | ExitReason.EPT_VIOLATION,
                            "qualification": 0x181, "rip": 0x1004}),
        (30, 0, "restart-phase", {"phase": transfer.Phase.ABORTED}),
        (40, 0, "restart-phase", {"phase": transfer.Phase.IDLE}),
        (50, 0, "vm-entry", {"vmcs": 0x5000, "launch": False, "rip": 0x1004}),
        (70, 0, "hlt", {"rip": 0x2000}),
    ])
    slices = {event["name"]: event for event in trace["traceEvents"] if event["ph"] == "X"}
    assert ticks(slices["ABORTED"]["ts"]) == 30 and ticks(slices["ABORTED"]["dur"]) == 10
    assert ticks(slices["hot restart 1"]["dur"]) == 30
    exit_instant = next(event for event in trace["traceEvents"] if event.get("cat") == "exit")
    assert exit_instant["name"] == "EPT_VIOLATION" and exit_instant["args"]["qualification"] == "0x181"
    runs = [event for event in trace["traceEvents"] if event["ph"] == "X" and event["pid"] == UNKNOWN_VMCS_PID]
    assert [event["name"] for event in runs] == ["VMCS 0x5000"] * 2
    assert [event["args"].get("open_at_end", False) for event in runs] == [False, True]
    assert ticks(runs[-1]["ts"] + runs[-1]["dur"]) == 70, "a run still open ends at the last time seen"
    assert thread_names(trace)[(runs[-1]["pid"], runs[-1]["tid"])] == "VMCS 0x5000"
    assert RESTART_PID in {event["pid"] for event in trace["traceEvents"] if event["name"] == "process_name"}
