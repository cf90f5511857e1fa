"""The Parquet trace (docs/tracing.md, "Parquet, and questions in one line"): a directory of two tables, instructions and events, written with pyarrow in row groups for SQL engines such as DuckDB."""
from __future__ import annotations

import json
from pathlib import Path

from tools.trace.annotate import TracedEvent, TracedInstruction
from tools.trace.jsonl import event_record

SCHEMA = "hhr-trace-parquet"
SCHEMA_VERSION = 1
INSTRUCTIONS_FILE = "instructions.parquet"
EVENTS_FILE = "events.parquet"
# Rows buffered before they are written as one row group: what bounds the writer's memory.
INSTRUCTION_ROWS_PER_GROUP = 1 << 17
EVENT_ROWS_PER_GROUP = 1 << 16
COMPRESSION = "zstd"
HEADER_KEY = "hhr_trace"                # both files' key-value metadata: the trace's header (JSON)
SUMMARY_KEY = "hhr_trace_summary"       # and its summary (JSON), added when the trace closes
INSTALL_HINT = "pip install 'hhr[parquet]' (or pip install pyarrow)"
# The repeated strings and bytes, dictionary-encoded (Parquet column paths; a list's items are `list.element`).
INSTRUCTION_DICTIONARY_COLUMNS = ("context", "phase", "symbol", "disassembly", "bytes",
                                  "registers.list.element.name")
EVENT_DICTIONARY_COLUMNS = ("kind", "phase", "reason_name", "call_name", "who", "phase_name")
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


def instruction_schema(pa):
    return pa.schema([
        ("position", pa.int64()),           # the record's place in the trace, instructions and events together
        ("time", pa.int64()),
        ("lp", pa.int32()),
        ("context", pa.string()),
        ("phase", pa.string()),
        ("address", pa.uint64()),
        ("symbol", pa.string()),
        ("disassembly", pa.string()),
        ("bytes", pa.binary()),
        ("registers", pa.list_(pa.struct([("name", pa.string()), ("value", pa.uint64())]))),
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


class _Table:
    """One Parquet file: rows gathered column by column, written as a row group every `rows_per_group`.
    `columns` holds the plain columns; a subclass builds the others (`nested_array`)."""

    def __init__(self, pa, pq, path: Path, schema, dictionary_columns: tuple[str, ...], rows_per_group: int):
        self.pa = pa
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.writer = pq.ParquetWriter(str(path), schema, compression=COMPRESSION,
                                       use_dictionary=list(dictionary_columns),
                                       column_encoding={name: DELTA_ENCODING for name in DELTA_COLUMNS
                                                        if name in schema.names})
        self.columns: dict[str, list] = {field.name: [] for field in schema
                                         if not pa.types.is_list(field.type)}
        self.rows = 0

    def row_written(self) -> None:
        self.rows += 1
        if self.rows >= self.rows_per_group:
            self.flush()

    def nested_array(self, name: str):
        raise NotImplementedError(name)

    def clear(self) -> None:
        for values in self.columns.values():
            values.clear()
        self.rows = 0

    def flush(self) -> None:
        if self.rows:
            arrays = [self.pa.array(self.columns[field.name], field.type) if field.name in self.columns
                      else self.nested_array(field.name) for field in self.schema]
            self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=self.rows)
        self.clear()

    def close(self, metadata: dict[str, str]) -> None:
        self.flush()
        self.writer.add_key_value_metadata(metadata)
        self.writer.close()


class _InstructionTable(_Table):
    """The two list columns, registers and memory, are gathered flat (each row's end offset and the
    items) and assembled when a row group is written."""

    def __init__(self, *arguments):
        super().__init__(*arguments)
        self.register_ends, self.register_names, self.register_values = [0], [], []
        self.memory_ends, self.memory_addresses, self.memory_data = [0], [], []

    def nested_array(self, name: str):
        pa = self.pa
        if name == "registers":
            ends, items = self.register_ends, [pa.array(self.register_names, pa.string()),
                                               pa.array(self.register_values, pa.uint64())]
        else:
            ends, items = self.memory_ends, [pa.array(self.memory_addresses, pa.uint64()),
                                             pa.array(self.memory_data, pa.binary())]
        item_type = self.schema.field(name).type.value_type
        return pa.ListArray.from_arrays(pa.array(ends, pa.int32()),
                                        pa.StructArray.from_arrays(items, fields=list(item_type)))

    def clear(self) -> None:
        super().clear()
        for values in (self.register_ends, self.register_names, self.register_values,
                       self.memory_ends, self.memory_addresses, self.memory_data):
            values.clear()
        self.register_ends.append(0)
        self.memory_ends.append(0)


class ParquetWriter:
    """Writes `instructions.parquet` and `events.parquet` into the directory `directory`, the header
    in both files' metadata when they open and the summary when they close. Nothing is kept but
    the rows of the row group being gathered."""

    def __init__(self, directory: str | Path, header: dict):
        pa, pq = pyarrow_modules()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = [self.directory / INSTRUCTIONS_FILE, self.directory / EVENTS_FILE]
        described = {HEADER_KEY: json.dumps({**header, "schema": SCHEMA, "version": SCHEMA_VERSION},
                                            separators=(",", ":"))}
        self.instructions = _InstructionTable(pa, pq, self.paths[0], instruction_schema(pa).with_metadata(described),
                                              INSTRUCTION_DICTIONARY_COLUMNS, INSTRUCTION_ROWS_PER_GROUP)
        self.events = _Table(pa, pq, self.paths[1], event_schema(pa).with_metadata(described),
                             EVENT_DICTIONARY_COLUMNS, EVENT_ROWS_PER_GROUP)
        self.position = 0

    def instruction(self, line: TracedInstruction) -> None:
        table = self.instructions
        columns = table.columns
        columns["position"].append(self.position)
        columns["time"].append(line.time)
        columns["lp"].append(line.lp)
        columns["context"].append(line.context.name)
        columns["phase"].append(line.phase)
        columns["address"].append(line.address)
        columns["symbol"].append(line.symbol)
        columns["disassembly"].append(line.text)
        columns["bytes"].append(line.code)
        for name, value in line.changes:
            table.register_names.append(name)
            table.register_values.append(value)
        table.register_ends.append(len(table.register_names))
        for address, data in line.writes:
            table.memory_addresses.append(address)
            table.memory_data.append(data)
        table.memory_ends.append(len(table.memory_addresses))
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

    def close(self, _summary: list[str], figures: dict) -> None:
        summary = {SUMMARY_KEY: json.dumps(figures, separators=(",", ":"))}
        self.instructions.close(summary)
        self.events.close(summary)
