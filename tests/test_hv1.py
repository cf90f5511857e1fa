"""hv1 runs real guests: each guest's output checked against an independent computation, isolation of a
hostile guest, more VPs than LPs, determinism of `hhr run --json`, and clear errors from the command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from guests import c_examples, catalog
from hypervisors.build import HV1_QUANTUM
from tools import cli
from tools import run as run_module

SIEVE_LIMIT = 100_000
MIB = 1 << 20


def primes_below(limit: int) -> int:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\0\0"
    for number in range(2, int(limit ** 0.5) + 1):
        if sieve[number]:
            sieve[number * number::number] = bytearray(len(range(number * number, limit, number)))
    return sum(sieve)


def run(*specs: str, lps: int = 1) -> dict:
    return run_module.run("hv1", list(specs), lps=lps).document


def guest(document: dict, name: str) -> dict:
    (found,) = [g for g in document["guests"] if g["name"] == name]
    return found


def test_hello_prints_and_exits():
    document = run("hello")
    assert document["machine_stop"]["reason"] == "debug-exit"
    assert guest(document, "hello") == {"name": "hello", "vps": 1, "memory": 64 * MIB,
                                        "console": "hello from VP 0\n", "exit_code": 0, "state": "exited",
                                        "stop_reason": None, "mapped_pages": 0}


def test_sieve_counts_the_primes_python_counts():
    sieve = guest(run("sieve"), "sieve")
    assert sieve["console"] == f"primes below {SIEVE_LIMIT}: {primes_below(SIEVE_LIMIT)}\n"
    assert sieve["exit_code"] == 0


def test_hypercalls_answer_as_documented():
    hypercalls = guest(run("hypercalls"), "hypercalls")
    assert hypercalls["exit_code"] == 0, "the exit code names the first failed check"
    assert hypercalls["console"] == "hypercall console write\n"


@pytest.mark.parametrize("lps", [1, 2, 4])
def test_more_vps_than_lps(lps):
    document = run("hello,vps=5", "sieve", lps=lps)
    hello = guest(document, "hello")
    assert sorted(hello["console"].splitlines()) == [f"hello from VP {vp}" for vp in range(5)]
    assert hello["exit_code"] == 0 and guest(document, "sieve")["exit_code"] == 0
    used = [lp for lp, count in document["instructions_by_lp"].items() if count]
    assert len(used) == lps


def test_hostile_guest_is_contained():
    alone = run("hello", "sieve")
    together = run("hello", "hostile", "sieve", lps=2)
    hostile = guest(together, "hostile")
    assert hostile["state"] == "stopped" and hostile["stop_reason"] == "EPT_VIOLATION"
    assert hostile["console"] == "UD UD mapped "     # VMXON and VMCALLR came back as #UD; it mapped a page
    for name in ("hello", "sieve"):
        assert guest(together, name) == guest(alone, name)
    assert together["exits_by_reason"]["VMXON"] == 1 and together["exits_by_reason"]["VMCALLR"] == 1


def test_run_json_is_deterministic():
    first = run("hello,vps=3", "sieve", "hostile", "storm,vps=2", lps=3)
    second = run("hello,vps=3", "sieve", "hostile", "storm,vps=2", lps=3)
    assert first == second


def test_guests_of_256_mib_in_all():
    document = run("sieve,mem=128M", "hello,mem=64M,vps=2", "hypercalls,mem=64M", lps=2)
    assert sum(g["memory"] for g in document["guests"]) == 256 * MIB
    assert all(g["exit_code"] == 0 for g in document["guests"])


@pytest.mark.parametrize("arguments, message", [
    (["--guest", "nosuch"], "no built-in guest or file named 'nosuch'"),
    (["--guest", "hello,vps=0"], "bad guest option 'vps=0'"),
    (["--guest", "hello,mem=3M"], "memory must be a multiple of 2 MiB"),
    (["--guest", "hello", "--lps", "0"], "--lps must be 1 to 64"),
    (["--guest", "hello", "--ram", "64M"], "too small"),
])
def test_command_line_errors_are_one_clear_line(capsys, arguments, message):
    assert cli.main(["run", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hhr run: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_a_guest_file_runs(tmp_path):
    image = tmp_path / "hello.bin"
    image.write_bytes(catalog.builtin_image("hello"))
    document = run(str(image))
    assert guest(document, "hello")["console"] == "hello from VP 0\n"


C_LIMIT = 50_000


@pytest.fixture(scope="module")
def c_guest() -> Path:
    if c_examples.compiler() is None:
        pytest.skip("gcc is not installed: the C guest example cannot be built")
    return c_examples.build("primes")


def test_the_c_guest_example_builds_from_its_documented_line_and_runs(c_guest):
    document = run(str(c_guest), "hello", lps=2)
    primes = guest(document, "primes")
    assert primes["console"] == f"C guest: primes below {C_LIMIT}: {primes_below(C_LIMIT)}\nclock runs\n"
    assert primes["exit_code"] == 0


def test_elf_guests_are_checked(c_guest, tmp_path):
    data = bytearray(c_guest.read_bytes())
    dynamic = tmp_path / "pie.elf"
    dynamic.write_bytes(bytes(data[:ELF_TYPE_OFFSET]) + ELF_TYPE_DYN + bytes(data[ELF_TYPE_OFFSET + 2:]))
    with pytest.raises(catalog.GuestSpecError, match="not a static executable"):
        catalog.parse(str(dynamic))
    truncated = tmp_path / "short.elf"
    truncated.write_bytes(bytes(data[:20]))
    with pytest.raises(catalog.GuestSpecError, match="too short"):
        catalog.parse(str(truncated))


ELF_TYPE_OFFSET = 16
ELF_TYPE_DYN = (3).to_bytes(2, "little")


HASH_BUFFER_WORDS = 0x400000 // 8
HASH_ROUNDS = 3
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
LCG_MULTIPLIER, LCG_INCREMENT, LCG_SEED = 6364136223846793005, 1442695040888963407, 2026
U64 = (1 << 64) - 1


def hash_chain_digest() -> int:
    words, value = [], LCG_SEED
    for _ in range(HASH_BUFFER_WORDS):
        value = (value * LCG_MULTIPLIER + LCG_INCREMENT) & U64
        words.append(value)
    digest = FNV_OFFSET
    for _ in range(HASH_ROUNDS):
        for word in words:
            digest = ((digest ^ word) * FNV_PRIME) & U64
    return digest


def test_hash_chain_over_a_4_mib_buffer_matches_python():
    chain = guest(run("hashchain"), "hashchain")
    assert chain["console"] == f"hash chain digest: {hash_chain_digest():016x}\n"
    assert chain["exit_code"] == 0


def test_two_vps_cooperate_through_shared_memory():
    rounds = 500
    pingpong = guest(run("pingpong,vps=2", lps=2), "pingpong")
    balls = 2 * rounds
    assert pingpong["console"] == f"pingpong ball and sum: {balls} {balls * (balls - 1) // 2}\n"
    assert pingpong["exit_code"] == 0
    assert guest(run("pingpong"), "pingpong")["exit_code"] == 2      # it needs two VPs


def heartbeat_gap(*specs: str) -> int:
    heartbeat = guest(run(*specs, lps=1), "heartbeat")
    assert heartbeat["exit_code"] == 0
    return int(heartbeat["console"].rsplit(":", 1)[1])


def test_heartbeat_sees_the_quantum_of_the_guest_it_shares_its_lp_with():
    """Alone, the heartbeat's largest gap is a few hundred ticks of exits; sharing the LP with sieve it
    waits out sieve's whole quantum: the quantum spans exits (hv1 saves the timer at each exit)."""
    alone = heartbeat_gap("heartbeat")
    shared = heartbeat_gap("heartbeat", "sieve")
    assert 0 < alone < HV1_QUANTUM // 10
    assert HV1_QUANTUM <= shared < 2 * HV1_QUANTUM


def timer_guest_constant(name: str) -> int:
    """A %define of guests/builtin/timer.s, so the test follows the guest's own numbers."""
    source = (catalog.BUILTIN_DIRECTORY / "timer.s").read_text()
    (value,) = re.findall(rf"^%define {name} (\d+)", source, re.MULTILINE)
    return int(value)


def timer_ticks_and_time(document: dict) -> tuple[int, int]:
    timer = guest(document, "timer")
    assert timer["exit_code"] == 0, "the guest's own checks failed (wake-up without a tick, early or masked ticks)"
    ticks, time = re.fullmatch(r"timer ticks: (\d+), virtual time: (\d+)\n", timer["console"]).groups()
    return int(ticks), int(time)


@pytest.mark.parametrize("neighbours", [(), ("sieve", "heartbeat")])
def test_timer_ticks_wake_a_halted_vp_on_time(neighbours):
    """The guest idles in HLT between ticks of its virtual timer. Ticks come on time even when busy
    guests share the LP: their slices end at the halted VP's next tick."""
    ticks, period = timer_guest_constant("TICKS"), timer_guest_constant("TIMER_PERIOD")
    document = run("timer", *neighbours)
    assert document["exits_by_reason"]["HLT"] == ticks
    # Two ticks wait for STI: one is delivered at the window, the other withdrawn (the timer stopped).
    assert document["exits_by_reason"]["INTERRUPT_WINDOW"] == 2
    counted, time = timer_ticks_and_time(document)
    assert counted == ticks
    assert ticks * period <= time < (ticks + 1) * period
    for name in neighbours:
        assert guest(document, name)["exit_code"] == 0


def test_every_lp_runs_on_hv1s_own_page_tables():
    from unicorn import x86_const

    from emu.machine import FIRMWARE_PML4
    from hypervisors import boot

    booted = boot.boot([catalog.parse("hello,vps=2")], lps=2)
    booted.machine.run(max_instructions=50_000_000)
    hv_cr3 = booted.hv_cr3
    assert hv_cr3 != FIRMWARE_PML4
    assert [lp.root.reg(x86_const.UC_X86_REG_CR3) for lp in booted.machine.lps] == [hv_cr3, hv_cr3]
