"""The trace file (docs/tracing.md, "The trace file"): recorded once, rendered again in any format and with any filter without running the machine, the same as a direct trace; byte-identical from run to run; the C line renderer writes exactly what the writers write; registers loaded while a context did not run are shown where they happen; a damaged file gets a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import cli
from tools.trace import lines, render, session, tracefile
from tools.trace.filters import Filters

SMALL = ["--guest", "hashchain", "--guest", "timer", "--at", "300000", "--lps", "2", "-q"]
COMMIT_WINDOW = ["--from-event", "restart-phase:commit"]


def hhr_trace(*arguments: str) -> int:
    return cli.main(["trace", *SMALL, *COMMIT_WINDOW, *arguments])


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recording") / "commit.hhrt"
    assert hhr_trace("--format", "hhrt", "-o", str(path)) == 0
    return path


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_the_same_recording_twice_is_byte_identical(tmp_path, recording):
    again = tmp_path / "again.hhrt"
    assert hhr_trace("--format", "hhrt", "-o", str(again)) == 0
    assert read(again) == read(recording)
    assert read(recording).startswith(tracefile.MAGIC)


@pytest.mark.parametrize("format, filters", [
    ("text", []), ("jsonl", []), ("text", ["--lp", "1", "--phase", "devirtualize"]),
    ("jsonl", ["--context", "hv2@root", "--symbol", "takeover_entry"]), ("chrome", []),
])
def test_rendering_the_file_gives_what_a_direct_trace_gives(tmp_path, recording, format, filters):
    direct, rendered = tmp_path / f"direct.{format}", tmp_path / f"rendered.{format}"
    assert hhr_trace("--format", format, "-o", str(direct), *filters) == 0
    assert cli.main(["trace", "-q", "--input", str(recording), "--format", format, "-o", str(rendered), *filters]) == 0
    assert read(rendered) == read(direct)
    assert len(read(rendered)) > 1000


def test_tenet_rendered_from_the_file_gives_the_direct_files(tmp_path, recording):
    direct, rendered = tmp_path / "direct", tmp_path / "rendered"
    assert hhr_trace("--format", "tenet", "-o", str(direct)) == 0
    # Tenet's memory reads are recorded only when Tenet is asked for at recording time.
    tenet_recording = tmp_path / "tenet.hhrt"
    assert hhr_trace("--format", "hhrt", "-o", str(tenet_recording), "--record-reads") == 0
    assert cli.main(["trace", "-q", "--input", str(tenet_recording), "--format", "tenet", "-o", str(rendered)]) == 0
    files = sorted(path.name for path in direct.iterdir())
    assert files and files == sorted(path.name for path in rendered.iterdir())
    for name in files:
        assert (rendered / name).read_text() == (direct / name).read_text(), name


@pytest.mark.parametrize("format", ["text", "jsonl"])
@pytest.mark.parametrize("filters", [Filters(), Filters(lps=frozenset({0}), phases=frozenset({"resumed", "devirtualize"}))])
def test_the_c_line_loop_writes_what_the_writers_write(tmp_path, monkeypatch, recording, format, filters):
    fast = tmp_path / f"fast.{format}"
    render.render(str(recording), format, str(fast), filters)
    monkeypatch.setattr(lines, "render", lambda renderer, reader: renderer._render(reader.records()))
    slow = tmp_path / f"slow.{format}"
    render.render(str(recording), format, str(slow), filters)
    assert read(fast) == read(slow)


def test_registers_a_vm_entry_loads_are_shown_before_the_guests_first_instruction(tmp_path, recording):
    output = tmp_path / "commit.jsonl"
    assert cli.main(["trace", "-q", "--input", str(recording), "--format", "jsonl", "-o", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    entries = [index for index, record in enumerate(records)
               if record["type"] == "event" and record["kind"] == "vm-entry"]
    assert entries
    checked = 0
    for index in entries:
        entry = records[index]
        following = next((record for record in records[index + 1:] if record["type"] in ("insn", "load")
                          and record["lp"] == entry["lp"]), None)
        if following is None or following["type"] != "load":
            continue
        assert following["ctx"] == entry["data"]["who"]
        assert following["t"] >= entry["t"] - 1
        if "rip" in following["regs"]:
            assert following["regs"]["rip"] == entry["data"]["rip"]
        checked += 1
    assert checked > 0


def test_a_damaged_or_foreign_file_gets_a_clear_error(tmp_path, recording, capsys):
    cut = tmp_path / "cut.hhrt"
    cut.write_bytes(read(recording)[:len(read(recording)) // 2])
    foreign = tmp_path / "foreign.hhrt"
    foreign.write_bytes(b"not a trace at all")
    for path in (cut, foreign, tmp_path / "missing.hhrt"):
        assert cli.main(["trace", "-q", "--input", str(path), "-o", str(tmp_path / "out.txt")]) == 2
        error = capsys.readouterr().err
        assert error.startswith("hhr trace: ") and "Traceback" not in error and str(path) in error


def test_reading_only_the_registers_an_instruction_may_write_loses_nothing(tmp_path):
    """Within a run the recorder reads only what an instruction may write (capstone, and the SDM for
    the branches and string instructions that end a block): the whole hand-off of the small machine
    gives the same file as reading every register every time."""
    partial, whole = tmp_path / "partial.hhrt", tmp_path / "whole.hhrt"
    for path, read_all in ((partial, False), (whole, True)):
        options = session.TraceOptions(guests=["hashchain", "timer"], request_at=[300000], format="hhrt",
                                       output=str(path), read_all_registers=read_all)
        assert session.trace(options).recorded > 1_000_000
    assert read(partial) == read(whole)


def test_a_file_from_another_build_of_a_hypervisor_is_refused(tmp_path, recording, capsys):
    data = bytearray(read(recording))
    key = b'"image_digest":"'
    at = data.index(key) + len(key)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    other = tmp_path / "other-build.hhrt"
    other.write_bytes(bytes(data))
    assert cli.main(["trace", "-q", "--input", str(other), "-o", str(tmp_path / "out.txt")]) == 2
    assert "another build" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["text", "jsonl", "chrome", "tenet", "parquet"])
def test_every_format_rendered_twice_gives_the_same_bytes(tmp_path, recording, format):
    if format == "parquet":
        pytest.importorskip("pyarrow")
    outputs = []
    for run in ("first", "second"):
        output = tmp_path / f"{run}.{format}"
        assert cli.main(["trace", "-q", "--input", str(recording), "--format", format, "-o", str(output)]) == 0
        files = sorted(output.iterdir()) if output.is_dir() else [output]
        outputs.append([(path.name if output.is_dir() else "", path.read_bytes()) for path in files])
    assert outputs[0] == outputs[1]
    assert outputs[0] and all(data for _, data in outputs[0])


def test_recording_arguments_that_make_no_sense_get_a_clear_error(tmp_path, recording, capsys):
    for arguments in (["--format", "hhrt"],                                          # no file to keep
                      ["--format", "hhrt", "-o", str(tmp_path / "f.hhrt"), "--lp", "1"],   # filters: when rendering
                      ["--input", str(recording), "--format", "hhrt", "-o", str(tmp_path / "g.hhrt")]):
        assert cli.main(["trace", "-q", *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith("hhr trace: ") and "Traceback" not in error
    assert not (tmp_path / "f.hhrt").exists()


def test_the_file_is_the_same_with_the_c_transition_loop_or_without(tmp_path, monkeypatch):
    """The loop carries out most VM exits and entries while a trace records (handing back at each):
    its trapped instructions, events and loads land in the file as Python's path puts them."""
    with_loop, without_loop = tmp_path / "loop.hhrt", tmp_path / "python.hhrt"
    options = dict(guests=["hashchain", "timer"], request_at=[300000], format="hhrt")
    assert session.trace(session.TraceOptions(output=str(with_loop), **options)).recorded > 1_000_000
    boot = session.boot_options

    def boot_without_loop(trace_options):
        booted = boot(trace_options)
        booted.machine.fast_transitions = False
        return booted

    monkeypatch.setattr(session, "boot_options", boot_without_loop)
    session.trace(session.TraceOptions(output=str(without_loop), **options))
    assert read(with_loop) == read(without_loop)
