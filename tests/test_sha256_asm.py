"""hypervisors/common/sha256.inc: the assembly SHA-256 (FIPS 180-4) run in root mode on the machine.

A small root program %includes sha256.inc, takes its job (message address, length, digest address)
from RAM, loads known values into the registers sha256 must preserve, calls it, and stores those
registers and RSP back into its job record. The test compares the digest with hashlib's, checks the
bytes around the digest and the message itself are untouched, and measures the stack the routine
used from a pattern written below the stack top beforehand. The instructions per 64-byte block are
measured from the machine's instruction counts and reported (never asserted).
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

import asm
from asm import Struct
from emu.machine import Machine
from tests.machine_programs import (
    EXIT_OK, ROOT_CODE, ROOT_STACK_SIZE, ROOT_STACK_TOP, SCRATCH, debug_exit, exit_status, lines,
)

SHA256_DIRECTORY = Path(__file__).resolve().parent.parent / "hypervisors" / "common"

DIGEST_BYTES = 32
BLOCK_BYTES = 64
PADDING_OVERHEAD = 9                 # the 0x80 marker byte and the 8-byte length (FIPS 180-4 5.1.1)
STACK_BUDGET = 1024                  # bytes below the caller's RSP: the return address and all sha256 uses
PROGRAM_STACK_BYTES = 8              # the program's own push rbx before the call
STACK_PATTERN = 0xA5
STACK_PATTERN_BYTES = 0x2000         # painted below each LP's stack top to see how deep the run went
SEED = 1804                          # message content: random.Random(SEED + length)
MAX_INSTRUCTIONS = 20_000_000

# One job per LP, read and written by the program (host-physical; root runs on the identity map).
JOB = Struct("job", [("message", 8), ("length", 8), ("digest", 8),
                     ("rbp", 8), ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8), ("rsp", 8)])
JOBS = 0xA0000
DONE_COUNTER = SCRATCH               # LPs that have finished; LP 0 stops the machine when all have
DIGESTS = SCRATCH + 0x100            # each LP's digest buffer, DIGEST_SLOT bytes apart
DIGEST_SLOT = 0x40
DIGEST_MISALIGNMENT = 3              # the digest is written to an odd address
GUARD = 0xEE                         # fills each digest slot: bytes around the digest must stay so
MESSAGES = 0x400000                  # each LP's message, MESSAGE_SLOT bytes apart
MESSAGE_SLOT = 0x100000

# Values loaded into the registers sha256 must preserve before the call.
PRESERVED = {"rbp": 0x0BAD_C0DE_1234_5678, "r12": 0x1212_1212_ABCD_EF01, "r13": 0x1313_1313_2468_ACE0,
             "r14": 0x1414_1414_1357_9BDF, "r15": 0xF15F_15F1_5F15_F15F}

PROGRAM = lines(
    "start:                                 ; firmware hand-off: rdi = LP index",
    "    imul rbx, rdi, JOB_SIZE",
    "    mov rax, JOBS",
    "    add rbx, rax                       ; rbx = this LP's job",
    "    mov rsi, [rbx + JOB_MESSAGE]",
    "    mov rcx, [rbx + JOB_LENGTH]",
    "    mov rdi, [rbx + JOB_DIGEST]",
    "    push rbx                           ; sha256 may clobber rbx",
    *(f"    mov {register}, PRESERVED_{register.upper()}" for register in PRESERVED),
    "    call sha256",
    "    pop rbx",
    *(f"    mov [rbx + JOB_{register.upper()}], {register}" for register in PRESERVED),
    "    mov [rbx + JOB_RSP], rsp",
    "    mov rax, DONE_COUNTER",
    "    lock inc qword ptr [rax]",
    "    mov rax, JOBS",
    "    cmp rbx, rax",
    "    jne idle                           ; LPs other than 0 stop here",
    "wait_for_all:",
    "    pause",
    "    mov rax, DONE_COUNTER",
    "    cmp qword ptr [rax], LP_COUNT",
    "    jb wait_for_all",
    debug_exit(EXIT_OK),
    "idle:",
    "    cli",
    "    hlt",
    "    jmp idle",
    '%include "sha256.inc"',
)


@functools.lru_cache(maxsize=None)
def program_image(lp_count: int) -> asm.Image:
    constants = {**JOB.constants(), "JOBS": JOBS, "DONE_COUNTER": DONE_COUNTER, "LP_COUNT": lp_count,
                 **{f"PRESERVED_{register.upper()}": value for register, value in PRESERVED.items()}}
    return asm.assemble(PROGRAM, ROOT_CODE, constants=constants, include_dirs=[SHA256_DIRECTORY],
                        filename="sha256_test_program.s")


def message_of(length: int) -> bytes:
    return random.Random(SEED + length).randbytes(length)


@dataclass(frozen=True)
class Outcome:
    digest: bytes
    guards_intact: bool
    message_intact: bool
    registers: dict[str, int]
    stack_top: int
    stack_used: int                  # below the caller's RSP, the return address included
    instructions: int


def stack_used(machine: Machine, stack_top: int) -> int:
    """Bytes below `stack_top` that no longer hold the pattern (the deepest write decides)."""
    painted = machine.ram.read(stack_top - STACK_PATTERN_BYTES, STACK_PATTERN_BYTES)
    for offset, byte in enumerate(painted):
        if byte != STACK_PATTERN:
            return STACK_PATTERN_BYTES - offset
    return 0


def run_jobs(messages: list[bytes], quantum: int | None = None) -> tuple[list[Outcome], int]:
    """Runs one sha256 call per LP (LP n hashes messages[n]); returns each LP's outcome and the
    instructions the machine retired in all."""
    lp_count = len(messages)
    machine = Machine(lps=lp_count, **({"quantum": quantum} if quantum else {}))
    machine.load(ROOT_CODE, program_image(lp_count).code)
    stacks = [ROOT_STACK_TOP - lp * ROOT_STACK_SIZE for lp in range(lp_count)]
    addresses = []
    for lp, message in enumerate(messages):
        # Vary the alignment of the message with its length; the digest goes to an odd address.
        message_address = MESSAGES + lp * MESSAGE_SLOT + len(message) % 8
        digest_address = DIGESTS + lp * DIGEST_SLOT + DIGEST_MISALIGNMENT
        machine.ram.write(message_address, message)
        machine.ram.write(DIGESTS + lp * DIGEST_SLOT, bytes([GUARD]) * DIGEST_SLOT)
        machine.ram.write(stacks[lp] - STACK_PATTERN_BYTES, bytes([STACK_PATTERN]) * STACK_PATTERN_BYTES)
        machine.ram.write(JOBS + lp * JOB.size,
                          JOB.pack(message=message_address, length=len(message), digest=digest_address))
        addresses.append((message_address, digest_address))
    machine.start(ROOT_CODE, stacks)
    run = machine.run(max_instructions=MAX_INSTRUCTIONS)
    assert run.stop.exit_status == exit_status(EXIT_OK), (run.stop.reason, run.stop.report)
    outcomes = []
    for lp, (message, (message_address, digest_address)) in enumerate(zip(messages, addresses)):
        slot = machine.ram.read(DIGESTS + lp * DIGEST_SLOT, DIGEST_SLOT)
        start = DIGEST_MISALIGNMENT
        record = JOB.unpack(machine.ram.read(JOBS + lp * JOB.size, JOB.size))
        outcomes.append(Outcome(
            digest=slot[start:start + DIGEST_BYTES],
            guards_intact=set(slot[:start] + slot[start + DIGEST_BYTES:]) == {GUARD},
            message_intact=machine.ram.read(message_address, len(message)) == message,
            registers={register: record[register] for register in (*PRESERVED, "rsp")},
            stack_top=stacks[lp],
            stack_used=stack_used(machine, stacks[lp]) - PROGRAM_STACK_BYTES,
            instructions=run.instructions))
    return outcomes, run.instructions


@functools.lru_cache(maxsize=None)
def hash_on_machine(length: int) -> Outcome:
    (outcome,), _instructions = run_jobs([message_of(length)])
    return outcome


def check(outcome: Outcome, message: bytes) -> None:
    assert outcome.digest.hex() == hashlib.sha256(message).hexdigest()
    assert outcome.guards_intact, "sha256 wrote outside its 32-byte output buffer"
    assert outcome.message_intact, "sha256 changed the message"
    assert outcome.registers == {**PRESERVED, "rsp": outcome.stack_top}, "RBP, R12-R15 or RSP not preserved"
    assert outcome.stack_used <= STACK_BUDGET, f"{outcome.stack_used} bytes of stack"


LENGTHS = [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, 4096 + 17, 64 * 1024]


@pytest.mark.parametrize("length", LENGTHS)
def test_digest_matches_hashlib(length):
    check(hash_on_machine(length), message_of(length))


def test_known_answers():
    """FIPS 180-4's own examples (the NIST example values for SHA-256)."""
    for message, expected in [
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
    ]:
        (outcome,), _instructions = run_jobs([message])
        assert outcome.digest.hex() == expected


def test_logical_processors_hash_at_the_same_time():
    """Two LPs interleaved finely (small quantum) each hash their own message: no shared scratch."""
    messages = [message_of(4096 + 17), message_of(1000)[::-1] * 3]
    outcomes, _instructions = run_jobs(messages, quantum=97)
    for outcome, message in zip(outcomes, messages):
        check(outcome, message)


def test_tables_are_the_fips_constants():
    """sha256_k: cube roots of the first 64 primes (4.2.2); sha256_h0: square roots of the first 8 (5.3.3)."""
    image = program_image(1)

    def words(label: str, count: int) -> list[int]:
        offset = image.symbol(label) - image.base
        return [int.from_bytes(image.code[offset + 4 * i:offset + 4 * i + 4], "little") for i in range(count)]

    def integer_cube_root(n: int) -> int:
        root = 1 << (n.bit_length() // 3 + 1)
        while True:
            smaller = (2 * root + n // (root * root)) // 3
            if smaller >= root:
                return root
            root = smaller

    primes = [p for p in range(2, 320) if all(p % d for d in range(2, int(p ** 0.5) + 1))][:64]
    fraction_bits = 32
    mask = (1 << fraction_bits) - 1
    assert words("sha256_k", 64) == [integer_cube_root(p << 3 * fraction_bits) & mask for p in primes]
    assert words("sha256_h0", 8) == [math.isqrt(p << 2 * fraction_bits) & mask for p in primes[:8]]


def test_report_instructions_per_block(report_timing):
    """Instructions per 64-byte block from two runs whose tails pad alike (0 and 64 KiB: both end
    on a block boundary), and the fixed cost of a call. Reported in the summary, not asserted."""
    short, long_ = 0, 64 * 1024
    blocks = {length: (length + PADDING_OVERHEAD + BLOCK_BYTES - 1) // BLOCK_BYTES for length in (short, long_)}
    counts = {length: hash_on_machine(length).instructions for length in (short, long_)}
    per_block = (counts[long_] - counts[short]) / (blocks[long_] - blocks[short])
    text = (f"sha256.inc: {per_block:.1f} instructions per 64-byte block; a 0-byte message (1 block, "
            f"whole program) {counts[short]} instructions; stack used {hash_on_machine(long_).stack_used} bytes "
            "(return address included)")
    print(text)
    report_timing(text)
    assert counts[long_] > counts[short]
