"""gcc-built C guests (guests/examples) print what Python computes, use XMM registers, and print the same
with a hot restart as without; an ELF's zero fill costs no staging room and reads zero in guest RAM."""
from __future__ import annotations

import array
import hashlib
import re
import shutil
import struct
import subprocess
from itertools import accumulate
from pathlib import Path

import pytest

from asm import assemble
from guests import c_examples, catalog, elf
from hypervisors import boot, guest_abi
from hypervisors.memory_map import GUEST_LOAD_ADDRESS, GUEST_STAGING_BASE, GUEST_STAGING_END, MIB
from tools import cli
from tools import restart as restart_module
from tools import run as run_module

QWORD_MASK = (1 << 64) - 1
WORD_MASK = (1 << 32) - 1
C_GUESTS = ["sha256", "numeric", "memwalk"]


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """Each C guest's ELF, built by the documented line (skipped where there is no gcc)."""
    if c_examples.compiler() is None:
        pytest.skip("gcc is not installed: the C guests cannot be built")
    return {name: c_examples.build(name) for name in C_GUESTS}


# --- what each guest must print, computed in Python ------------------------------------------------

SHA256_BUFFER_BYTES = 4 << 20
SHA256_SEEDS = (0x12345678, 0x9E3779B9, 0xDEADBEEF, 0x0BADF00D)
LANE_BYTES = 16


def xorshift32(state: int, count: int) -> array.array:
    """Marsaglia's xorshift32 (13, 17, 5): the next `count` states."""
    values = array.array("I")
    for _ in range(count):
        state ^= (state << 13) & WORD_MASK
        state ^= state >> 17
        state ^= (state << 5) & WORD_MASK
        values.append(state)
    return values


def sha256_console() -> str:
    steps = SHA256_BUFFER_BYTES // LANE_BYTES
    words = array.array("I", bytes(SHA256_BUFFER_BYTES))
    for lane, seed in enumerate(SHA256_SEEDS):
        words[lane::len(SHA256_SEEDS)] = xorshift32(seed, steps)
    digest = hashlib.sha256(words.tobytes()).hexdigest()
    return f"sha256 of 4 MiB of xorshift lanes: {digest}\n"


SIGMA, RHO, BETA, DT = 10.0, 28.0, 8.0 / 3.0, 0.001
LORENZ_STEPS, LORENZ_CHECKPOINT = 1_000_000, 200_000
LEIBNIZ_TERMS, LOGISTIC_STEPS, LOGISTIC_RATE = 2_000_000, 1_000_000, 3.9
FRACTION_DIGITS = 15


def decimal(value: float) -> str:
    """numeric.c's print_decimal, operation for operation."""
    text = ""
    if value < 0:
        text, value = "-", -value
    whole = int(value)
    text += f"{whole}."
    fraction = value - float(whole)
    for _ in range(FRACTION_DIGITS):
        fraction *= 10.0
        figure = int(fraction)
        text += chr(ord("0") + figure)
        fraction -= figure
    return text


def shown(name: str, value: float) -> str:
    return f" {name}={struct.unpack('<Q', struct.pack('<d', value))[0]:016x} {decimal(value)}"


def numeric_console() -> str:
    """numeric.c replayed: the same IEEE double operations in the same order."""
    lines = []
    x = y = z = 1.0
    half, sixth = DT * 0.5, DT / 6.0
    for step in range(1, LORENZ_STEPS + 1):
        k1x, k1y, k1z = SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z
        ax, ay, az = x + half * k1x, y + half * k1y, z + half * k1z
        k2x, k2y, k2z = SIGMA * (ay - ax), ax * (RHO - az) - ay, ax * ay - BETA * az
        bx, by, bz = x + half * k2x, y + half * k2y, z + half * k2z
        k3x, k3y, k3z = SIGMA * (by - bx), bx * (RHO - bz) - by, bx * by - BETA * bz
        cx, cy, cz = x + DT * k3x, y + DT * k3y, z + DT * k3z
        k4x, k4y, k4z = SIGMA * (cy - cx), cx * (RHO - cz) - cy, cx * cy - BETA * cz
        x = x + sixth * (k1x + 2.0 * k2x + 2.0 * k3x + k4x)
        y = y + sixth * (k1y + 2.0 * k2y + 2.0 * k3y + k4y)
        z = z + sixth * (k1z + 2.0 * k2z + 2.0 * k3z + k4z)
        if step % LORENZ_CHECKPOINT == 0:
            lines.append(f"lorenz step {step}{shown('x', x)}{shown('y', y)}{shown('z', z)}\n")
    total, denominator, sign = 0.0, 1.0, 1.0
    for _ in range(LEIBNIZ_TERMS):
        total += sign / denominator
        denominator += 2.0
        sign = -sign
    lines.append(f"leibniz terms {LEIBNIZ_TERMS}{shown('pi', 4.0 * total)}\n")
    value = 0.5
    for _ in range(LOGISTIC_STEPS):
        value = LOGISTIC_RATE * value * (1.0 - value)
    lines.append(f"logistic steps {LOGISTIC_STEPS}{shown('x', value)}\n")
    return "".join(lines)


ARENA_BYTES = 32 << 20
HALF_BYTES = ARENA_BYTES // 2
FILL_BLOCK, FILL_MULTIPLIER, FILL_OFFSET = 64 << 10, 37, 11
WALK_ROUNDS, MAX_COPY, MAX_STIR = 1024, 256 << 10, 4096
LCG_MULTIPLIER, LCG_INCREMENT, LCG_SEED, LCG_SHIFT = 6364136223846793005, 1442695040888963407, 0x2545F4914F6CDD1D, 24


def memwalk_console() -> str:
    """memwalk.c replayed on a bytearray: the fills, the copies and stirs, the trail and the checksum."""
    arena = bytearray(ARENA_BYTES)
    for block in range(ARENA_BYTES // FILL_BLOCK):
        arena[block * FILL_BLOCK:(block + 1) * FILL_BLOCK] = \
            bytes([(block * FILL_MULTIPLIER + FILL_OFFSET) & 0xFF]) * FILL_BLOCK
    state = LCG_SEED

    def next_random() -> int:
        nonlocal state
        state = (state * LCG_MULTIPLIER + LCG_INCREMENT) & QWORD_MASK
        return state >> LCG_SHIFT

    trail = [0, 0]
    for round_number in range(WALK_ROUNDS):
        length = 1 + next_random() % MAX_COPY
        low = next_random() % (HALF_BYTES - MAX_COPY)
        high = HALF_BYTES + next_random() % (HALF_BYTES - MAX_COPY)
        to, source = (low, high) if round_number & 1 else (high, low)
        arena[to:to + length] = arena[source:source + length]
        landed = struct.unpack_from("<2Q", arena, to)
        trail = [((trail[0] ^ landed[0]) + round_number) & QWORD_MASK,
                 ((trail[1] ^ landed[1]) + length) & QWORD_MASK]
        stir = 1 + next_random() % MAX_STIR
        at = next_random() % (ARENA_BYTES - stir)
        arena[at:at + stir] = bytes([round_number & 0xFF]) * stir
    words = array.array("Q")
    words.frombytes(arena)
    lanes = [words[0::2], words[1::2]]
    sums = [sum(lane) & QWORD_MASK for lane in lanes]
    sums_of_sums = [sum(accumulate(lane)) & QWORD_MASK for lane in lanes]

    def pair(name: str, values: list[int]) -> str:
        return f" {name}={values[0]:016x}:{values[1]:016x}"

    return (f"arena of {ARENA_BYTES} bytes in bss: zero\n"
            f"walk of {WALK_ROUNDS} rounds:{pair('trail', trail)}{pair('sum', sums)}"
            f"{pair('sum_of_sums', sums_of_sums)}\n")


EXPECTED_CONSOLE = {"sha256": sha256_console, "numeric": numeric_console, "memwalk": memwalk_console}


_alone: dict[Path, dict] = {}


def run_alone(path: Path) -> dict:
    """The guest's outcome under hv1 on one LP with no restart (once per file)."""
    if path not in _alone:
        (_alone[path],) = run_module.run("hv1", [str(path)], lps=1).document["guests"]
    return _alone[path]


# --- the guests under hhr run -------------------------------------------------------------------------

@pytest.mark.parametrize("name", C_GUESTS)
def test_each_c_guest_prints_what_python_computes(built, name, report_timing):
    report = run_module.run("hv1", [str(built[name])], lps=1)
    (guest,) = report.document["guests"]
    assert guest["exit_code"] == 0, guest
    assert guest["console"] == EXPECTED_CONSOLE[name]()
    report_timing(f"{name}: {report.document['instructions'] / 1e6:.0f}M instructions, "
                  f"{report.host_seconds:.2f} s under hhr run")


def functions_using_xmm(path: Path) -> set[str]:
    """The functions of an ELF whose disassembly names an XMM register."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                             text=True, check=True).stdout
    using, current = set(), None
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <([^>]+)>:", line)
        if header:
            current = header.group(1)
        elif current and re.search(r"%xmm\d+", line):
            using.add(current)
    return using


@pytest.mark.parametrize("name", C_GUESTS)
def test_gcc_keeps_the_guests_values_in_xmm_registers(built, name):
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed: the guests' code cannot be inspected")
    using = functions_using_xmm(built[name])
    assert {"memcpy", "memset"} <= using, "the shared memcpy/memset are meant to move 16 bytes at a time"
    assert using - {"memcpy", "memset"}, f"{name}'s own computation uses no XMM register: {sorted(using)}"


def test_each_guest_documents_the_build_line_that_is_used():
    for name in c_examples.names():
        comment = re.sub(r"\s*\\\n \*\s*", " ", c_examples.source(name).read_text())   # joined continuations
        assert f"gcc {' '.join(c_examples.FLAGS)} -o {name}.elf {name}.c" in comment, name
    assert set(C_GUESTS) < set(c_examples.names())


# --- zero fill -------------------------------------------------------------------------------------------

def test_the_loader_stages_file_bytes_only(built):
    data = built["memwalk"].read_bytes()
    flat = elf.flatten(data)
    assert len(data) < 64 << 10, "the 32 MiB array is bss: not in the file"
    assert flat.extent >= ARENA_BYTES and len(flat.image) <= len(data)
    guest = catalog.parse(str(built["memwalk"]))
    assert guest.image == flat.image and guest.extent == flat.extent
    assert guest.zero_fill == flat.extent - len(flat.image) >= ARENA_BYTES


BSS_BYTES = 24 * MIB
BSS_SCAN_QWORDS = BSS_BYTES // 8
CODE_OFFSET = 0x1000                  # where the code sits in the file: one page, like ld's segments
ELF_CODE_ADDRESS = GUEST_LOAD_ADDRESS + CODE_OFFSET
PF_RWX = 7                            # a segment's flags: readable, writable, executable
PAGE_ALIGNMENT = 0x1000
EV_CURRENT = 1                        # the ELF version, in the identification bytes and the header


def elf_file(entry: int, segments: list[tuple[int, bytes, int]]) -> bytes:
    """A static x86-64 ELF: each (address, file bytes, memory size) a loadable segment, the file
    bytes one after another from CODE_OFFSET on."""
    header = elf.HEADER.pack(elf.ELF_MAGIC, elf.ELFCLASS64, elf.ELFDATA2LSB, EV_CURRENT, 0, 0, bytes(7),
                             elf.ET_EXEC, elf.EM_X86_64, EV_CURRENT, entry, elf.HEADER.size, 0, 0, elf.HEADER.size,
                             elf.PROGRAM_HEADER.size, len(segments), 0, 0, 0)
    program_headers, offset = b"", CODE_OFFSET
    for address, contents, memory in segments:
        program_headers += elf.PROGRAM_HEADER.pack(elf.PT_LOAD, PF_RWX, offset, address, address, len(contents),
                                                   memory, PAGE_ALIGNMENT)
        offset += len(contents)
    return (header + program_headers).ljust(CODE_OFFSET, b"\0") + b"".join(c for _a, c, _m in segments)


def test_flatten_stops_at_the_last_non_zero_file_byte():
    text, data_address = b"\x90" * 100 + b"\0" * 28, GUEST_LOAD_ADDRESS + 0x3000
    flat = elf.flatten(elf_file(GUEST_LOAD_ADDRESS, [(GUEST_LOAD_ADDRESS, text, len(text)),
                                                     (data_address, b"\x11\x22" + bytes(500), 0x10000)]))
    assert flat.image == text[:100].ljust(0x3000, b"\0") + b"\x11\x22"
    assert flat.extent == 0x3000 + 0x10000
    all_zero = elf.flatten(elf_file(GUEST_LOAD_ADDRESS, [(GUEST_LOAD_ADDRESS, text, len(text)),
                                                         (data_address, bytes(500), 0x10000)]))
    assert all_zero.image == text[:100] and all_zero.extent == 0x13000


def bss_checker() -> bytes:
    """A static ELF guest: its code (a few hundred bytes), then 24 MiB of zero fill that it ORs
    together, prints "bss zero" or "bss dirty", and ends with exit code 0 or 1."""
    source = f"""
    start:
        lea rsi, [rip + bss]
        mov rcx, {BSS_SCAN_QWORDS}
        xor eax, eax
    scan:
        or rax, [rsi]
        add rsi, 8
        dec rcx
        jnz scan
        xor ebx, ebx                       ; exit code
        lea rsi, [rip + zero]
        test rax, rax
        jz say
        lea rsi, [rip + dirty]
        mov ebx, 1
    say:
        mov dx, 0x3F8
    next_byte:
        lodsb
        test al, al
        jz done
        out dx, al
        jmp next_byte
    done:
        mov eax, ebx
        out {guest_abi.EXIT_PORT}, al
    halt:
        hlt
        jmp halt
    zero:
        .asciz "bss zero\\n"
    dirty:
        .asciz "bss dirty\\n"
    .align 16
    bss:
    """
    code = assemble(source, ELF_CODE_ADDRESS).code
    return elf_file(ELF_CODE_ADDRESS, [(ELF_CODE_ADDRESS, code, len(code) + BSS_BYTES)])


def test_a_guest_with_24_mib_of_bss_runs_and_finds_it_zero(tmp_path):
    path = tmp_path / "bigbss.elf"
    path.write_bytes(bss_checker())
    assert path.stat().st_size < 8 << 10
    assert BSS_BYTES > GUEST_STAGING_END - GUEST_STAGING_BASE, "staged whole, it would not fit"
    guest = run_alone(path)
    assert (guest["console"], guest["exit_code"]) == ("bss zero\n", 0)


def test_a_guest_whose_ram_cannot_hold_its_zero_fill_is_refused_clearly(tmp_path, capsys):
    path = tmp_path / "bigbss.elf"
    path.write_bytes(bss_checker())
    status = cli.main(["run", "--guest", f"{path},mem=16M"])
    error = capsys.readouterr().err
    assert status == 2
    assert "does not fit below its stacks in 16 MiB" in error and "zero fill" in error
    needed_mib = int(re.search(r"give it mem=(\d+)M", error).group(1))
    boot.boot([catalog.parse(f"{path},mem={needed_mib}M")])          # the size it names is enough ...
    with pytest.raises(boot.BootError, match="does not fit"):         # ... and the least that is
        boot.boot([catalog.parse(f"{path},mem={needed_mib - 2}M")])


# --- the oracle: a hot restart changes nothing a guest can see -------------------------------------------

# Restart points in the middle of each guest's work: the Lorenz integration, the hashing, the copy rounds.
RESTARTS = [
    ("numeric", ("hv1", "hv2"), "precopy", 30_000_000),
    ("numeric", ("hv2", "hv1"), "stop-and-copy", 60_000_000),
    ("numeric", ("hv1", "hv2"), "suspend", 30_000_000),
    ("sha256", ("hv1", "hv2"), "precopy", 100_000_000),
    ("memwalk", ("hv1", "hv2"), "precopy", 20_000_000),
]


@pytest.mark.parametrize("name, direction, mode, request_at", RESTARTS)
def test_a_c_guest_prints_the_same_with_a_restart(built, name, direction, mode, request_at):
    without = run_alone(built[name])
    document = restart_module.restart(*direction, [str(built[name])], lps=1, request_at=request_at, mode=mode)
    assert document["restart"]["outcome"] in ("committed", "resumed")
    (guest,) = document["guests"]
    assert guest["exit_code"] == without["exit_code"] == 0
    assert guest["console"] == without["console"]
