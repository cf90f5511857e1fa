"""`hhr fuzz --engine afl` (docs/fuzzing.md): afl-fuzz drives hhr through its fork server, syncs with a
native worker in one output directory, and finds a receiver bug planted in a copied source tree."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest

from hypervisors import build
from tools.fuzz import afl_engine, afl_target, campaign, executor, sync
from tools.fuzz.decoding import decode_any, encode_raw
from tools.fuzz import fields
from tools.fuzz.inputs import Edit, FuzzInput

SMALL_GUESTS = ("storm,mem=8M", "counter,mem=4M")
AFL_SECONDS = 30
HOST = "testhost"
# The planted bug: the receiver's comparison of the sender's digest chain with its own at VERIFY
# (hypervisors/common/service.inc, receive_verify) no longer refuses, so a message changed in flight
# without its digest fixed is accepted: the `digest-accepted` oracle's finding.
DIGEST_CHECK = "    mov eax, REPLY_DIGEST\n    jne inverse_reply\n"
DIGEST_CHECK_REMOVED = "    mov eax, REPLY_DIGEST\n"

needs_afl = pytest.mark.skipif(not afl_engine.available(), reason="afl-fuzz is not installed (Debian's afl++ package)")


def test_raw_bytes_carry_an_input_back_as_the_same_edits():
    entry = FuzzInput("messages", -2, (Edit("set", 300, 8, 0x1122334455667788), Edit("xor", 7, 1, 0x40),
                                       Edit("insert", 12, data=b"\1\2\3"), Edit("delete", 65535, 2)), fix_digest=True)
    again = decode_any(encode_raw(entry))
    assert (again.target, again.message, again.fix_digest, again.fix_length) == ("messages", -2, True, False)
    assert [(e.op, e.offset, e.width if e.op != "insert" else len(e.data), e.value, e.data) for e in again.edits] == \
        [("set", 300, 8, 0x1122334455667788, b""), ("xor", 7, 1, 0x40, b""), ("insert", 12, 3, 0, b"\1\2\3"),
         ("delete", 65535, 2, 0, b"")]
    for unfit in (FuzzInput("state", 1), FuzzInput("messages", 200), FuzzInput("messages", 1, (Edit("set", 1 << 16, 4, 0),)),
                  FuzzInput("messages", 1, (Edit("set", 0, 9, 0),)), FuzzInput("messages", 1, (Edit("set", 0, 4, 0, at="x"),))):
        with pytest.raises(ValueError):
            encode_raw(unfit)


def test_the_fork_server_says_hello_with_the_map_size_and_a_finding_is_an_abort():
    hello = afl_target.hello()
    assert hello & afl_target.FS_OPT_ENABLED == afl_target.FS_OPT_ENABLED
    assert ((hello & 0x00FFFFFE) >> 1) + 1 == 1 << 16            # AFL++'s FS_OPT_GET_MAPSIZE
    finding = executor.Result("committed", finding=executor.oracles.Finding(executor.oracles.DIGEST_ACCEPTED, ""))
    hang = executor.Result("hang", finding=executor.oracles.Finding(executor.oracles.HANG, ""))
    status = afl_target.status_of(finding)
    assert status & 0x7F == 6 and status == 6                    # WIFSIGNALED, WTERMSIG = SIGABRT
    assert afl_target.status_of(hang) == afl_target.status_of(executor.Result("aborted")) == 0


@pytest.fixture
def planted_tree(tmp_path, monkeypatch):
    """A copy of the hypervisors' sources with the digest check removed, in force for this process
    and every process it starts (afl-fuzz's targets)."""
    tree = tmp_path / "hypervisors"
    shutil.copytree(build.HERE, tree, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    service = tree / "common" / "service.inc"
    text = service.read_text()
    assert text.count(DIGEST_CHECK) == 1
    service.write_text(text.replace(DIGEST_CHECK, DIGEST_CHECK_REMOVED))
    monkeypatch.setenv(build.SOURCES_ENVIRONMENT, str(tree))
    return tree


IPC_PRIVATE, IPC_CREAT, IPC_RMID, SHM_MODE = 0, 0o1000, 0, 0o600


def trusted_field_edit(machine: executor.TransferMachine) -> FuzzInput:
    """A trusted register of the last STATE message xored, the digest not fixed: refused by the
    digest check only."""
    number = max(n for n, call in enumerate(machine.calls, 1) if call == executor.transfer.Call.STATE)
    field = next(f for f in fields.message_fields(machine.messages[number - 1]) if f.name.endswith(".rbx"))
    return FuzzInput("messages", number, (Edit("xor", field.offset, value=1),))


def test_the_target_serves_afl_fuzz_s_protocol_and_reports_the_planted_bug_as_an_abort(planted_tree, tmp_path):
    """afl-fuzz played by the test: a shared-memory map, the two pipes on 198/199, one word per run."""
    setup = executor.Setup(guests=SMALL_GUESTS)
    machine = executor.TransferMachine(setup, check_guests=False)
    inputs = {"unchanged": campaign.seeds(machine, ("messages",))[0].encode(),
              "digest-skipped": trusted_field_edit(machine).encode()}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype, libc.shmat.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    size = 1 << 16
    segment = libc.shmget(IPC_PRIVATE, size, IPC_CREAT | SHM_MODE)
    assert segment >= 0
    trace = (ctypes.c_uint8 * size).from_address(libc.shmat(segment, None, 0))
    control_read, control_write = os.pipe()
    status_read, status_write = os.pipe()
    current, stats, findings = tmp_path / "cur_input", tmp_path / "target.json", tmp_path / "findings"
    launcher = (f"import os, sys; os.dup2({control_read}, {afl_target.CONTROL_FD}); "
                f"os.dup2({status_write}, {afl_target.STATUS_FD}); "
                f"os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    command = [sys.executable, "-c", launcher, "-m", "tools.fuzz.afl_target", "--setup", json.dumps(setup.as_json()),
               "--timeout-ms", "1000", "--findings", str(findings), "--stats", str(stats), str(current)]
    process = subprocess.Popen(command, pass_fds=(control_read, status_write),
                               env={**os.environ, afl_target.SHM_ENVIRONMENT: str(segment)})
    os.close(control_read), os.close(status_write)
    try:
        word = lambda: int.from_bytes(os.read(status_read, afl_target.WORD), "little")
        assert word() == afl_target.hello()
        statuses = {}
        for name, data in inputs.items():
            current.write_bytes(data)
            ctypes.memset(trace, 0, size)                       # as afl-fuzz clears it before each run
            os.write(control_write, bytes(afl_target.WORD))
            assert word() == afl_target.NO_CHILD_PID
            statuses[name] = word()
            assert sum(1 for byte in trace if byte) > 100          # the new hypervisor's edges, in afl-fuzz's map
        assert statuses == {"unchanged": 0, "digest-skipped": 6}
    finally:
        os.close(control_write)                                # afl-fuzz gone: the server ends
        assert process.wait(timeout=60) == 0
        os.close(status_read)
        libc.shmctl(segment, IPC_RMID, None)
    assert json.loads(stats.read_text())["executions"] == 2
    saved = list(findings.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith(executor.oracles.DIGEST_ACCEPTED)


@needs_afl
def test_afl_fuzz_and_a_native_worker_sync_and_afl_finds_the_planted_receiver_bug(planted_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    setup = executor.Setup(guests=SMALL_GUESTS)
    options = campaign.Options(setup, "messages", findings=tmp_path / "findings", seconds=AFL_SECONDS, workers=1,
                               quiet=True, output=out, host=HOST)
    native, afl = afl_engine.run(options, 2)
    assert [figure.name for figure in afl] == [sync.afl_instance_name(HOST, 1), sync.afl_instance_name(HOST, 2)]
    assert all(figure.executions > 0 and figure.seeds > 0 for figure in afl)
    # AFL's queue grew beyond its seeds.
    assert sum(figure.queue - figure.seeds for figure in afl) > 0, [(f.name, f.queue, f.seeds) for f in afl]
    # The native worker imported AFL's inputs: it read past the seeds of an afl-fuzz instance's queue.
    synced = out / sync.instance_name(HOST, 0) / sync.SYNCED
    read_up_to = {figure.name: int.from_bytes((synced / figure.name).read_bytes(), "little")
                  for figure in afl if (synced / figure.name).is_file()}
    assert any(read_up_to.get(figure.name, 0) > figure.seeds for figure in afl), (read_up_to, [f.seeds for f in afl])
    assert native[0].imported > 0
    # afl-fuzz found the planted bug: its crashes replay as the digest oracle's finding on the planted
    # build, and as none on the real one.
    crashes = [path for figure in afl for path in figure.crashes]
    assert crashes, afl_engine.summary(native, afl, options)
    machine = executor.TransferMachine(setup)
    kinds = {campaign.replay(path, setup, machine)[0].finding.kind for path in crashes[:3]}
    assert kinds == {executor.oracles.DIGEST_ACCEPTED}
    monkeypatch.delenv(build.SOURCES_ENVIRONMENT)
    real = executor.TransferMachine(setup)
    assert all(campaign.replay(path, setup, real)[0].finding is None for path in crashes[:3])
