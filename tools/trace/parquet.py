"""The Parquet trace (docs/tracing.md, "Parquet, and questions in one line"): a directory of tables (instructions, events, registers loaded), written with pyarrow in row groups for SQL engines such as DuckDB."""
from __future__ import annotations

import json
from pathlib import Path

from tools.trace.annotate import TracedEvent, TracedInstruction, TracedLoad
from tools.trace.jsonl import event_record

SCHEMA = "hhr-trace-parquet"
SCHEMA_VERSION = 1
INSTRUCTIONS_FILE = "instructions.parquet"
EVENTS_FILE = "events.parquet"
LOADS_FILE = "loads.parquet"
# Rows buffered before they are written as one row group: what bounds the writer's memory.
INSTRUCTION_ROWS_PER_GROUP = 1 << 17
EVENT_ROWS_PER_GROUP = 1 << 16         # events and loads
COMPRESSION = "zstd"
HEADER_KEY = "hhr_trace"                # every file's key-value metadata: the trace's header (JSON)
SUMMARY_KEY = "hhr_trace_summary"       # and its summary (JSON), added when the trace closes
INSTALL_HINT = "pip install 'hhr[parquet]' (or pip install pyarrow)"
# The repeated strings and bytes, dictionary-encoded (Parquet column paths; a list's items are `list.element`).
INSTRUCTION_DICTIONARY_COLUMNS = ("context", "phase", "symbol", "disassembly", "bytes",
                                  "registers.list.element.name")
EVENT_DICTIONARY_COLUMNS = ("kind", "phase", "reason_name", "call_name", "who", "phase_name")
LOAD_DICTIONARY_COLUMNS = ("context", "phase", "registers.list.element.name")
# Columns that mostly grow by small steps: stored as deltas (Parquet's DELTA_BINARY_PACKED).
DELTA_COLUMNS = ("position", "seq", "time")
DELTA_ENCODING = "DELTA_BINARY_PACKED"


class ParquetUnavailable(ValueError):
    """pyarrow is not installed."""


def pyarrow_modules():
    """pyarrow and pyarrow.parquet, or ParquetUnavailable saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ParquetUnavailable(f"--format parquet needs pyarrow, which is not installed: {INSTALL_HINT}") from None
    return pyarrow, pyarrow.parquet


def _registers_type(pa):
    return pa.list_(pa.struct([("name", pa.string()), ("value", pa.uint64())]))


def instruction_schema(pa):
    return pa.schema([
        ("position", pa.int64()),           # the record's place in the trace, all three tables together
        ("time", pa.int64()),
        ("lp", pa.int32()),
        ("context", pa.string()),
        ("phase", pa.string()),
        ("address", pa.uint64()),
        ("symbol", pa.string()),
        ("disassembly", pa.string()),
        ("bytes", pa.binary()),
        ("registers", _registers_type(pa)),
        ("memory", pa.list_(pa.struct([("address", pa.uint64()), ("data", pa.binary())]))),
    ])


def event_schema(pa):
    return pa.schema([
        ("position", pa.int64()),
        ("seq", pa.int64()),
        ("time", pa.int64()),
        ("lp", pa.int32()),
        ("kind", pa.string()),
        ("phase", pa.string()),
        ("vmcs", pa.uint64()),
        ("who", pa.string()),
        ("reason_name", pa.string()),
        ("call", pa.uint64()),
        ("call_name", pa.string()),
        ("result", pa.uint64()),
        ("phase_name", pa.string()),
        ("data", pa.string()),
    ])


def load_schema(pa):
    return pa.schema([
        ("position", pa.int64()),
        ("time", pa.int64()),
        ("lp", pa.int32()),
        ("context", pa.string()),
        ("phase", pa.string()),
        ("registers", _registers_type(pa)),
    ])


class _ListColumn:
    """A list-of-struct column gathered flat: each row's end offset, and the items' fields."""

    def __init__(self, list_type):
        self.item_fields = list(list_type.value_type)
        self.ends = [0]
        self.fields: list[list] = [[] for _ in self.item_fields]

    def add(self, items: list[tuple]) -> None:
        if items:
            for values, column in zip(self.fields, zip(*items)):
                values.extend(column)
        self.ends.append(self.ends[-1] + len(items))

    def array(self, pa):
        items = [pa.array(values, field.type) for values, field in zip(self.fields, self.item_fields)]
        return pa.ListArray.from_arrays(pa.array(self.ends, pa.int32()),
                                        pa.StructArray.from_arrays(items, fields=self.item_fields))

    def clear(self) -> None:
        self.ends[1:] = []
        for values in self.fields:
            values.clear()


class _Table:
    """One Parquet file: rows gathered column by column (`columns`, `lists`), written as a row group
    every `rows_per_group`."""

    def __init__(self, pa, pq, path: Path, schema, dictionary_columns: tuple[str, ...], rows_per_group: int):
        self.pa = pa
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(str(path), schema, compression=COMPRESSION,
                                       use_dictionary=list(dictionary_columns),
                                       column_encoding={name: DELTA_ENCODING for name in DELTA_COLUMNS
                                                        if name in schema.names})
        self.columns: dict[str, list] = {field.name: [] for field in schema if not pa.types.is_list(field.type)}
        self.lists = {field.name: _ListColumn(field.type) for field in schema if pa.types.is_list(field.type)}
        self.rows = 0

    def row_written(self) -> None:
        self.rows += 1
        if self.rows >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            arrays = [self.pa.array(self.columns[field.name], field.type) if field.name in self.columns
                      else self.lists[field.name].array(self.pa) for field in self.schema]
            self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=self.rows)
        for values in self.columns.values():
            values.clear()
        for column in self.lists.values():
            column.clear()
        self.rows = 0

    def close(self, metadata: dict[str, str]) -> None:
        self.flush()
        self.writer.add_key_value_metadata(metadata)
        self.writer.close()


class ParquetWriter:
    """Writes `instructions.parquet`, `events.parquet` and `loads.parquet` into the directory
    `directory`, the header in every file's metadata when they open and the summary when they
    close. Nothing is kept but the rows of the row groups being gathered."""

    def __init__(self, directory: str | Path, header: dict):
        pa, pq = pyarrow_modules()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = [self.directory / name for name in (INSTRUCTIONS_FILE, EVENTS_FILE, LOADS_FILE)]
        described = {HEADER_KEY: json.dumps({**header, "schema": SCHEMA, "version": SCHEMA_VERSION},
                                            separators=(",", ":"))}
        self.instructions, self.events, self.loads = (
            _Table(pa, pq, path, schema.with_metadata(described), dictionary_columns, rows_per_group)
            for path, schema, dictionary_columns, rows_per_group in zip(
                self.paths, (instruction_schema(pa), event_schema(pa), load_schema(pa)),
                (INSTRUCTION_DICTIONARY_COLUMNS, EVENT_DICTIONARY_COLUMNS, LOAD_DICTIONARY_COLUMNS),
                (INSTRUCTION_ROWS_PER_GROUP, EVENT_ROWS_PER_GROUP, EVENT_ROWS_PER_GROUP)))
        self.position = 0

    def _place(self, table: _Table, line) -> dict:
        """The columns an instruction and a load share: where in the trace, when, which LP and
        context, which phase. Returns the table's columns for the rest."""
        columns = table.columns
        columns["position"].append(self.position)
        columns["time"].append(line.time)
        columns["lp"].append(line.lp)
        columns["context"].append(line.context.name)
        columns["phase"].append(line.phase)
        return columns

    def instruction(self, line: TracedInstruction) -> None:
        table = self.instructions
        columns = self._place(table, line)
        columns["address"].append(line.address)
        columns["symbol"].append(line.symbol)
        columns["disassembly"].append(line.text)
        columns["bytes"].append(line.code)
        table.lists["registers"].add(line.changes)
        table.lists["memory"].add(line.writes)
        self.position += 1
        table.row_written()

    def event(self, line: TracedEvent) -> None:
        data = line.data
        columns = self.events.columns
        columns["position"].append(self.position)
        columns["seq"].append(line.seq)
        columns["time"].append(line.time)
        columns["lp"].append(line.lp)
        columns["kind"].append(line.kind)
        columns["phase"].append(line.phase)
        columns["vmcs"].append(data.get("vmcs"))
        columns["who"].append(data.get("who"))
        columns["reason_name"].append(data.get("reason_name"))
        columns["call"].append(data.get("call"))
        columns["call_name"].append(data.get("call_name"))
        columns["result"].append(data.get("result"))
        columns["phase_name"].append(data.get("phase_name"))
        columns["data"].append(json.dumps(event_record(line)["data"], separators=(",", ":"), ensure_ascii=True))
        self.position += 1
        self.events.row_written()

    def load(self, line: TracedLoad) -> None:
        table = self.loads
        self._place(table, line)
        table.lists["registers"].add(line.changes)
        self.position += 1
        table.row_written()

    def close(self, _summary: list[str], figures: dict) -> None:
        summary = {SUMMARY_KEY: json.dumps(figures, separators=(",", ":"))}
        for table in (self.instructions, self.events, self.loads):
            table.close(summary)
