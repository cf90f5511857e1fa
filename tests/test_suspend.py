"""Suspend and resume (docs/protocol.md) and the disk it goes through (docs/machine.md 6.10): the disk's
commands, cost in ticks, errors and sparse contents, a machine reset that keeps it; then guests
suspended by one hypervisor and resumed by another compute what they compute without, a damaged
image is refused, a failing disk aborts the suspend, and the same run gives the same result."""
from __future__ import annotations

import hashlib

import pytest

from emu import disk as disk_module
from emu.ports import (
    DISK_ADDRESS_HIGH_PORT, DISK_ADDRESS_LOW_PORT, DISK_BLOCK_PORT, DISK_CAPACITY_PORT, DISK_COMMAND_PORT,
    DISK_COUNT_PORT, DISK_VECTOR_PORT,
)
from emu.disk import DISK_BLOCK_SIZE, DISK_CHUNK, Disk, DiskCommand, DiskStatus, transfer_ticks
from emu.machine import Machine
from emu.vmx_defs import ExitReason
from guests import catalog
from hypervisors import boot, transfer
from hypervisors.memory_map import MIB
from tests.machine_programs import (
    EXIT_OK, EXIT_STOPPED_ON_EXIT, ROOT_IDT, SCRATCH, debug_exit, events_of, exit_log, exit_status, lines, result,
    run_guest, run_root, save, set_interrupt_gate,
)
from tests.test_restart import assert_oracle
from tools import faults
from tools import restart as restart_module
from tools import run as run_module

BUFFER = SCRATCH + 0x1000                 # block-aligned buffers of the root programs
PATTERN_QWORDS = 2 * DISK_BLOCK_SIZE // 8
DISK_VECTOR = 0x44
SLOT_STATUS, SLOT_BEFORE, SLOT_AFTER, SLOT_MISMATCH, SLOT_CAPACITY = 0, 1, 2, 3, 4
HALT_WAKE_SLACK = 200                     # ticks from the completion to the instruction after HLT


def disk_command(command: int, block: int, address: int | str, count: int) -> str:
    """The registers and the command (the address as a number or a register holding it)."""
    load_address = f"mov rax, {address:#x}" if isinstance(address, int) else f"mov rax, {address}"
    return lines(f"mov dx, {DISK_BLOCK_PORT:#x}", f"mov eax, {block:#x}", "out dx, eax",
                 load_address, f"mov dx, {DISK_ADDRESS_LOW_PORT:#x}", "out dx, eax",
                 "shr rax, 32", f"mov dx, {DISK_ADDRESS_HIGH_PORT:#x}", "out dx, eax",
                 f"mov dx, {DISK_COUNT_PORT:#x}", f"mov eax, {count:#x}", "out dx, eax",
                 f"mov dx, {DISK_COMMAND_PORT:#x}", f"mov eax, {command:#x}", "out dx, eax")


def wait_by_polling(label: str) -> str:
    return lines(f"{label}:", f"mov dx, {DISK_COMMAND_PORT:#x}", "in eax, dx",
                 f"cmp eax, {DiskStatus.BUSY}", f"je {label}")


def read_tsc(slot: int) -> str:
    return lines("rdtsc", "shl rdx, 32", "or rax, rdx", save(slot))


def test_a_write_and_a_read_move_the_data_and_complete_after_latency_and_bandwidth():
    machine = Machine(record_events=True)
    body = lines(
        f"mov rdi, {BUFFER:#x}", f"mov ecx, {PATTERN_QWORDS}",           # a pattern: each qword its index
        "fill:", "mov rax, rcx", "stosq", "loop fill",
        read_tsc(SLOT_BEFORE),
        disk_command(DiskCommand.WRITE, 5, BUFFER, 2), wait_by_polling("written"),
        "mov ebx, eax", read_tsc(SLOT_AFTER), save(SLOT_STATUS, "rbx"),
        f"mov rdi, {BUFFER:#x}", f"mov ecx, {PATTERN_QWORDS}", "xor eax, eax", "rep stosq",
        disk_command(DiskCommand.READ, 5, BUFFER, 2), wait_by_polling("read"),
        f"mov rdi, {BUFFER:#x}", f"mov ecx, {PATTERN_QWORDS}", "xor ebx, ebx",
        "check:", "cmp [rdi], rcx", "je same", "inc rbx", "same:", "add rdi, 8", "loop check",
        save(SLOT_MISMATCH, "rbx"),
        f"mov dx, {DISK_CAPACITY_PORT:#x}", "in eax, dx", save(SLOT_CAPACITY),
        debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, SLOT_STATUS) == DiskStatus.READY
    assert result(machine, SLOT_MISMATCH) == 0, "the read did not bring back what the write stored"
    assert result(machine, SLOT_CAPACITY) == machine.io.disk.blocks
    expected = [int.from_bytes((PATTERN_QWORDS - i).to_bytes(8, "little"), "little") for i in range(3)]
    stored = machine.io.disk.read(5 * DISK_BLOCK_SIZE, 24)
    assert [int.from_bytes(stored[i * 8:i * 8 + 8], "little") for i in range(3)] == expected
    write, read = events_of(machine, "disk")
    assert write.data["completion"] - write.time == transfer_ticks(DiskCommand.WRITE, 2 * DISK_BLOCK_SIZE)
    assert read.data["completion"] - read.time == transfer_ticks(DiskCommand.READ, 2 * DISK_BLOCK_SIZE)
    waited = result(machine, SLOT_AFTER) - result(machine, SLOT_BEFORE)
    assert waited >= transfer_ticks(DiskCommand.WRITE, 2 * DISK_BLOCK_SIZE)
    assert machine.io.disk.commands == 2 and machine.io.disk.bytes_written == 2 * DISK_BLOCK_SIZE


def test_the_cost_model_is_latency_plus_bytes_at_the_named_bandwidth():
    gib = 1 << 30
    assert transfer_ticks(DiskCommand.WRITE, gib) == disk_module.DISK_COMMAND_LATENCY_TICKS + \
        -(-gib * disk_module.TICKS_PER_SECOND // disk_module.DISK_WRITE_BYTES_PER_SECOND)
    assert transfer_ticks(DiskCommand.READ, gib) < transfer_ticks(DiskCommand.WRITE, gib)
    assert transfer_ticks(DiskCommand.READ, DISK_BLOCK_SIZE) > disk_module.DISK_COMMAND_LATENCY_TICKS


def test_a_halted_lp_wakes_by_the_completion_interrupt_at_the_completion_tick():
    machine = Machine(record_events=True)
    body = lines(
        set_interrupt_gate(ROOT_IDT, DISK_VECTOR, "completed"),
        f"mov dx, {DISK_VECTOR_PORT:#x}", f"mov eax, {DISK_VECTOR}", "out dx, eax",
        disk_command(DiskCommand.READ, 0, BUFFER, 64),
        "sti", "hlt", "jmp $",
        "completed:", read_tsc(SLOT_AFTER),
        f"mov dx, {DISK_COMMAND_PORT:#x}", "in eax, dx", save(SLOT_STATUS), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    command = events_of(machine, "disk")[0]
    assert command.data["completion"] <= result(machine, SLOT_AFTER) <= command.data["completion"] + HALT_WAKE_SLACK
    assert result(machine, SLOT_STATUS) == DiskStatus.READY


BAD_COMMANDS = [  # (command, first block, buffer, count): the status it gives
    (DiskCommand.READ, Disk().blocks - 1, BUFFER, 2, DiskStatus.BAD_RANGE),
    (DiskCommand.WRITE, 0, BUFFER, 0, DiskStatus.BAD_RANGE),
    (DiskCommand.WRITE, 0, BUFFER + 8, 1, DiskStatus.BAD_ADDRESS),
    (DiskCommand.READ, 0, (1 << 39) - DISK_BLOCK_SIZE, 1, DiskStatus.BAD_ADDRESS),
    (7, 0, BUFFER, 1, DiskStatus.BAD_COMMAND),
]


@pytest.mark.parametrize("command, block, address, count, status", BAD_COMMANDS)
def test_a_bad_command_gives_its_error_status_and_moves_nothing(command, block, address, count, status):
    machine = Machine(record_events=True)
    body = lines(disk_command(command, block, address, count),
                 f"mov dx, {DISK_COMMAND_PORT:#x}", "in eax, dx", save(SLOT_STATUS), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, SLOT_STATUS) == status
    assert machine.io.disk.commands == 0 and not machine.io.disk.chunks


def test_a_command_while_one_is_under_way_is_refused_with_overlap():
    machine = Machine(record_events=True)
    body = lines(disk_command(DiskCommand.WRITE, 0, BUFFER, 1), disk_command(DiskCommand.WRITE, 8, BUFFER, 1),
                 wait_by_polling("done"), "mov eax, eax", save(SLOT_STATUS), debug_exit(EXIT_OK))
    run = run_root(machine, body)
    assert run.stop.exit_status == exit_status(EXIT_OK), run.stop.report
    assert result(machine, SLOT_STATUS) == DiskStatus.OVERLAP
    assert machine.io.disk.commands == 1


@pytest.mark.parametrize("fast_transitions", [True, False])
def test_a_guest_that_reaches_the_bus_finds_the_disk_unclaimed(fast_transitions):
    """Without an I/O exit a guest's disk command is ignored (DMA reaches all of RAM: root's only)."""
    guest = lines(f"mov dx, {DISK_COUNT_PORT:#x}", "mov eax, 1", "out dx, eax",
                  f"mov dx, {DISK_COMMAND_PORT:#x}", f"mov eax, {DiskCommand.WRITE}", "out dx, eax",
                  "in eax, dx", "hlt")
    machine = Machine(record_events=True, fast_transitions=fast_transitions)
    run, _ = run_guest(machine, guest, stop_reasons=(ExitReason.HLT,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.guest_rax == 0xFFFF_FFFF
    assert machine.io.disk.commands == 0 and machine.io.disk.count == 0 and events_of(machine, "disk") == []


def test_zero_chunks_take_no_host_memory():
    disk = Disk()
    disk.write(0, bytes(64 * MIB))                              # all zero: nothing stored
    assert disk.stored_bytes == 0
    data = bytearray(64 * MIB)
    data[3 * DISK_CHUNK + 17] = 0xAB
    disk.write(MIB, bytes(data))
    assert disk.stored_bytes == DISK_CHUNK                      # one chunk holds the byte
    assert disk.read(MIB + 3 * DISK_CHUNK + 17, 1) == b"\xab"
    assert disk.read(0, MIB) == bytes(MIB) and disk.read(2 * MIB, 4 * MIB) == bytes(4 * MIB)
    disk.write(MIB + 3 * DISK_CHUNK, bytes(DISK_CHUNK))         # zero again: the chunk goes
    assert disk.stored_bytes == 0
    with pytest.raises(ValueError):
        disk.read(disk.size - 1, 2)


def test_a_reset_zeroes_ram_keeps_the_disk_and_the_console_and_time_goes_on():
    machine = Machine(record_events=True)
    body = lines(f"mov rdi, {BUFFER:#x}", "mov rax, 0x1122334455667788", "stosq",
                 disk_command(DiskCommand.WRITE, 3, BUFFER, 1), wait_by_polling("done"),
                 "mov dx, 0x3f8", "mov al, 0x41", "out dx, al", debug_exit(EXIT_OK))
    run_root(machine, body)
    stopped_at = machine.now
    after = machine.reset()
    assert after.io.disk is machine.io.disk
    assert after.io.disk.read(3 * DISK_BLOCK_SIZE, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert after.ram.read(BUFFER, 8) == bytes(8)
    assert all(lp.now == stopped_at for lp in after.lps)
    assert after.io.console.text() == machine.io.console.text() == "A"
    assert after.io.disk.completion is None and after.stop is None


# --- suspend and resume ---------------------------------------------------------------------------------
GUESTS = ["storm,vps=2,mem=16M", "hashchain,mem=16M", "timer,mem=16M"]
REQUEST_AT = 600_000
PHASES = ["requested", "invariants", "blackout", "suspending", "suspended", "resuming"]


@pytest.mark.parametrize("source, target", [("hv1", "hv2"), ("hv2", "hv1")])
def test_guests_suspended_and_resumed_compute_what_they_compute_without(source, target):
    document = restart_module.restart(source, target, GUESTS, lps=2, request_at=REQUEST_AT, mode="suspend")
    restart = document["restart"]
    assert restart["outcome"] == "resumed" and restart["reason"] is None and document["hypervisor"] == target
    assert_oracle(document, GUESTS, 2)
    assert [phase["phase"] for phase in restart["phases"]] == PHASES
    assert restart["guest_memory_unchanged"] is True and restart["guest_pages_in_place"] is True
    assert restart["digest_agrees_with_python"] is True
    running = [vp for vp in restart["blackout"]["per_vp"] if vp["state"] == "running"]
    assert running and all(vp["blackout_ticks"] > 0 for vp in running)
    guest_ram = sum(16 * MIB for _ in GUESTS)
    assert restart["disk"]["bytes_written"] >= guest_ram and restart["disk"]["bytes_read"] >= guest_ram
    # Every VP waits at least for its RAM to go out and come back at the disk's bandwidth.
    floor = transfer_ticks(DiskCommand.WRITE, guest_ram) + transfer_ticks(DiskCommand.READ, guest_ram)
    assert restart["blackout"]["max_ticks"] > floor
    assert restart["records_sent"]["partition"] == 2 * len(GUESTS)       # state, then the final records


def suspend(hypervisor: str = "hv1", lps: int = 1, before_resume=None, disk: Disk | None = None):
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor=hypervisor, lps=lps)
    if disk is not None:
        booted.machine.io.disk = disk
    booted.machine.run(max_instructions=REQUEST_AT)
    recorder = restart_module.request(booted, "hv2", mode=transfer.Mode.SUSPEND, before_resume=before_resume)
    return booted, restart_module.summary(booted, recorder, hypervisor, None, transfer.Mode.SUSPEND)


def test_a_damaged_image_is_refused_and_the_machine_stops_with_the_reason():
    booted, summary = suspend(before_resume=faults.corrupt_suspend_image)
    assert summary["outcome"] == "aborted" and summary["reason"] == "refused"
    assert summary["detail"] == transfer.Reply.DIGEST
    stop = booted.machine.stop
    assert stop.reason == "debug-exit" and stop.exit_status == (transfer.RESUME_REFUSED_EXIT_CODE << 1) | 1
    assert f"resume refused: status 6, detail {int(transfer.Reply.DIGEST)}" in booted.machine.io.console.text()
    assert summary["phases"][-1]["phase"] == "resuming"


def test_a_disk_too_small_aborts_the_suspend_and_the_guests_go_on():
    booted, summary = suspend(lps=2, disk=Disk(blocks=16))
    assert summary["outcome"] == "aborted" and summary["reason"] == "disk_failed"
    assert summary["detail"] == DiskStatus.BAD_RANGE
    result_ = booted.machine.run(max_instructions=400_000_000)
    assert result_.stop.reason == "debug-exit" and booted.hypervisor == "hv1"
    assert_oracle(run_module.document(booted, result_, 2), GUESTS, 2)


def test_the_same_suspend_gives_the_same_result():
    runs = []
    for _ in range(2):
        booted, summary = suspend(lps=2)
        disk = booted.machine.io.disk
        contents = hashlib.sha256(b"".join(disk.chunks[index] + index.to_bytes(8, "little")
                                           for index in sorted(disk.chunks))).hexdigest()
        runs.append(([vp["blackout_ticks"] for vp in summary["blackout"]["per_vp"]],
                     [(phase["phase"], phase["virtual_ticks"]) for phase in summary["phases"]],
                     summary["records_sent"], summary["disk"], contents, booted.machine.now))
    assert runs[0] == runs[1]


def test_hhr_restart_mode_suspend_reports_a_resume(capsys):
    from tools import cli
    status = cli.main(["restart", "--mode", "suspend", "--lps", "1", "--guest", "hashchain,mem=16M",
                       "--at", "300000"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "suspend and resume hv1 -> hv2 at instruction 300000 (suspend): resumed" in printed
    assert "suspending" in printed and "resuming" in printed and "blackout" in printed
    assert cli.main(["restart", "--mode", "suspend", "--inject", "commit:hang"]) == 2
    status = cli.main(["restart", "--mode", "suspend", "--lps", "1", "--guest", "hashchain,mem=16M",
                       "--at", "300000", "--inject", "resume:corrupt"])
    printed = capsys.readouterr().out
    assert status == 1 and "(suspend): aborted: refused (detail 8)" in printed, printed
    assert "resume refused: status 6, detail 8" in printed
