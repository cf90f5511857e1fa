"""hypervisors/common/sha256.inc: the assembly SHA-256 (FIPS 180-4) run in root mode on the machine.

A small root program %includes sha256.inc, takes its job (message address, length, digest address)
from RAM, loads known values into the registers sha256 must preserve, calls it, and stores those
registers and RSP back into its job record. The test compares the digest with hashlib's, checks the
bytes around the digest and the message itself are untouched, and measures the stack the routine
used from a pattern written below the stack top beforehand. The instructions per 64-byte block are
measured from the machine's instruction counts and reported (never asserted).

The streaming interface (sha256_start, sha256_blocks, sha256_finish on a caller's context) is run by a
second program that executes a list of steps from RAM: for each step it loads every general register
(and the status flags and DF) with the step's values, calls the step's routine and stores every
register, RSP and RFLAGS back into the step. The test checks each routine's documented contract on
every call (what it returns, what it keeps), the digests against hashlib, the context's bytes against
a reference compression written here, and that nothing outside the context and digest was written.
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
from emu.vmx_defs import Rflags
from tests.machine_programs import (
    EXIT_OK, ROOT_CODE, ROOT_STACK_SIZE, ROOT_STACK_TOP, SCRATCH, debug_exit, exit_status, lines,
)

SHA256_DIRECTORY = Path(__file__).resolve().parent.parent / "hypervisors" / "common"

DIGEST_BYTES = 32
BLOCK_BYTES = 64
WORD_BITS = 32
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


def integer_cube_root(n: int) -> int:
    root = 1 << (n.bit_length() // 3 + 1)
    while True:
        smaller = (2 * root + n // (root * root)) // 3
        if smaller >= root:
            return root
        root = smaller


@functools.lru_cache(maxsize=None)
def fips_constants() -> tuple[list[int], list[int]]:
    """K[0..63] (4.2.2) and H(0) (5.3.3) computed from the primes, independently of the assembly."""
    primes = [p for p in range(2, 320) if all(p % d for d in range(2, int(p ** 0.5) + 1))][:64]
    mask = (1 << WORD_BITS) - 1
    return ([integer_cube_root(p << 3 * WORD_BITS) & mask for p in primes],
            [math.isqrt(p << 2 * WORD_BITS) & mask for p in primes[:8]])


def test_tables_are_the_fips_constants():
    """sha256_k: cube roots of the first 64 primes (4.2.2); sha256_h0: square roots of the first 8 (5.3.3)."""
    image = program_image(1)

    def words(label: str, count: int) -> list[int]:
        offset = image.symbol(label) - image.base
        return [int.from_bytes(image.code[offset + 4 * i:offset + 4 * i + 4], "little") for i in range(count)]

    k, h0 = fips_constants()
    assert words("sha256_k", 64) == k
    assert words("sha256_h0", 8) == h0


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


# --- the streaming interface: sha256_start, sha256_blocks, sha256_finish ---------------------------

GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16))]
# What the program's pushes after a call leave in memory, lowest address first: push rsp, the GPRs
# in order, then pushfq.
RECORDED = ["rflags", *reversed(GPRS), "rsp"]
QWORD_BYTES = 8
STEP = Struct("step", [("routine", 8), ("flags_in", 8), *((f"in_{register}", 8) for register in GPRS),
                       *((f"out_{register}", 8) for register in RECORDED)])
STEP_CURSOR = SCRATCH                # the step under way
STREAM_STACK_TOP = ROOT_STACK_TOP
STREAM_MAX_INSTRUCTIONS = 60_000_000
STREAM_SEED = 1805                   # register values, flags and split patterns: random.Random(STREAM_SEED + ...)

# The routines a step may call, and what each may change (their headers in sha256.inc).
END, START, BLOCKS, FINISH, ONE_SHOT = range(5)
ROUTINE_LABELS = {START: "sha256_start", BLOCKS: "sha256_blocks", FINISH: "sha256_finish", ONE_SHOT: "sha256"}
CLOBBERS = {
    START: {"rax", "rcx"},
    BLOCKS: {"rax", "rbx", "rcx", "rdx", "r8", "r9", "r10", "r11"},
    FINISH: {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"},
    ONE_SHOT: {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"},
}
# The flags each step starts with are drawn from these; the rest of RFLAGS stays the program's.
STATUS_FLAGS = int(Rflags.CF | Rflags.PF | Rflags.AF | Rflags.ZF | Rflags.SF | Rflags.OF)
FLAGS_UNDER_TEST = STATUS_FLAGS | int(Rflags.DF)
# The stack each routine's header says it uses below its return address.
DOCUMENTED_STACK = {START: 0, BLOCKS: 328, FINISH: 472, ONE_SHOT: 520}
RETURN_ADDRESS_BYTES = 8

# Each stream's context, digest and message have their own slot; the context sits 8-byte aligned
# but not 16-byte aligned, the digest at an odd address, the message misaligned with its length.
# Messages go in MESSAGES' slots as above, contexts and digests in the scratch page after the step cursor.
MAX_STREAMS = 4
CONTEXTS = SCRATCH + 0x1000
CONTEXT_SLOT = 0x100
CONTEXT_PLACE = 0x48
STREAM_DIGESTS = SCRATCH + 0x2000
STEPS = MESSAGES + MAX_STREAMS * MESSAGE_SLOT   # the step list, ended by a step with routine END

STREAM_PROGRAM = lines(
    "start:",
    "    mov rax, STEP_CURSOR",
    "    mov rbx, STEPS",
    "    mov [rax], rbx",
    "next_step:",
    "    mov rax, STEP_CURSOR",
    "    mov rbx, [rax]                     ; rbx = this step",
    "    pushfq                             ; the step's status flags and DF, the rest kept",
    "    pop rax",
    "    and rax, FLAGS_KEPT",
    "    or rax, [rbx + STEP_FLAGS_IN]",
    "    push rax",
    "    mov rax, [rbx + STEP_ROUTINE]",
    *(line for routine in ROUTINE_LABELS for line in (f"    cmp rax, {routine}", f"    je call_{routine}")),
    "    popfq                              ; no step left",
    debug_exit(EXIT_OK),
    *(line for routine, label in ROUTINE_LABELS.items() for line in (
        f"call_{routine}:",
        "    popfq",
        *(f"    mov {register}, [rbx + STEP_IN_{register.upper()}]" for register in GPRS if register != "rbx"),
        "    mov rbx, [rbx + STEP_IN_RBX]",
        f"    call {label}",
        "    jmp record")),
    "record:",
    "    push rsp",
    *(f"    push {register}" for register in GPRS),
    "    pushfq",
    "    mov rbx, STEP_CURSOR",
    "    mov rbx, [rbx]",
    "    xor ecx, ecx",
    "copy_recorded:",
    "    mov rax, [rsp + rcx * QWORD_BYTES]",
    "    mov [rbx + rcx * QWORD_BYTES + STEP_OUT_RFLAGS], rax",
    "    inc ecx",
    "    cmp ecx, RECORDED_QWORDS",
    "    jb copy_recorded",
    "    add rsp, RECORDED_QWORDS * QWORD_BYTES",
    "    add rbx, STEP_SIZE",
    "    mov rax, STEP_CURSOR",
    "    mov [rax], rbx",
    "    jmp next_step",
    '%include "sha256.inc"',
    "    .balign 8",
    "stream_layout:                         ; the context's %defines, for the test to read",
    "    .quad SHA256_CONTEXT_BYTES, SHA256_CONTEXT_STATE, SHA256_CONTEXT_COUNT",
)


@functools.lru_cache(maxsize=None)
def stream_image() -> asm.Image:
    constants = {**STEP.constants(), "STEPS": STEPS, "STEP_CURSOR": STEP_CURSOR, "QWORD_BYTES": QWORD_BYTES,
                 "RECORDED_QWORDS": len(RECORDED), "FLAGS_KEPT": ~FLAGS_UNDER_TEST & (1 << 64) - 1}
    return asm.assemble(STREAM_PROGRAM, ROOT_CODE, constants=constants, include_dirs=[SHA256_DIRECTORY],
                        filename="sha256_stream_test_program.s")


@dataclass(frozen=True)
class ContextLayout:
    size: int
    state: int
    count: int


def context_layout() -> ContextLayout:
    image = stream_image()
    offset = image.symbol("stream_layout") - image.base
    size, state, count = (int.from_bytes(image.code[offset + QWORD_BYTES * i:offset + QWORD_BYTES * (i + 1)],
                                         "little") for i in range(3))
    return ContextLayout(size, state, count)


@dataclass
class Stream:
    """One message hashed through one context: sha256_start, then `calls`: ("blocks", n) hashes the next
    n whole blocks, ("finish", n) the last n bytes (the message must be used up then). Or, with
    one_shot, a single call of sha256 on the whole message."""
    message: bytes
    calls: list[tuple[str, int]]
    one_shot: bool = False


@dataclass(frozen=True)
class Step:
    stream: int
    routine: int
    flags_in: int
    registers_in: dict[str, int]


@dataclass(frozen=True)
class StreamOutcome:
    steps: list[Step]
    recorded: list[dict[str, int]]
    contexts: list[bytes]            # each stream's context slot, whole
    digest_slots: list[bytes]
    messages_intact: list[bool]
    stack_used: int
    instructions: int


def stream_addresses(index: int, stream: Stream) -> tuple[int, int, int]:
    """(message, context, digest) addresses of stream `index`."""
    return (MESSAGES + index * MESSAGE_SLOT + len(stream.message) % 8,
            CONTEXTS + index * CONTEXT_SLOT + CONTEXT_PLACE,
            STREAM_DIGESTS + index * DIGEST_SLOT + DIGEST_MISALIGNMENT)


def steps_of(index: int, stream: Stream, rng: random.Random) -> list[Step]:
    message_address, context, digest = stream_addresses(index, stream)

    def step(routine: int, **inputs: int) -> Step:
        registers = {register: rng.getrandbits(64) for register in GPRS}
        return Step(index, routine, rng.getrandbits(64) & FLAGS_UNDER_TEST, {**registers, **inputs})

    if stream.one_shot:
        return [step(ONE_SHOT, rsi=message_address, rcx=len(stream.message), rdi=digest)]
    steps = [step(START, rdi=context)]
    offset = 0
    for kind, count in stream.calls:
        if kind == "blocks":
            steps.append(step(BLOCKS, rdi=context, rsi=message_address + offset, rcx=count))
            offset += count * BLOCK_BYTES
            assert offset <= len(stream.message), "more blocks than the message has"
        else:
            assert offset + count == len(stream.message), "finish must take the rest of the message"
            steps.append(step(FINISH, rdi=context, rsi=message_address + offset, rcx=count, rdx=digest))
            offset += count
    assert offset <= len(stream.message)
    return steps


def interleave(step_lists: list[list[Step]]) -> list[Step]:
    """One step of each stream in turn, while any has steps left."""
    merged = []
    for position in range(max(map(len, step_lists))):
        merged.extend(steps[position] for steps in step_lists if position < len(steps))
    return merged


def run_streams(streams: list[Stream], seed: int = STREAM_SEED) -> StreamOutcome:
    assert len(streams) <= MAX_STREAMS
    rng = random.Random(seed)
    steps = interleave([steps_of(index, stream, rng) for index, stream in enumerate(streams)])
    machine = Machine(lps=1)
    machine.load(ROOT_CODE, stream_image().code)
    for index, stream in enumerate(streams):
        message_address, _context, _digest = stream_addresses(index, stream)
        machine.ram.write(message_address, stream.message)
        machine.ram.write(CONTEXTS + index * CONTEXT_SLOT, bytes([GUARD]) * CONTEXT_SLOT)
        machine.ram.write(STREAM_DIGESTS + index * DIGEST_SLOT, bytes([GUARD]) * DIGEST_SLOT)
    records = b"".join(STEP.pack(routine=step.routine, flags_in=step.flags_in,
                                 **{f"in_{register}": value for register, value in step.registers_in.items()})
                       for step in steps)
    machine.ram.write(STEPS, records + STEP.pack(routine=END))
    machine.ram.write(STREAM_STACK_TOP - STACK_PATTERN_BYTES, bytes([STACK_PATTERN]) * STACK_PATTERN_BYTES)
    machine.start(ROOT_CODE, [STREAM_STACK_TOP])
    run = machine.run(max_instructions=STREAM_MAX_INSTRUCTIONS)
    assert run.stop.exit_status == exit_status(EXIT_OK), (run.stop.reason, run.stop.report)
    recorded = []
    for position in range(len(steps)):
        record = STEP.unpack(machine.ram.read(STEPS + position * STEP.size, STEP.size))
        recorded.append({register: record[f"out_{register}"] for register in RECORDED})
    return StreamOutcome(
        steps=steps, recorded=recorded,
        contexts=[machine.ram.read(CONTEXTS + index * CONTEXT_SLOT, CONTEXT_SLOT) for index in range(len(streams))],
        digest_slots=[machine.ram.read(STREAM_DIGESTS + index * DIGEST_SLOT, DIGEST_SLOT)
                      for index in range(len(streams))],
        messages_intact=[machine.ram.read(stream_addresses(index, stream)[0], len(stream.message)) == stream.message
                         for index, stream in enumerate(streams)],
        stack_used=stack_used(machine, STREAM_STACK_TOP),
        instructions=run.instructions)


def check_contracts(outcome: StreamOutcome) -> None:
    """Every call kept what its header says it keeps and returned what it says it returns."""
    for position, (step, after) in enumerate(zip(outcome.steps, outcome.recorded)):
        where = f"step {position}: {ROUTINE_LABELS[step.routine]}"
        expected = {register: value for register, value in step.registers_in.items()
                    if register not in CLOBBERS[step.routine]}
        if step.routine == BLOCKS:
            expected["rsi"] = step.registers_in["rsi"] + step.registers_in["rcx"] * BLOCK_BYTES
        expected["rsp"] = STREAM_STACK_TOP
        assert {register: after[register] for register in expected} == expected, f"{where}: registers"
        if step.routine == START:
            assert after["rflags"] & FLAGS_UNDER_TEST == step.flags_in, f"{where}: RFLAGS changed"
        elif step.routine == BLOCKS:
            assert after["rflags"] & Rflags.DF == step.flags_in & Rflags.DF, f"{where}: DF changed"
        else:
            assert not after["rflags"] & Rflags.DF, f"{where}: DF left set"


def context_bytes(outcome: StreamOutcome, index: int) -> bytes:
    """Stream `index`'s context, after checking nothing else in its slot was written."""
    layout = context_layout()
    slot = outcome.contexts[index]
    outside = slot[:CONTEXT_PLACE] + slot[CONTEXT_PLACE + layout.size:]
    assert set(outside) == {GUARD}, "a routine wrote outside the context"
    return slot[CONTEXT_PLACE:CONTEXT_PLACE + layout.size]


def check_streams(outcome: StreamOutcome, streams: list[Stream]) -> None:
    check_contracts(outcome)
    layout = context_layout()
    for index, stream in enumerate(streams):
        slot = outcome.digest_slots[index]
        digest = slot[DIGEST_MISALIGNMENT:DIGEST_MISALIGNMENT + DIGEST_BYTES]
        assert digest.hex() == hashlib.sha256(stream.message).hexdigest(), f"stream {index}"
        assert set(slot[:DIGEST_MISALIGNMENT] + slot[DIGEST_MISALIGNMENT + DIGEST_BYTES:]) == {GUARD}, \
            "a routine wrote outside the 32-byte output buffer"
        assert outcome.messages_intact[index], "a routine changed the message"
        if not stream.one_shot:
            # A finished context holds H(N) in native order and the message length.
            context = context_bytes(outcome, index)
            state = context[layout.state:layout.state + DIGEST_BYTES]
            assert [int.from_bytes(state[i:i + 4], "little") for i in range(0, DIGEST_BYTES, 4)] == \
                [int.from_bytes(digest[i:i + 4], "big") for i in range(0, DIGEST_BYTES, 4)]
            assert int.from_bytes(context[layout.count:layout.count + QWORD_BYTES], "little") == len(stream.message)
    assert outcome.stack_used <= STACK_BUDGET, f"{outcome.stack_used} bytes of stack"


STREAM_LENGTHS = [0, 1, 63, 64, 65, 200, 4096 + 17, 100 * 1024 + 5]
SPLITS = ["finish_only", "all_blocks_at_once", "one_block_per_call", "random_blocks_per_call"]
MAX_RANDOM_BLOCKS_PER_CALL = 9
MAX_BLOCKS_LEFT_TO_FINISH = 2


def split_calls(length: int, split: str) -> list[tuple[str, int]]:
    whole = length // BLOCK_BYTES
    tail = length - whole * BLOCK_BYTES
    if split == "finish_only":                  # sha256_finish hashes the whole blocks itself
        return [("finish", length)]
    if split == "all_blocks_at_once":           # one sha256_blocks call, even with 0 blocks
        return [("blocks", whole), ("finish", tail)]
    if split == "one_block_per_call":
        return [("blocks", 1)] * whole + [("finish", tail)]
    assert split == "random_blocks_per_call"    # 0..9 blocks a call, one call of 0, finish gets 0..2 blocks too
    rng = random.Random(STREAM_SEED + length)
    to_finish = rng.randint(0, min(MAX_BLOCKS_LEFT_TO_FINISH, whole))
    left = whole - to_finish
    calls = []
    while left:
        count = min(left, rng.randint(0, MAX_RANDOM_BLOCKS_PER_CALL))
        calls.append(("blocks", count))
        left -= count
    calls.insert(rng.randint(0, len(calls)), ("blocks", 0))
    return calls + [("finish", tail + to_finish * BLOCK_BYTES)]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_streamed_digest_matches_hashlib(length, split):
    streams = [Stream(message_of(length), split_calls(length, split))]
    check_streams(run_streams(streams), streams)


def test_contexts_interleaved():
    """Three messages streamed through three contexts, their calls interleaved, with a one-shot sha256
    among them: each context is independent and the one-shot call leaves them alone."""
    streams = [Stream(message_of(4096 + 17), split_calls(4096 + 17, "random_blocks_per_call")),
               Stream(message_of(1000), split_calls(1000, "one_block_per_call")),
               Stream(message_of(333), [], one_shot=True),
               Stream(message_of(130), split_calls(130, "finish_only"))]
    check_streams(run_streams(streams), streams)


def test_one_shot_keeps_its_contract():
    """sha256 (now sha256_start + sha256_finish) clobbers only what its header lists, for lengths around
    the one/two padding-block boundary and a long message."""
    streams = [Stream(message_of(length), [], one_shot=True) for length in (0, 55, 56, 64 * 1024)]
    check_streams(run_streams(streams), streams)


# A reference compression (FIPS 180-4 6.2.2) to check the context's bytes between calls.
def rotr(x: int, n: int) -> int:
    return (x >> n | x << (WORD_BITS - n)) & ((1 << WORD_BITS) - 1)


def reference_compress(state: list[int], block: bytes) -> list[int]:
    k, _h0 = fips_constants()
    mask = (1 << WORD_BITS) - 1
    w = [int.from_bytes(block[i:i + 4], "big") for i in range(0, BLOCK_BYTES, 4)]
    for t in range(16, 64):
        s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ w[t - 15] >> 3
        s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ w[t - 2] >> 10
        w.append((s1 + w[t - 7] + s0 + w[t - 16]) & mask)
    a, b, c, d, e, f, g, h = state
    for t in range(64):
        t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t]
        t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
        a, b, c, d, e, f, g, h = (t1 + t2) & mask, a, b, c, (d + t1) & mask, e, f, g
    return [(x + y) & mask for x, y in zip(state, [a, b, c, d, e, f, g, h])]


def reference_state(data: bytes) -> list[int]:
    state = list(fips_constants()[1])
    for offset in range(0, len(data), BLOCK_BYTES):
        state = reference_compress(state, data[offset:offset + BLOCK_BYTES])
    return state


def test_reference_compression_is_sha256():
    """The reference used below gives hashlib's digest on a padded message (5.1.1)."""
    message = message_of(200)
    padded = message + b"\x80" + bytes(-(len(message) + PADDING_OVERHEAD) % BLOCK_BYTES) + \
        (len(message) * 8).to_bytes(8, "big")
    digest = b"".join(word.to_bytes(4, "big") for word in reference_state(padded))
    assert digest == hashlib.sha256(message).digest()


def test_context_layout_between_calls():
    """After sha256_start the context is H(0) and a count of 0; after sha256_blocks it is the state of
    the blocks so far and 64 per block, at SHA256_CONTEXT_STATE and SHA256_CONTEXT_COUNT; sha256_blocks
    with 0 blocks changes nothing."""
    layout = context_layout()
    assert (layout.state, layout.count, layout.size) == (0, DIGEST_BYTES, DIGEST_BYTES + QWORD_BYTES)
    message = message_of(5 * BLOCK_BYTES)
    streams = [Stream(message, []), Stream(message, [("blocks", 0)]),
               Stream(message, [("blocks", 2), ("blocks", 3)]), Stream(message, [("blocks", 1), ("blocks", 0)])]
    outcome = run_streams(streams)
    check_contracts(outcome)
    for index, stream in enumerate(streams):
        hashed = sum(count for _kind, count in stream.calls) * BLOCK_BYTES
        context = context_bytes(outcome, index)
        state = [int.from_bytes(context[layout.state + i:layout.state + i + 4], "little")
                 for i in range(0, DIGEST_BYTES, 4)]
        assert state == reference_state(message[:hashed]), f"stream {index}"
        assert int.from_bytes(context[layout.count:layout.count + QWORD_BYTES], "little") == hashed


@pytest.mark.parametrize("routine", [BLOCKS, FINISH, ONE_SHOT], ids=lambda routine: ROUTINE_LABELS[routine])
def test_stack_use_is_as_documented(routine):
    """The deepest stack write of each routine is the one its header gives (plus its return address).
    The program's own register record (17 pushes) is shallower than all of these."""
    message = message_of(BLOCK_BYTES)
    calls = {BLOCKS: [("blocks", 1)], FINISH: [("finish", BLOCK_BYTES)], ONE_SHOT: []}[routine]
    outcome = run_streams([Stream(message, calls, one_shot=routine == ONE_SHOT)])
    assert len(RECORDED) * QWORD_BYTES < outcome.stack_used
    assert outcome.stack_used == DOCUMENTED_STACK[routine] + RETURN_ADDRESS_BYTES
