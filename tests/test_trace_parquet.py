"""`hhr trace --format parquet` (docs/tracing.md, "Parquet, and questions in one line"): every row of the three tables holds what the JSON Lines trace of the same window says, the three documented DuckDB queries (read from the doc) answer as that trace does, row groups and dictionaries as documented, the same bytes from run to run, and without pyarrow a one-line message."""
from __future__ import annotations

import collections
import json
import math
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY_ROOT
from tests.test_trace import SMALL, hhr_trace
from tools import cli
from tools.trace import parquet as parquet_trace
from tools.trace.summary import routine

duckdb = pytest.importorskip("duckdb")
pq = pytest.importorskip("pyarrow.parquet")

# From the INVARIANTS call to LP 0's DEVIRTUALIZE: every inverse call, the blackout, the commit; ~250,000 instructions.
WINDOW = ["--from-event", "restart-phase:invariants", "--to-event", "restart-phase:devirtualize"]
DOC = REPOSITORY_ROOT / "docs" / "tracing.md"
SECTION = "## Parquet, and questions in one line\n"
ROUTINES_SHOWN = 10                     # the documented routine query's LIMIT
CALLS = {"invariants", "state", "verify", "commit"}
FILES = (parquet_trace.INSTRUCTIONS_FILE, parquet_trace.EVENTS_FILE, parquet_trace.LOADS_FILE)


def documented_queries() -> list[str]:
    """The SQL blocks of the doc's Parquet section, in order."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```sql\n(.*?)```", text[start:end if end >= 0 else len(text)], re.S)


def ask(directory: Path, query: str) -> list[dict]:
    """The query's rows as dicts, over views `instructions` and `events` as the doc makes them."""
    db = duckdb.connect()
    db.sql(f"create view instructions as from '{directory / parquet_trace.INSTRUCTIONS_FILE}'")
    db.sql(f"create view events as from '{directory / parquet_trace.EVENTS_FILE}'")
    result = db.sql(query)
    return [dict(zip(result.columns, row)) for row in result.fetchall()]


class JsonLines:
    """What the tests need of the JSON Lines trace, read as a stream: the events, and the
    instructions counted by phase and routine."""

    def __init__(self, path: str):
        self.path = path
        self.events: list[dict] = []
        self.by_phase_and_routine: collections.Counter[tuple[str, str]] = collections.Counter()
        self.summary: dict = {}
        for record in self.records():
            if record["type"] == "event":
                self.events.append(record)
            elif record["type"] == "insn":
                self.by_phase_and_routine[(record["phase"], routine(record["sym"]))] += 1
            elif record["type"] == "summary":
                self.summary = record

    def records(self):
        with open(self.path, encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> tuple[Path, JsonLines]:
    folder = tmp_path_factory.mktemp("parquet")
    directory = Path(hhr_trace(folder, "window", *WINDOW, "--format", "parquet"))
    return directory, JsonLines(hhr_trace(folder, "window.jsonl", *WINDOW, "--format", "jsonl"))


def test_the_doc_asks_three_questions():
    queries = documented_queries()
    assert len(queries) == 3 and all(query.strip().upper().startswith(("SELECT", "WITH")) for query in queries)


def test_instructions_per_routine_in_the_blackout_as_the_json_lines_trace_counts_them(traces):
    directory, jsonl = traces
    blackout = {name: count for (phase, name), count in jsonl.by_phase_and_routine.items() if phase == "blackout"}
    assert len(blackout) > ROUTINES_SHOWN
    busiest = sorted(blackout.items(), key=lambda item: (-item[1], item[0]))[:ROUTINES_SHOWN]
    answer = ask(directory, documented_queries()[0])
    assert [(row["routine"], row["instructions"]) for row in answer] == busiest


def test_every_vmcallr_with_its_reply_as_in_the_json_lines_trace(traces):
    directory, jsonl = traces
    events = jsonl.events
    expected = []
    for index, event in enumerate(events):
        if event["kind"] == "vmcallr":
            reply = next((later for later in events[index + 1:] if later["kind"] == "vmcallr-return"
                          and later["data"]["vmcs"] == event["data"]["vmcs"]), None)
            expected.append({"seq": event["seq"], "time": event["t"], "lp": event["lp"], "call": event["data"]["call"],
                             "call_name": event["data"]["call_name"],
                             "reply": reply["data"]["result"] if reply else None,
                             "reply_time": reply["t"] if reply else None})
    assert {row["call_name"] for row in expected} == CALLS and all(row["reply"] == 0 for row in expected)
    assert ask(directory, documented_queries()[1]) == expected


def test_the_last_vm_exit_of_each_vp_before_the_commit_as_in_the_json_lines_trace(traces):
    directory, jsonl = traces
    commit = min(event["seq"] for event in jsonl.events
                 if event["kind"] == "restart-phase" and event["data"]["phase_name"] == "commit")
    last: dict[str, dict] = {}
    for event in jsonl.events:
        if event["kind"] == "vm-exit" and event["seq"] < commit:
            last[event["data"]["who"]] = {"who": event["data"]["who"], "lp": event["lp"], "time": event["t"],
                                          "reason_name": event["data"]["reason_name"], "seq": event["seq"]}
    assert last
    assert ask(directory, documented_queries()[2]) == [last[who] for who in sorted(last)]


def instruction_row(position: int, record: dict) -> dict:
    """An instruction record of the JSON Lines trace as a row of instructions.parquet."""
    return {"position": position, "time": record["t"], "lp": record["lp"], "context": record["ctx"],
            "phase": record["phase"], "address": int(record["rip"], 16), "symbol": record["sym"],
            "disassembly": record["asm"], "bytes": bytes.fromhex(record["bytes"]),
            "registers": [{"name": name, "value": int(value, 16)} for name, value in record["regs"].items()],
            "memory": [{"address": int(address, 16), "data": bytes.fromhex(data)} for address, data in record["mem"]]}


def event_row(position: int, record: dict) -> dict:
    """An event record of the JSON Lines trace as a row of events.parquet."""
    data = record["data"]
    return {"position": position, "seq": record["seq"], "time": record["t"], "lp": record["lp"], "kind": record["kind"],
            "phase": record["phase"], "vmcs": int(data["vmcs"], 16) if data.get("vmcs") is not None else None,
            "who": data.get("who"), "reason_name": data.get("reason_name"), "call": data.get("call"),
            "call_name": data.get("call_name"), "result": data.get("result"), "phase_name": data.get("phase_name"),
            "data": data}


def load_row(position: int, record: dict) -> dict:
    """A load record of the JSON Lines trace as a row of loads.parquet."""
    return {"position": position, "time": record["t"], "lp": record["lp"], "context": record["ctx"],
            "phase": record["phase"],
            "registers": [{"name": name, "value": int(value, 16)} for name, value in record["regs"].items()]}


def parquet_rows(path: Path):
    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def test_every_row_holds_what_the_json_lines_trace_says(traces):
    directory, jsonl = traces
    instructions, events, loads = (parquet_rows(directory / name) for name in FILES)
    counted = collections.Counter()
    position = 0
    for record in jsonl.records():
        if record["type"] == "insn":
            assert next(instructions) == instruction_row(position, record), position
        elif record["type"] == "event":
            row = next(events)
            row["data"] = json.loads(row["data"])
            assert row == event_row(position, record), position
        elif record["type"] == "load":
            assert next(loads) == load_row(position, record), position
        else:
            continue
        counted[record["type"]] += 1
        position += 1
    assert next(instructions, None) is None and next(events, None) is None and next(loads, None) is None
    assert counted["insn"] == jsonl.summary["instructions"] > 200_000 and counted["event"] == jsonl.summary["events"]
    assert counted["load"] > 0


def test_the_files_carry_the_header_and_the_summary(traces):
    directory, jsonl = traces
    for name in FILES:
        metadata = pq.ParquetFile(directory / name).metadata.metadata
        header = json.loads(metadata[parquet_trace.HEADER_KEY.encode()])
        assert header["schema"] == parquet_trace.SCHEMA and header["version"] == parquet_trace.SCHEMA_VERSION
        assert header["window"] == {"from_event": "restart-phase:invariants", "to": "restart-phase:devirtualize"}
        summary = json.loads(metadata[parquet_trace.SUMMARY_KEY.encode()])
        assert summary == {key: value for key, value in jsonl.summary.items() if key != "type"}
        assert list(summary["instructions_by_routine"]) == list(jsonl.summary["instructions_by_routine"])


def test_row_groups_are_bounded_and_repeated_strings_dictionary_encoded(traces):
    directory, jsonl = traces
    metadata = pq.ParquetFile(directory / parquet_trace.INSTRUCTIONS_FILE).metadata
    assert metadata.num_rows == jsonl.summary["instructions"]
    assert metadata.num_row_groups == math.ceil(metadata.num_rows / parquet_trace.INSTRUCTION_ROWS_PER_GROUP) >= 2
    for group in range(metadata.num_row_groups):
        columns = {metadata.row_group(group).column(index).path_in_schema: metadata.row_group(group).column(index)
                   for index in range(metadata.num_columns)}
        for name in parquet_trace.INSTRUCTION_DICTIONARY_COLUMNS:
            assert columns[name].has_dictionary_page, name
        assert not columns["address"].has_dictionary_page
        for name in ("position", "time"):
            assert parquet_trace.DELTA_ENCODING in columns[name].encodings, name


def test_the_same_command_twice_gives_byte_identical_files(tmp_path, traces):
    directory, _ = traces
    again = Path(hhr_trace(tmp_path, "again", *WINDOW, "--format", "parquet"))
    for name in FILES:
        assert (again / name).read_bytes() == (directory / name).read_bytes(), name
    assert sorted(path.name for path in again.iterdir()) == sorted(path.name for path in directory.iterdir())


def test_without_pyarrow_the_command_says_in_one_line_how_to_install_it(tmp_path, monkeypatch, capsys):
    for module in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)      # `import pyarrow` raises ImportError
    output = tmp_path / "trace"
    assert cli.main(["trace", *SMALL, "--format", "parquet", "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "pyarrow" in error and parquet_trace.INSTALL_HINT in error
    assert not output.exists(), "nothing ran"


def test_the_parquet_format_needs_an_output_directory(tmp_path, capsys):
    assert cli.main(["trace", *SMALL, "--format", "parquet"]) == 2
    assert "--output" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert cli.main(["trace", *SMALL, "--format", "parquet", "-o", str(a_file)]) == 2
    assert "must be a directory" in capsys.readouterr().err
