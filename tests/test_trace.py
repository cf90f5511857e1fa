"""`hhr trace` (docs/tracing.md): byte-identical traces, the hand-off's phases and per-LP CR3 switch,
VMXOFF and VMXON, symbols in both hypervisors, Tenet's line rules and memory entries, filters that select exactly what
they say, and a run that tracing does not change."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools import cli
from tools import restart as restart_module
from tools.trace import session as trace_session
from tools.trace.filters import Filters
from tools.trace.tenet import LINE_PATTERN, TENET_REGISTERS
from tools.trace.window import Window

# A small machine: two LPs, two guests, the restart early. Its hand-off is the demo's in miniature.
SMALL = ["--guest", "hashchain", "--guest", "timer", "--at", "300000", "--lps", "2", "-q"]
COMMIT_WINDOW = ["--from-event", "restart-phase:commit"]     # commit to the first guest instruction: ~23,000
PHASES_IN_ORDER = ["requested", "service", "invariants", "precopy", "blackout", "commit", "devirtualize", "resumed"]
HANDOFF_EVENTS = ["cr3-write", "vmxoff", "vmxon"]
TENET_ENTRY = re.compile(r"(r[a-z0-9]{1,2})=0x([0-9a-f]+)")
TENET_MEMORY = re.compile(r"(mrw|mr|mw)=(0x[0-9a-f]+):([0-9a-f]+)")


def hhr_trace(tmp_path, name: str, *arguments: str) -> str:
    """Runs `hhr trace` on the small machine; the path of what it wrote."""
    output = tmp_path / name
    assert cli.main(["trace", *SMALL, "-o", str(output), *arguments]) == 0
    return str(output)


def records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def commit_trace(tmp_path_factory) -> list[dict]:
    """The JSON Lines trace of the commit window, unfiltered: the reference the filters are held to."""
    return records(hhr_trace(tmp_path_factory.mktemp("trace"), "commit.jsonl", *COMMIT_WINDOW, "--format", "jsonl"))


def body(trace: list[dict]) -> list[dict]:
    return [record for record in trace if record["type"] in ("insn", "event")]


def test_the_same_command_twice_gives_byte_identical_traces(tmp_path):
    first = hhr_trace(tmp_path, "first.txt", *COMMIT_WINDOW)
    second = hhr_trace(tmp_path, "second.txt", *COMMIT_WINDOW)
    with open(first, "rb") as one, open(second, "rb") as two:
        text = one.read()
        assert text == two.read()
    assert text.count(b"\n") > 20_000


def test_a_restart_shows_its_phases_in_order_and_every_lp_switches_cr3_leaves_and_enters_vmx(tmp_path):
    trace = records(hhr_trace(tmp_path, "events.jsonl", "--events-only", "--format", "jsonl"))
    assert trace[0]["type"] == "header" and trace[0]["version"] == 1 and trace[-1]["type"] == "summary"
    events = [record for record in trace if record["type"] == "event"]
    assert events[0]["kind"] == "doorbell"
    phases = [event["data"]["phase_name"] for event in events if event["kind"] == "restart-phase"]
    assert phases == PHASES_IN_ORDER
    devirtualize = next(event["seq"] for event in events if event.get("data", {}).get("phase_name") == "devirtualize")
    for lp in (0, 1):
        handoff = [event for event in events if event["lp"] == lp and event["seq"] > devirtualize
                   and event["kind"] in HANDOFF_EVENTS]
        assert [event["kind"] for event in handoff] == HANDOFF_EVENTS, lp
        cr3, vmxoff, vmxon = handoff
        assert cr3["t"] <= vmxoff["t"] <= vmxon["t"]
        assert vmxon["data"]["ok"] is True
        last = [event for event in events if event["lp"] == lp][-1]    # each LP's window ends on its own
        assert last["kind"] == "hlt" or (last["kind"] == "vm-entry" and last["data"]["who"].startswith("p")), last
    assert not any(record["type"] == "insn" for record in trace)
    calls = trace[-1]["inverse_calls_by_number"]
    assert calls["1 invariants"] == calls["3 verify"] == calls["4 commit"] == 1 and calls["2 state"] >= 1
    assert calls == {name: sum(1 for event in events if event["kind"] == "vmcallr"
                               and f"{event['data']['call']} {event['data']['call_name']}" == name) for name in calls}


def test_symbols_resolve_inside_both_hypervisors(commit_trace):
    instructions = [record for record in commit_trace if record["type"] == "insn"]
    by_context: dict[str, set[str]] = {}
    for record in instructions:
        by_context.setdefault(record["ctx"], set()).add(record["sym"].split("+")[0] if record["sym"] else None)
    assert None not in by_context["hv1@root"] | by_context["hv2@root"] | by_context["hv2@service"]
    assert "hv1:devirtualize" in by_context["hv1@root"]          # the old image at its own load address
    assert "hv2:takeover_entry" in by_context["hv2@root"]        # the new one in the service region
    assert any(symbol.startswith("hv2:inverse_entry") for symbol in by_context["hv2@service"])
    assert all(symbol.startswith("hv1:") for symbol in by_context["hv1@root"])
    assert all(symbol.startswith("hv2:") for symbol in by_context["hv2@root"] | by_context["hv2@service"])
    header = commit_trace[0]
    new_image = next(image for image in header["images"] if image["role"] == "new")
    takeover = next(record for record in instructions if record["sym"] == "hv2:takeover_entry")
    assert new_image["load_address"] <= int(takeover["rip"], 16) < new_image["load_address"] + new_image["size"]
    assert new_image["load_address"] != new_image["assembled_at"]


def test_instructions_carry_the_registers_they_changed_and_the_memory_they_wrote(commit_trace):
    instructions = [record for record in commit_trace if record["type"] == "insn"]
    cr3_switch = [record for record in instructions if record["asm"].startswith("mov cr3")]
    assert {record["lp"] for record in cr3_switch} == {0, 1}
    assert all("cr3" in record["regs"] for record in cr3_switch)
    pushes = [record for record in instructions if record["asm"].startswith("push")]
    assert pushes and all(len(record["mem"]) == 1 and len(record["mem"][0][1]) == 16 for record in pushes)
    vmxoff = [record for record in instructions if record["asm"] == "vmxoff"]
    assert {record["lp"] for record in vmxoff} == {0, 1}


def tenet_files(directory: str) -> dict[str, list[str]]:
    return {path.name: path.read_text(encoding="ascii").splitlines() for path in sorted(Path(directory).iterdir())}


def test_tenet_files_follow_the_format_line_by_line(tmp_path, commit_trace):
    directory = hhr_trace(tmp_path, "tenet", *COMMIT_WINDOW, "--format", "tenet")
    files = tenet_files(directory)
    assert {"hv2-root.lp0.log", "hv2-root.lp1.log", "hv1-root.lp0.log"} <= set(files)
    expected: dict[str, list[dict]] = {}
    for record in commit_trace:
        if record["type"] == "insn":
            expected.setdefault(f"{record['ctx'].replace('@', '-')}.lp{record['lp']}.log", []).append(record)
    assert sorted(expected) == sorted(files)
    pops = pushes = 0
    for name, text in files.items():
        instructions = expected[name]
        assert len(text) == len(instructions) + 1, name      # a line per instruction, one for the last's effects
        state: dict[str, int] = {}
        rips = []
        for number, line in enumerate(text):
            assert LINE_PATTERN.match(line), (name, number, line)
            registers = dict(TENET_ENTRY.findall(line.split(",m")[0]))
            assert set(registers) <= set(TENET_REGISTERS) | {"rip"}
            assert line.split(",m")[0].split(",")[-1].startswith("rip=")     # RIP last of the registers
            if number == 0:
                assert set(registers) == set(TENET_REGISTERS) | {"rip"}       # the full state first
            before = dict(state)
            state.update({register: int(value, 16) for register, value in registers.items()})
            rips.append(state["rip"])
            if number == 0:
                continue
            previous = instructions[number - 1]                    # the memory on a line is its predecessor's
            memory = TENET_MEMORY.findall(line)
            assert [(address, data) for kind, address, data in memory if kind == "mw"] == \
                [(address, data) for address, data in previous["mem"] if data], (name, number, line)
            operands = previous["asm"].split()
            if operands[0] == "pop" and len(operands) == 2 and operands[1] in TENET_REGISTERS:
                popped = state[operands[1]].to_bytes(8, "little").hex()
                assert ("mr", f"{before['rsp']:#x}", popped) in memory, (name, number, line)
                pops += 1
            if operands[0] == "push" and len(operands) == 2 and operands[1] in TENET_REGISTERS:
                pushed = before[operands[1]].to_bytes(8, "little").hex()
                assert memory == [("mw", f"{state['rsp']:#x}", pushed)], (name, number, line)
                pushes += 1
        assert rips[:-1] == [int(record["rip"], 16) for record in instructions]
    assert pops >= 50 and pushes >= 50
    again = tenet_files(hhr_trace(tmp_path, "again", *COMMIT_WINDOW, "--format", "tenet"))
    assert again == files


@pytest.mark.parametrize("arguments, keep_instruction, keep_event", [
    (["--lp", "1"], lambda r: r["lp"] == 1, lambda r: r["lp"] == 1),
    (["--context", "hv2@root"], lambda r: r["ctx"] == "hv2@root", lambda r: True),
    (["--phase", "devirtualize"], lambda r: r["phase"] == "devirtualize", lambda r: r["phase"] == "devirtualize"),
    (["--symbol", "devirtualize"], lambda r: (r["sym"] or "").split(":")[1].split("+")[0].split(".")[0]
     == "devirtualize", lambda r: True),
    ("middle third", lambda r, middle: middle[0] <= r["t"] < middle[1],
     lambda r, middle: middle[0] <= r["t"] < middle[1]),
    (["--events-only"], lambda r: False, lambda r: True),
], ids=["lp", "context", "phase", "symbol", "range", "events-only"])
def test_each_filter_selects_exactly_what_it_says(tmp_path, commit_trace, arguments, keep_instruction, keep_event):
    if arguments == "middle third":      # a range of virtual time inside the window, wherever the run put it
        times = sorted(record["t"] for record in body(commit_trace))
        middle = times[len(times) // 3], times[2 * len(times) // 3]
        arguments = ["--range", f"{middle[0]}:{middle[1]}"]
        keep_instruction, keep_event = ((lambda r, keep=keep: keep(r, middle)) for keep in (keep_instruction, keep_event))
    filtered = records(hhr_trace(tmp_path, "filtered.jsonl", *COMMIT_WINDOW, "--format", "jsonl", *arguments))
    expected = [record for record in body(commit_trace)
                if (keep_instruction if record["type"] == "insn" else keep_event)(record)]
    assert body(filtered) == expected
    assert expected and len(expected) < len(body(commit_trace))
    counted = filtered[-1]
    assert counted["instructions"] == sum(1 for record in expected if record["type"] == "insn")


@pytest.mark.parametrize("window, filters", [
    (Window(start_event="restart-phase:devirtualize"), Filters()),    # hooks in and out mid-restart
    (Window(), Filters(events_only=True)),                              # the whole hand-off, C loop off
], ids=["instructions", "events"])
def test_tracing_changes_nothing_the_guests_see(tmp_path, window, filters):
    guests, limit = ["hashchain", "timer"], 30_000_000
    plain = restart_module.restart("hv1", "hv2", guests, lps=2, request_at=[300_000], max_instructions=limit)
    options = trace_session.TraceOptions(
        guests=guests, lps=2, request_at=[300_000], max_instructions=limit, format="jsonl",
        output=str(tmp_path / "trace.jsonl"), to_end=True, window=window, filters=filters)
    traced = trace_session.trace(options)
    assert traced.recorded > 10_000 or filters.events_only
    assert traced.summary.as_dict()["events"] > 20
    document = traced.document
    assert document["virtual_time"] == plain["virtual_time"]
    assert document["instructions"] == plain["instructions"]
    assert [(g["name"], g["console"], g["exit_code"]) for g in document["guests"]] == \
        [(g["name"], g["console"], g["exit_code"]) for g in plain["guests"]]
    assert document["restarts"][0]["outcome"] == "committed"
    assert [(phase["phase"], phase["virtual_ticks"]) for phase in document["restarts"][0]["phases"]] == \
        [(phase["phase"], phase["virtual_ticks"]) for phase in plain["restarts"][0]["phases"]]


def test_each_lp_devirtualizes_under_the_devirtualize_phase_on_the_demo(tmp_path):
    """The demo (`hhr trace` defaults): LP 1's clock is behind LP 0's, yet `--phase devirtualize
    --lp 1` shows LP 1's devirtualization (MOV to CR3, VMXOFF, the jump) and the new hypervisor's
    take-over on LP 1, up to its first VM entry
    (the commit window holds the whole of DEVIRTUALIZE; it only makes the run shorter)."""
    output = tmp_path / "devirtualize.jsonl"
    assert cli.main(["trace", "-q", *COMMIT_WINDOW, "--phase", "devirtualize", "--lp", "1", "--format", "jsonl",
                     "-o", str(output)]) == 0
    trace = body(records(str(output)))
    assert trace and all(record["lp"] == 1 and record["phase"] == "devirtualize" for record in trace)
    instructions = [record for record in trace if record["type"] == "insn"]
    assert [record["asm"].split()[0] for record in instructions[:3]] == ["mov", "vmxoff", "jmp"]
    assert instructions[0]["asm"].startswith("mov cr3") and instructions[0]["sym"].startswith("hv1:devirtualize")
    assert [record["kind"] for record in trace if record["type"] == "event"][:3] == HANDOFF_EVENTS
    takeover = [record for record in instructions if record["ctx"] == "hv2@root"]
    assert takeover and takeover[0]["sym"] == "hv2:takeover_entry"
    assert len(takeover) == len(instructions) - 3          # MOV to CR3, VMXOFF, the jump, then the new hypervisor's
    assert not any(record["asm"].startswith("vmlaunch") for record in instructions), "the entry begins RESUMED"


def test_bad_arguments_get_a_clear_error(capsys):
    assert cli.main(["trace", "--window", "9:3", "-q"]) == 2
    assert "START:END" in capsys.readouterr().err
    assert cli.main(["trace", "--format", "tenet", "--events-only", "-q", *SMALL]) == 2
    assert "--output" in capsys.readouterr().err
    assert cli.main(["trace", "--phase", "takeover", "-q"]) == 2
    assert "one of idle, requested" in capsys.readouterr().err


def test_the_chrome_format_draws_the_phases_of_the_window(tmp_path):
    with open(hhr_trace(tmp_path, "phases.json", "--format", "chrome"), encoding="utf-8") as file:
        document = json.load(file)
    phases = [event["name"] for event in document["traceEvents"] if event.get("cat") == "phase"]
    assert phases == [phase.upper() for phase in PHASES_IN_ORDER]
    assert document["metadata"]["hhr_trace"]["window"] == {"from_event": "doorbell", "to": "first-guest-instruction"}


def test_the_summary_counts_instructions_by_routine_as_the_trace_shows_them(commit_trace):
    from tools.trace.summary import routine

    summary = commit_trace[-1]
    assert summary["type"] == "summary"
    expected: dict[str, int] = {}
    for record in commit_trace:
        if record["type"] == "insn":
            expected[routine(record["sym"])] = expected.get(routine(record["sym"]), 0) + 1
    by_routine = summary["instructions_by_routine"]
    assert by_routine == expected and sum(by_routine.values()) == summary["instructions"]
    assert list(by_routine.values()) == sorted(by_routine.values(), reverse=True)
    assert "hv2:takeover_entry" in by_routine and "hv1:devirtualize" in by_routine
