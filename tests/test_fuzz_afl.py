"""`hhr fuzz --engine afl` (docs/fuzzing.md): afl-fuzz drives hhr through its fork server, syncs with a
native worker in one output directory, and finds a receiver bug planted in a copied source tree."""
from __future__ import annotations

import shutil

import pytest

from hypervisors import build
from tools.fuzz import afl_engine, afl_target, campaign, executor, sync
from tools.fuzz.decoding import decode_any, encode_raw
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
