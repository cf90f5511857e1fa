"""`hhr fuzz --output` as an AFL++ sync peer (docs/fuzzing.md): queue entries any peer can run, any
bytes decoded into edits, two hosts synced by AFL++'s recipe, coverage over every worker and
`--report`."""
from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from hypervisors import transfer
from tools import cli
from tools.fuzz import campaign, coverage, executor, sync
from tools.fuzz.decoding import EDIT_WIDTH_MAX, RAW_TARGET, decode_any, runnable
from tools.fuzz.inputs import Edit, FuzzInput

SMALL_GUESTS = ("storm,mem=8M", "counter,mem=4M")
QUEUE_NAME = re.compile(r"^id:\d{6},op:hhr-(messages|state|vmcs)$")
RUNS = 60                       # inputs each simulated host runs before the sync
RANDOM_FILES = 200               # random byte strings decoded


@pytest.fixture(scope="module")
def machine() -> executor.TransferMachine:
    """One recorded restart with small guests, shared by the simulated hosts (one at a time); the
    guests are not run to their end (what is synced does not depend on that oracle)."""
    return executor.TransferMachine(executor.Setup(guests=SMALL_GUESTS), check_guests=False)


def host_options(machine, out: Path, host: str, seed: int, runs: int = RUNS) -> campaign.Options:
    return campaign.Options(machine.setup, "messages", findings=out / "findings", runs=runs, seed=seed,
                            quiet=True, output=out, host=host)


def sync_script(source_out: Path, host: str, destination_out: Path) -> None:
    """What the sync script of docs/fuzzing.md does for one pair of hosts, without ssh: the source
    host's own instances' queue directories packed, and unpacked in the destination's sync
    directory, keeping the files it has."""
    packed = subprocess.run(["sh", "-c", f"ls -d hhr-{host}-*/queue {host}_*/queue 2>/dev/null | tar -czf - -T -"],
                            cwd=source_out, capture_output=True, check=True).stdout
    subprocess.run(["tar", "--skip-old-files", "-xzf", "-"], cwd=destination_out, input=packed, check=True)


# --- decoding any bytes -------------------------------------------------------------------------------------
def test_any_bytes_decode_into_bounded_edits_without_an_exception():
    rng = random.Random(5)
    own = FuzzInput("messages", 3, (Edit("set", 12, 4, 7, field="header.record_count"),
                                    Edit("insert", 40, data=b"\1\2")), fix_digest=True)
    assert decode_any(own.encode()) == own                         # hhr's own encoding, unchanged
    for _ in range(RANDOM_FILES):
        data = rng.randbytes(rng.randrange(0, 300))
        entry = decode_any(data)
        assert entry.target == RAW_TARGET and entry.message != 0
        assert all(0 <= edit.width <= EDIT_WIDTH_MAX for edit in entry.edits)
    # A byte-level fuzzer's mutation of an entry: what still parses is kept.
    text = own.encode().replace(b'"op": "set"', b'"op": "s\xffet"')
    salvaged = decode_any(text)
    assert (salvaged.target, salvaged.message, salvaged.fix_digest) == ("messages", 3, True)
    assert [edit.op for edit in salvaged.edits] == ["insert"]
    # Well-formed JSON with hostile values: held to bounds, or read another way, never raised.
    hostile = [{"format": 1, "target": "messages", "message": 2, "edits": [{"op": "set", "offset": 0, "width": -3}]},
               {"format": 1, "target": "messages", "message": 2, "edits": [{"op": "set", "width": 9}]},
               {"format": 1, "target": "state", "message": 1, "edits": [{"op": "delete", "offset": 0, "width": 10**12}]},
               {"format": 1, "target": "vmcs", "message": "x"}, [1, 2], {"format": 1}]
    for document in hostile:
        entry = decode_any(json.dumps(document).encode())
        assert all(0 <= edit.width <= EDIT_WIDTH_MAX for edit in entry.edits)


def test_raw_bytes_read_as_header_and_edit_chunks():
    data = bytes([0xFF, 0b11]) + bytes([1, 0x10, 0, 3]) + (0xAB).to_bytes(8, "little") + b"tail"
    entry = decode_any(data)
    assert (entry.target, entry.message, entry.fix_digest, entry.fix_length) == ("messages", -1, True, True)
    assert entry.edits == (Edit("xor", 0x10, 4, 0xAB, field="raw"),)


def test_a_message_out_of_range_is_taken_modulo_the_messages():
    assert runnable(FuzzInput("messages", 7), 5).message == 2
    assert runnable(FuzzInput("messages", -6), 5).message in range(1, 6)
    assert runnable(FuzzInput("messages", -1), 5).message == -1
    assert runnable(FuzzInput("state", 40), 5).message == 40          # (struck before any message)


# --- union coverage -----------------------------------------------------------------------------------------
def test_the_campaign_figures_are_the_union_over_workers():
    left, right = bytearray(8), bytearray(8)
    left[0:3] = b"\x05\x01\x02"
    right[2:5] = b"\x09\x09\x09"
    one = campaign.Stats(edges=3, corpus=2, edge_map=bytes(left), corpus_names=frozenset({"a", "b"}))
    two = campaign.Stats(edges=3, corpus=2, edge_map=bytes(right), corpus_names=frozenset({"b", "c"}))
    assert campaign.union_edges([one, two]) == 5 and campaign.union_corpus([one, two]) == 3
    assert "edges 5  corpus 3" in campaign.status_line([one, two], 2)
    assert coverage.union_map([bytes(left), bytes(right)]) == bytes([1, 1, 1, 1, 1, 0, 0, 0])


# --- two hosts, one corpus ----------------------------------------------------------------------------------
def test_two_hosts_synced_by_the_afl_recipe_import_each_others_entries(machine, tmp_path):
    alpha_out, beta_out = tmp_path / "alpha", tmp_path / "beta"
    campaign.Worker(host_options(machine, alpha_out, "alpha", seed=1), 0, machine).fuzz()
    campaign.Worker(host_options(machine, beta_out, "beta", seed=2), 0, machine).fuzz()
    alpha_queue = sorted((alpha_out / "hhr-alpha-0" / "queue").iterdir())
    assert alpha_queue and all(QUEUE_NAME.match(path.name) for path in alpha_queue)
    for path in alpha_queue:
        FuzzInput.decode(path.read_bytes())                      # hhr's own encoding: any peer runs it as is

    for here_out, here, there_out, there in ((beta_out, "beta", alpha_out, "alpha"),
                                             (alpha_out, "alpha", beta_out, "beta")):
        worker = campaign.Worker(host_options(machine, here_out, here, seed=3, runs=0), 0, machine)
        own = worker.sync()                                     # a resumed instance: its own queue again
        assert len(own) == len(list((here_out / f"hhr-{here}-0" / "queue").iterdir()))
        edges, corpus = worker.edges(), len(worker.corpus.entries)
        sync_script(there_out, there, here_out)
        theirs = worker.sync()
        peer_queue = list((there_out / f"hhr-{there}-0" / "queue").iterdir())
        assert worker.corpus.imported == {f"hhr-{there}-0": len(peer_queue)}
        assert len(theirs) > 0 and len(worker.corpus.entries) == corpus + len(theirs)
        assert worker.edges() > edges                            # their entries reach code this host's did not
        synced = (here_out / f"hhr-{here}-0" / ".synced" / f"hhr-{there}-0").read_bytes()
        assert int.from_bytes(synced, "little") == len(peer_queue)      # AFL++'s next id to look at
        sync_script(there_out, there, here_out)                  # the script's next round: nothing new
        assert worker.sync() == []                               # imported once
        stats = worker.fuzz()                                    # runs 0: what it imported stays in its figures
        assert stats.imported == len(peer_queue) and stats.corpus == len(worker.corpus.entries)


def test_a_seed_gives_the_same_queue_names_included(machine, tmp_path):
    def queue_after(out: Path) -> dict[str, bytes]:
        campaign.Worker(host_options(machine, out, "same", seed=9, runs=30), 0, machine).fuzz()
        return {path.name: path.read_bytes() for path in (out / "hhr-same-0" / "queue").iterdir()}

    first = queue_after(tmp_path / "one")
    assert first and first == queue_after(tmp_path / "two")
    assert sorted(first) == [name for name in sorted(first) if QUEUE_NAME.match(name)]
    assert [sync.queue_id(name) for name in sorted(first)] == list(range(len(first)))


def test_an_afl_instances_raw_entries_are_imported_and_run(machine, tmp_path):
    out = tmp_path / "out"
    afl_queue = out / "afl-main" / "queue"
    afl_queue.mkdir(parents=True)
    rng = random.Random(11)
    seed = FuzzInput("messages", 2, (Edit("set", 12, 4, 0),), fix_digest=True).encode()
    (afl_queue / "id:000000,time:0,execs:0,orig:seed").write_bytes(seed)
    (afl_queue / "id:000001,src:000000,time:10,execs:40,op:havoc,rep:4").write_bytes(seed[:20] + rng.randbytes(30))
    (afl_queue / "id:000002,src:000000,time:11,execs:41,op:flip1,pos:3,+cov").write_bytes(rng.randbytes(120))
    (afl_queue / "id:000003,src:000000,time:12,execs:42,op:havoc,rep:2").write_bytes(b"")
    (afl_queue / ".state").mkdir()                               # AFL++'s own bookkeeping: not entries
    (afl_queue / "README.txt").write_bytes(b"not an entry")
    worker = campaign.Worker(host_options(machine, out, "gamma", seed=4, runs=0), 0, machine)
    imported = worker.sync()
    assert worker.corpus.imported == {"afl-main": 4} and len(imported) == 4
    assert worker.stats.executions == 4 and "exception" not in worker.stats.outcomes
    assert (out / "hhr-gamma-0" / ".synced" / "afl-main").read_bytes() == (4).to_bytes(4, "little")
    raw = afl_queue / "id:000002,src:000000,time:11,execs:41,op:flip1,pos:3,+cov"
    result, kind, _ = campaign.replay(raw, machine.setup, machine)      # a peer's raw entry replays as it was run
    assert kind is None and result.outcome != "exception"


# --- the command line: several workers, --report -----------------------------------------------------------
def test_two_workers_count_their_union_and_report_block_by_block(tmp_path, capsys):
    guests = [argument for spec in SMALL_GUESTS for argument in ("--guest", spec)]
    out = tmp_path / "out"
    code = cli.main(["fuzz", "--runs", "10", "--target", "messages", "--workers", "2", "--output", str(out),
                     "--host", "here", "--findings", str(tmp_path / "f"), "--seed", "1", *guests])
    summary = capsys.readouterr().out
    assert code == 0
    distinct = {path.read_bytes() for path in out.glob("hhr-here-*/queue/id:*")}
    assert sorted(path.name for path in out.iterdir()) == ["hhr-here-0", "hhr-here-1"]
    assert f"corpus {len(distinct)}," in summary
    entered = int(re.search(r"\((\d+) of the \d+ basic blocks of its service.inc", summary).group(1))

    assert cli.main(["fuzz", "--report", str(out)]) == 0
    report = capsys.readouterr().out
    sections = re.findall(r"^(\S+\.inc) \(hv2\): (\d+) of (\d+) basic blocks entered$", report, re.MULTILINE)
    assert [name for name, _, _ in sections[:2]] == ["service.inc", "guest_state.inc"]
    assert {"vp_state.inc", "memory.inc", "restart.inc"} <= {name for name, _, _ in sections}
    service = dict((name, (int(done), int(total))) for name, done, total in sections)["service.inc"]
    assert service[0] == entered
    block_lines = [line for line in report.split("service.inc (hv2):")[1].split("never entered")[0].splitlines()
                   if line.startswith(("  +", "  -"))]
    assert len(block_lines) == service[1]
    assert sum(line.startswith("  +") for line in block_lines) == entered
    never = report.split("service.inc (hv2):")[1].split("never entered")[1].split("guest_state.inc (hv2)")[0]
    assert "service_entry  service.inc" in never                  # the service partition's boot: before the checkpoint
    assert cli.main(["fuzz", "--report", str(tmp_path / "f")]) == 2


def test_a_transfer_area_sized_edit_stays_cheap():
    entry = decode_any(json.dumps({"format": 1, "target": "messages", "message": 1, "edits": [
        {"op": "insert", "offset": 0, "data": "00" * (transfer.TRANSFER_AREA_SIZE + 5)}]}).encode())
    assert len(entry.edits[0].data) == transfer.TRANSFER_AREA_SIZE
