"""`hhr fuzz` (docs/fuzzing.md): restore by dirty pages, properties of the transfer path, every oracle
firing on a deliberately broken build or input, replay of saved findings, a short campaign."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu import dirty, fast
from emu import snapshot as snapshot_module
from guests import catalog
from hypervisors import boot, build, memory_map, transfer
from tools import cli
from tools.fuzz import campaign, executor, fields, oracles
from tools.fuzz.inputs import Edit, FuzzInput, apply_edits

SMALL_GUESTS = ("storm,mem=8M", "counter,mem=4M")
FINDINGS = Path(__file__).resolve().parent / "data" / "fuzz"
NOP = b"\x90"
JUMP_IF_NOT_EQUAL_LENGTH = 6                 # 0F 85 rel32
CLEAR_CARRY_AND_RETURN = b"\xf8\xc3"          # clc; ret: a check that always passes
MAPPINGS_TRIED = 16                          # MAP records changed in the window-sum test


@pytest.fixture(scope="module")
def machine() -> executor.TransferMachine:
    """One recorded restart (hv1 to hv2, storm and hashchain) shared by the tests of this module."""
    return executor.TransferMachine(executor.Setup())


@contextlib.contextmanager
def broken(machine: executor.TransferMachine, point: str, address: int, patch: bytes):
    """A deliberately broken build: `patch` written at `address` in the checkpoint `point`, for the
    duration of the block."""
    checkpoints = machine.checkpoints
    saved = checkpoints.points[point]
    checkpoints.restore(point)
    machine.machine.ram.write(address, patch)
    for context in machine.machine.contexts:     # code translated before the patch would run on
        context.flush_code()
    checkpoints.mark(point)
    try:
        yield
    finally:
        checkpoints.replace(point, saved)
        checkpoints.restore(point)


def in_region(machine: executor.TransferMachine, symbol: str) -> int:
    image = build.image(machine.setup.to_hv)
    return machine.region + image.symbol(symbol) - image.base


def digest_check_jump(machine: executor.TransferMachine) -> int:
    """The receiver's `jne` that refuses a digest mismatch (after `mov eax, REPLY_DIGEST`)."""
    image = build.image(machine.setup.to_hv)
    start = image.symbol("receive_verify")
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    previous = None
    for instruction in disassembler.disasm(image.code[start - image.base:start - image.base + 256], start):
        if instruction.mnemonic == "jne" and previous == f"mov eax, {int(transfer.Reply.DIGEST)}":
            return machine.region + instruction.address - image.base
        previous = f"{instruction.mnemonic} {instruction.op_str}"
    raise AssertionError("no digest check found in receive_verify")


def last_state_message(machine: executor.TransferMachine) -> int:
    return max(number for number, call in enumerate(machine.calls, 1) if call == transfer.Call.STATE)


def trusted_field(machine: executor.TransferMachine, number: int, suffix: str) -> fields.Field:
    return next(f for f in fields.message_fields(machine.messages[number - 1]) if f.name.endswith(suffix))


# --- restore by dirty pages ------------------------------------------------------------------------------
def test_restore_by_dirty_pages_gives_the_machine_a_full_restore_gives():
    booted = boot.boot([catalog.parse(spec) for spec in SMALL_GUESTS], hypervisor="hv1")
    machine = booted.machine
    machine.run(max_instructions=300_000)
    assert machine.ram.dirty is None and all(c.fast.ctx.dirty_pages == fast.ffi.NULL for c in machine.contexts)
    checkpoints = dirty.Checkpoints(machine)
    machine.run(max_instructions=1_500_000)
    checkpoints.mark("later")
    later_ram = hashlib.sha256(machine.ram.view()).hexdigest()
    machine.run(max_instructions=3_000_000)

    def run_on() -> tuple:
        result = machine.run(max_instructions=machine.retired + 500_000)
        return (hashlib.sha256(machine.ram.view()).hexdigest(), machine.retired, result.virtual_time,
                machine.io.console.text(1), machine.io.console.text(2), dict(machine.exit_counts))

    checkpoints.restore("base")
    assert machine.ram.view() == checkpoints.base.ram
    by_pages = run_on()
    checkpoints.restore("later")
    assert hashlib.sha256(machine.ram.view()).hexdigest() == later_ram
    checkpoints.restore("base")
    assert run_on() == by_pages
    checkpoints.close()
    snapshot_module.restore(machine, checkpoints.base)          # the full restore of the same moment
    assert run_on() == by_pages
    assert machine.ram.dirty is None and all(c.fast.ctx.dirty_pages == fast.ffi.NULL for c in machine.contexts)


def page_at_checkpoint(machine: executor.TransferMachine, point: str, page: int) -> bytes:
    address = page << executor.PAGE_SHIFT
    checkpoints = machine.checkpoints
    return checkpoints.points[point][1].get(page) or checkpoints.base.ram[address:address + executor.PAGE_SIZE]


def test_a_restore_keeps_translated_code_when_only_data_beside_it_changed_and_never_hides_a_code_change(machine):
    """The new hypervisor's variables share a page with its code: a restore that changes only them
    keeps the code (the shortcut); one that changes an instruction drops it, so the changed
    instruction runs (the digest check patched out is seen at once, and the real one is back after)."""
    checkpoints = machine.checkpoints
    unchanged = FuzzInput("messages", -1, fix_digest=True)
    last = f"m{len(machine.messages)}"
    machine.execute(unchanged)
    shared = [page for page, spans in checkpoints._code_spans.items() if spans != [(0, executor.PAGE_SIZE)]
              and machine.machine.ram.read(page << executor.PAGE_SHIFT, executor.PAGE_SIZE)
              != page_at_checkpoint(machine, last, page)]
    assert shared, "no page of code and trusted data has data a run writes"
    flushes = checkpoints.code_flushes
    for _ in range(3):                    # each run changes the pages' data; each restore puts it back
        assert machine.execute(unchanged).outcome == "committed"
        for page in shared:
            assert machine.machine.ram.read(page << executor.PAGE_SHIFT, executor.PAGE_SIZE) != \
                page_at_checkpoint(machine, last, page)
    assert checkpoints.code_flushes == flushes
    number = last_state_message(machine)
    field = trusted_field(machine, number, ".rbx")
    entry = FuzzInput("messages", number, (Edit("xor", field.offset, value=1, field=field.name),))
    with broken(machine, f"m{number}", digest_check_jump(machine), NOP * JUMP_IF_NOT_EQUAL_LENGTH):
        assert machine.execute(entry).finding.kind == oracles.DIGEST_ACCEPTED
    assert machine.execute(entry).finding is None                      # the real check is back
    assert checkpoints.code_flushes > flushes


def test_code_run_in_a_trusted_data_range_ends_the_trust(machine):
    """The data ranges are trusted to hold no code only while no block was entered in one: a block
    mark there (as a jump into data would leave) makes every restore compare whole pages again."""
    image = build.image(machine.setup.to_hv)
    ranges = list(machine.data_ranges)
    assert ranges and all(image.base <= start < stop <= image.end for start, stop in ranges)
    mark = ranges[-1][0] - image.base
    try:
        machine.block_map[mark] = 1
        machine.execute(FuzzInput("messages", 1))
        assert machine.data_ranges == [] and machine.checkpoints._code_spans == {}
    finally:
        machine.block_map[mark] = 0
        machine.data_ranges = ranges
        machine._trust_data_ranges()


# --- properties of the transfer path -------------------------------------------------------------------------
edits = st.builds(Edit, op=st.sampled_from(["set", "xor", "insert", "delete"]), offset=st.integers(0, 5000),
                  width=st.sampled_from([0, 1, 2, 4, 8]), value=st.integers(0, (1 << 64) - 1),
                  data=st.binary(max_size=16), field=st.sampled_from(["", "vp[3].rax"]))


@given(st.builds(FuzzInput, target=st.sampled_from(["messages", "state", "vmcs"]), message=st.integers(1, 9),
                 edits=st.lists(edits, max_size=4).map(tuple), fix_digest=st.booleans(), fix_length=st.booleans()))
def test_an_input_file_reads_back_as_the_same_input(entry):
    again = FuzzInput.decode(entry.encode())
    assert again.encode() == entry.encode()
    assert again.name() == hashlib.sha1(entry.encode()).hexdigest()


@given(st.binary(min_size=1, max_size=64), st.lists(edits, max_size=4))
def test_edits_apply_in_order_and_set_writes_exactly_its_width(message, edit_list):
    result = apply_edits(message, tuple(edit_list))
    for edit in edit_list:
        if edit.op == "set" and edit.width and edit.offset + edit.width <= len(message) and len(edit_list) == 1:
            assert result[edit.offset:edit.offset + edit.width] == (edit.value & ((1 << 8 * edit.width) - 1)).to_bytes(
                edit.width, "little")
    size = len(message) + sum(len(e.data) for e in edit_list if e.op == "insert")
    assert len(result) <= size


def test_the_fields_of_every_recorded_message_lie_inside_it_without_overlap(machine):
    for message in machine.messages:
        found = sorted(fields.message_fields(message), key=lambda f: f.offset)
        assert found and found[0].offset == 0
        for field, following in zip(found, found[1:]):
            assert field.offset + field.width <= following.offset <= len(message), (field, following)


def test_the_recorded_messages_chain_to_the_digest_the_old_hypervisor_sent(machine):
    verify = machine.messages[-1]
    assert machine.calls[-1] == transfer.Call.VERIFY
    chain = machine.chain_before[-1]
    assert verify[transfer.TRANSFER_HEADER.size:transfer.TRANSFER_HEADER.size + transfer.STATE_DIGEST_BYTES] == chain


@settings(max_examples=12)
@given(data=st.data())
def test_no_byte_changed_in_flight_is_ever_committed_without_its_digest(machine, data):
    number = data.draw(st.integers(1, len(machine.messages)))
    length = len(machine.messages[number - 1])
    entry = FuzzInput("messages", number, (Edit("xor", data.draw(st.integers(0, length - 1)),
                                                value=data.draw(st.integers(1, 255))),))
    result = machine.execute(entry)
    assert result.outcome == "aborted" and result.finding is None, (result.replies, result.finding)
    assert transfer.Status(result.status) in (transfer.Status.REFUSED, transfer.Status.CALL_FAILED)


def test_bytes_written_past_a_message_s_end_are_no_change_in_flight(machine):
    """Bytes inserted or set after VERIFY's message (its header's byte count unchanged) are never
    read: the input changes nothing the new hypervisor receives, and its commit is no
    `digest-accepted` (afl-fuzz's raw edits past the end made that false finding)."""
    length = len(machine.messages[-1])
    result = machine.execute(FuzzInput("messages", -1, (Edit("insert", length, data=b"\x5f\x20"),
                                                        Edit("set", length + 40, 4, 7))))
    assert result.outcome == "committed" and not result.changed and result.finding is None
    result = machine.execute(FuzzInput("messages", -1, (Edit("xor", length - 1, value=1),)))
    assert result.outcome == "aborted" and result.changed      # the digest's last byte: read, refused


@settings(max_examples=12)
@given(data=st.data())
def test_checkable_fields_at_their_boundaries_never_break_the_machine(machine, data):
    """With the digest fixed the new hypervisor's own checks are all that stand: whatever it does
    with a boundary value, nothing escapes the machine, nothing hangs, no guest page is written, and
    an abort leaves the guests as they were."""
    number = data.draw(st.integers(1, len(machine.messages) - 1))
    checkable = [f for f in fields.message_fields(machine.messages[number - 1]) if f.checkable]
    field = data.draw(st.sampled_from(checkable))
    value = data.draw(st.sampled_from([0, 1, (1 << 8 * field.width) - 1, 1 << (8 * field.width - 1)]))
    entry = FuzzInput("messages", number, (Edit("set", field.offset, field.width, value, field=field.name),),
                      fix_digest=True)
    result = machine.execute(entry)
    assert result.finding is None, result.finding
    assert result.outcome in ("aborted", "committed")


def test_coverage_counts_edges_of_the_new_hypervisor_only(machine):
    machine.execute(FuzzInput("messages", 2))
    hit = bytes(fast.ffi.buffer(machine.edge_map))
    edges = len(hit) - hit.count(0)
    assert edges > 50
    low, high = machine.code_range
    root = machine.machine.lps[0].root.fast.ctx
    assert (root.edge_low, root.edge_high) == (low, high) and high - low == len(build.image("hv2").code)


# --- every oracle fires ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")     # the hook's own report
def test_the_exception_oracle(machine, monkeypatch):
    def broken_port(port, size):
        raise ZeroDivisionError("a broken device")
    monkeypatch.setattr(machine.machine.io, "_read", lambda port, lp: broken_port(port, 0))
    result = machine.execute(FuzzInput("messages", 2))
    assert result.finding.kind == oracles.EXCEPTION and "ZeroDivisionError" in result.finding.description


def test_the_hang_oracle(machine, monkeypatch):
    monkeypatch.setattr(executor, "HANG_BASE", 100_000)          # below the call's own timeout
    with broken(machine, "m2", in_region(machine, "receive_state"), b"\xeb\xfe"):     # jmp $
        result = machine.execute(FuzzInput("messages", 2))
    assert result.outcome == "hang" and result.finding.kind == oracles.HANG


def test_the_foreign_write_oracle(machine):
    """A machine that lets the call write a guest page (a callback plays it) is caught."""
    page = machine.partition_pages[0].start << executor.PAGE_SHIFT

    def writes_a_guest_page(event):
        if event.kind == "vmcallr-return":
            machine.machine.ram.write(page, b"!")
    events = machine.machine.events
    events.unsubscribe(machine._on_event)                           # it acts before the fuzzer looks
    events.subscribe(writes_a_guest_page, frozenset({"vmcallr-return"}))
    events.subscribe(machine._on_event, executor.EVENTS_FOLLOWED)
    try:
        result = machine.execute(FuzzInput("messages", 1, (Edit("xor", 0, value=1),)))
    finally:
        machine.machine.events.unsubscribe(writes_a_guest_page)
    assert result.finding.kind == oracles.FOREIGN_WRITE


def test_the_lost_guest_state_oracle(machine):
    """An abort path that loses a register (a callback clobbers one as the abort begins) is caught."""
    records = build.hypervisor("hv1").records

    def clobbers_a_register(event):
        if event.kind == "restart-phase" and event.data["phase"] == transfer.Phase.ABORTED:
            vps = machine.booted.vp_base
            machine.machine.ram.write_u64(vps + records.vp.offset("rbx"), 0xBAD)
    machine.machine.events.subscribe(clobbers_a_register)
    try:
        result = machine.execute(FuzzInput("messages", 2, (Edit("xor", 0, value=1),)))
    finally:
        machine.machine.events.unsubscribe(clobbers_a_register)
    assert result.outcome == "aborted" and result.finding.kind == oracles.LOST_GUEST_STATE


def test_the_digest_oracle_fires_when_the_receiver_skips_its_digest_check(machine):
    number = last_state_message(machine)
    field = trusted_field(machine, number, ".rbx")
    entry = FuzzInput("messages", number, (Edit("xor", field.offset, value=1, field=field.name),))
    assert machine.execute(entry).finding is None                      # the real receiver refuses it
    with broken(machine, f"m{number}", digest_check_jump(machine), NOP * JUMP_IF_NOT_EQUAL_LENGTH):
        result = machine.execute(entry)
    assert result.outcome == "committed" and result.finding.kind == oracles.DIGEST_ACCEPTED


def test_the_guest_output_oracle_fires_on_a_state_that_changes_a_guest(machine):
    """A guest's RIP changed in the blackout (a trusted value: the receiver cannot tell) is accepted,
    and running the guests to their end shows it."""
    number = last_state_message(machine)
    rip_index = transfer.VMCS_TRANSFER_FIELDS.index(0x681E)          # GUEST_RIP
    targets = [f for f in fields.message_fields(machine.messages[number - 1])
               if f.name.endswith(f".field[{rip_index}].value")]
    entry = FuzzInput("vmcs", number, tuple(Edit("set", f.offset, 8, 0, field=f.name) for f in targets),
                      fix_digest=True)
    result = machine.execute(entry)
    assert result.outcome == "committed" and result.finding is None and not result.guest_check_due
    finding = machine.check_guests_after_commit(entry)
    assert finding is not None and finding.kind == oracles.GUEST_OUTPUT


def test_an_unchanged_restart_is_no_finding_and_the_guests_end_as_without_one(machine):
    result = machine.execute(FuzzInput("messages", 2, fix_digest=True))
    assert result.outcome == "committed" and not result.changed
    assert machine.run_guests_to_end(machine.setup.to_hv) == []


# --- saved findings, fixed in the hypervisors ------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(FINDINGS.glob("*.json")), ids=lambda path: path.stem)
def test_every_saved_finding_is_fixed(path, machine):
    document = json.loads(path.read_text())
    result, kind, _ = campaign.replay(path, None, machine)
    assert kind == document["kind"]
    assert result.finding is None, result.finding
    # Aborted where the edit still strikes what it struck; a build whose restart sends other records
    # (other timing, another layout) may leave the edited record overwritten by a later one, and then
    # a commit is right: the replay ran the guests to their end and found them as in the reference.
    assert result.outcome in ("aborted", "committed")


# --- a campaign --------------------------------------------------------------------------------------------------
def test_a_short_campaign_keeps_a_libfuzzer_corpus_and_is_the_same_for_a_seed(machine, tmp_path):
    def corpus_after(directory: Path) -> dict[str, bytes]:
        options = campaign.Options(machine.setup, "messages", directory / "corpus", directory / "findings",
                                   runs=25, seed=7, quiet=True)
        stats = campaign.Worker(options, 0, machine=machine).fuzz()
        assert stats.executions >= 25 and stats.edges > 0
        return {path.name: path.read_bytes() for path in (directory / "corpus").iterdir()}

    first = corpus_after(tmp_path / "one")
    assert first == corpus_after(tmp_path / "two")
    for name, content in first.items():
        assert name == hashlib.sha1(content).hexdigest()
        FuzzInput.decode(content)
    seeded = {FuzzInput.decode(content).message for content in first.values()
              if not FuzzInput.decode(content).edits}
    assert seeded == set(range(1, len(machine.messages) + 1))      # the real restart's messages


def test_the_command_line_runs_a_bounded_campaign_and_replays(tmp_path, capsys):
    guests = [argument for spec in SMALL_GUESTS for argument in ("--guest", spec)]
    code = cli.main(["fuzz", "--runs", "5", "--target", "messages", "--corpus", str(tmp_path / "c"),
                     "--findings", str(tmp_path / "f"), "--seed", "1", *guests])
    out = capsys.readouterr()
    assert code == 0 and "execs/s per worker" in out.out and "edges of hv2" in out.out
    corpus_file = next((tmp_path / "c").iterdir())
    assert cli.main(["fuzz", "--replay", str(corpus_file), *guests]) == 0
    assert "no finding" in capsys.readouterr().out
    assert cli.main(["fuzz", "--replay", str(tmp_path / "missing.json")]) == 2


def test_the_command_line_fuzzes_two_lps_with_guests_that_outlive_the_restart(tmp_path, capsys):
    """`hhr fuzz --lps 2` without --guest: hashchain would end before the reference restart does, so
    the two-LP defaults are a counter beside storm; a setup whose guests end first is one clear line."""
    code = cli.main(["fuzz", "--lps", "2", "--runs", "5", "--target", "messages", "--corpus", str(tmp_path / "c"),
                     "--findings", str(tmp_path / "f"), "--seed", "1"])
    assert code == 0 and "findings: none" in capsys.readouterr().out
    code = cli.main(["fuzz", "--lps", "2", "--runs", "5", "--guest", "storm", "--guest", "hashchain",
                     "--corpus", str(tmp_path / "c2"), "--findings", str(tmp_path / "f2")])
    assert code == 2 and "the guests ended first" in capsys.readouterr().err


def window_sum_check_jump(machine: executor.TransferMachine, claimed: str = "claimed_window_sums") -> int:
    """The receiver's `jne` that refuses a window whose sum differs (after it reads claimed_window_sums),
    or with `claimed_mapped_pages` the one that refuses a window whose page count differs."""
    image = build.image(machine.setup.to_hv)
    start, sums = image.symbol("receive_verify"), image.symbol(claimed)
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    seen = False
    for instruction in disassembler.disasm(image.code[start - image.base:start - image.base + 512], start):
        if instruction.mnemonic == "lea" and instruction.op_str.startswith("rax, [rip + "):
            seen = instruction.address + instruction.size + int(instruction.op_str.split("+ ")[1].rstrip("]"), 16) == sums
        elif seen and instruction.mnemonic == "jne":
            return machine.region + instruction.address - image.base
    raise AssertionError("no window-sum check found in receive_verify")


def test_a_mapping_changed_in_the_blackout_is_refused_by_the_window_sum(machine):
    """The findings of tests/data/fuzz/blackout-map-*.json, on the MAP records that are the last word
    for their page: each is refused at VERIFY; with the sum check patched out some are accepted."""
    number = last_state_message(machine)
    message = machine.messages[number - 1]
    last_for_page = {}
    for field in fields.message_fields(message):
        if field.name.endswith(".gpa"):
            last_for_page[message[field.offset:field.offset + field.width]] = field.name.split(".")[0]
    entries = [FuzzInput("messages", number, (Edit("xor", 2, value=0x20, field=f"{record}.hpa", at=f"{record}.hpa"),),
                         fix_digest=True)
               for record in list(last_for_page.values())[:MAPPINGS_TRIED] if record.startswith("map[")]
    for entry in entries:
        result = machine.execute(entry)
        assert result.outcome == "aborted" and result.replies[-1] == (transfer.Call.VERIFY, True, transfer.Reply.VALUE)
    # The page count may catch some of them too (a changed page that collides with another, which
    # depends on where the pool's pages lie): with the count check patched out the sum still
    # refuses every one; with both patched out they are accepted. (Whether a guest then notices
    # depends on whether it reads that page again: the saved findings are runs where storm did.)
    count_check = window_sum_check_jump(machine, "claimed_mapped_pages")
    with broken(machine, f"m{number}", count_check, NOP * JUMP_IF_NOT_EQUAL_LENGTH):
        for entry in entries:
            result = machine.execute(entry)
            assert result.outcome == "aborted" and result.replies[-1] == (transfer.Call.VERIFY, True, transfer.Reply.VALUE)
        with broken(machine, f"m{number}", window_sum_check_jump(machine), NOP * JUMP_IF_NOT_EQUAL_LENGTH):
            outcomes = [machine.execute(entry).outcome for entry in entries]
    assert "committed" in outcomes, outcomes


def test_a_partition_record_naming_ram_that_is_not_its_own_aborts_the_restart(machine):
    """A campaign's finding (target `state`): the old hypervisor's record of partition 1 named other
    RAM (free frames), the new hypervisor took those frames, and the guest then triple-faulted. The
    sender now checks each partition's RAM against its own frame table before sending it, and aborts
    (INCONSISTENT); with that check patched out the finding comes back."""
    state = {f.name: f for f in machine.state_fields()}
    memory = state["partition[1].memory"]
    free_next = machine.read_state(machine.booted.symbol("free_next"), 8)
    free_frame = -(-free_next // boot.LARGE_PAGE_SIZE) * boot.LARGE_PAGE_SIZE
    other_partition = machine.read_state(state["partition[0].memory"].offset, 8)
    entries = [FuzzInput("state", 1, (Edit("set", memory.offset, 8, value, field=memory.name),))
               for value in (free_frame, other_partition)]
    for entry in entries:
        result = machine.execute(entry, deep=True)
        assert result.outcome == "aborted" and result.status == transfer.Status.INCONSISTENT, result
        assert result.finding is None, result.finding
    with sender_checks_patched_out(machine):
        finding = machine.execute(entries[0], deep=True).finding
    assert finding is not None and finding.kind == oracles.GUEST_OUTPUT, finding


@contextlib.contextmanager
def sender_checks_patched_out(machine: executor.TransferMachine):
    """The old hypervisor without its checks of the partition records against its frame table (both
    ways: the RAM a record names is the partition's, and the partition owns nothing else)."""
    with contextlib.ExitStack() as stack:
        for check in ("partition_memory_owned", "partition_frames_inside"):
            stack.enter_context(broken(machine, "m1", machine.booted.symbol(check), CLEAR_CARRY_AND_RETURN))
        yield


# A partition record that names less RAM than the partition owns: each (field, new value) list, from
# the record's RAM base and size as the old hypervisor keeps them.
SMALLER_RAM = {
    "half of it": lambda base, size: [("memory_size", size // 2)],
    "one frame less": lambda base, size: [("memory_size", size - boot.LARGE_PAGE_SIZE)],
    "its first frame left out": lambda base, size: [("memory", base + boot.LARGE_PAGE_SIZE),
                                                    ("memory_size", size - boot.LARGE_PAGE_SIZE)],
}


@pytest.mark.parametrize("case", sorted(SMALLER_RAM))
def test_a_partition_record_naming_less_ram_than_the_partition_owns_aborts_the_restart(machine, case):
    """A campaign's finding (target `state`): the old hypervisor's `partition[1].memory_size` set to
    half the partition's RAM was sent, accepted and committed, and hashchain then died on an EPT
    violation: the frames the record left out were free on the new side. Every frame the record named
    was the partition's, so the sender's check passed; it now also checks that the partition owns no
    frame outside them, and aborts (INCONSISTENT, detail: the partition). The guests then end as
    without a restart; with the sender's checks patched out the finding comes back."""
    state = {f.name: f for f in machine.state_fields()}
    base = machine.read_state(state["partition[1].memory"].offset, 8)
    size = machine.read_state(state["partition[1].memory_size"].offset, 8)
    targets = [(state[f"partition[1].{name}"], value) for name, value in SMALLER_RAM[case](base, size)]
    entry = FuzzInput("state", 1, tuple(Edit("set", f.offset, f.width, value, field=f.name) for f, value in targets))
    result = machine.execute(entry, deep=True)
    assert result.outcome == "aborted" and result.status == transfer.Status.INCONSISTENT, result
    assert machine.booted.restart_detail == 1 and result.finding is None, result.finding
    assert machine.run_guests_to_end(machine.setup.from_hv) == []
    with sender_checks_patched_out(machine):
        result = machine.execute(entry, deep=True)
    assert result.outcome == "committed", result
    assert result.finding is not None and result.finding.kind == oracles.GUEST_OUTPUT, result.finding


def test_a_partition_record_with_another_number_than_its_place_aborts_the_restart(machine):
    """The sender knows a partition's frames, pages and change-log entries by its place in its table,
    and sends its record with the number the record holds: the two must agree, or the restart aborts
    before anything of the partition is sent (INCONSISTENT, detail: the place). Without the check the
    receiver refuses the stream later (another partition's RAM under a known number, or a partition
    missing at VERIFY)."""
    number = next(f for f in machine.state_fields() if f.name == "partition[1].number")
    for value in (0, 2, memory_map.MAX_PARTITIONS - 1):
        result = machine.execute(FuzzInput("state", 1, (Edit("set", number.offset, number.width, value,
                                                             field=number.name),)))
        assert result.outcome == "aborted" and result.status == transfer.Status.INCONSISTENT, (value, result)
        assert machine.booted.restart_detail == 1 and result.finding is None, (value, result.finding)


@pytest.mark.parametrize("suffix, value", [
    (".mxcsr", 0x1F80 | (1 << 16)),                  # a reserved MXCSR bit (above MXCSR_MASK)
    (".lstar", 1 << 47),                             # a non-canonical address
    (".kernel_gs_base", 0x8000_0000_0000_0000),
    (".fmask", 1 << 32),                             # bits 63:32 reserved
    (".tsc_aux", 1 << 40),
    (".pat", 0x0007_0406_0007_0403),                 # memory type 3 is reserved
    (".dr6", 1 << 32),
])
def test_a_vp_state_record_that_fxrstor_or_wrmsr_would_refuse_is_refused(machine, suffix, value):
    """The fuzzer's view of the VP_STATE record: its checked fields, each set (digest fixed) to a value
    the processor would refuse when the new hypervisor loads it: the record is refused with VALUE,
    the restart aborts and the guests go on as they were."""
    number = last_state_message(machine)
    field = next(f for f in fields.message_fields(machine.messages[number - 1])
                 if f.name.startswith("vp_state[") and f.name.endswith(suffix))
    assert field.checkable
    entry = FuzzInput("messages", number, (Edit("set", field.offset, field.width, value, field=field.name),),
                      fix_digest=True)
    result = machine.execute(entry)
    assert result.outcome == "aborted" and result.finding is None, result
    assert result.replies[-1] == (transfer.Call.STATE, True, transfer.Reply.VALUE)
