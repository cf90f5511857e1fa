"""The Tenet writer (docs/tracing.md, Tenet): a short program of known instructions that read and write memory gives exactly the lines of Tenet's format, the last instruction's effects on a last line."""
from __future__ import annotations

from tools.trace.annotate import TracedInstruction
from tools.trace.contexts import ContextInfo
from tools.trace.registers import REGISTER_NAMES
from tools.trace.tenet import LINE_PATTERN, TenetWriter

ROOT = ContextInfo("hv2@root", "ROOT", "NEW")
STACK_TOP = 0x8000
DATA = 0x2000
CODE = 0x1000


def registers(**values: int) -> tuple[int, ...]:
    """Every traced register zero but those named."""
    return tuple(values.get(name, 0) for name in REGISTER_NAMES)


def instruction(address: int, code: bytes, before: dict, after: dict, reads=(), writes=()) -> TracedInstruction:
    return TracedInstruction(0, 0, ROOT, "commit", address, None, code, "", [], list(writes), list(reads),
                             registers(**before), registers(**after))


def program() -> list[TracedInstruction]:
    """mov rax, [DATA]; add [DATA], rax; push rax; pop rbx; the values as the machine would record them."""
    value = 0x1122334455667788
    doubled = (2 * value) & (1 << 64) - 1
    start = dict(rsp=STACK_TOP, rip=CODE)
    loaded = dict(start, rax=value, rip=CODE + 8)
    added = dict(loaded, rip=CODE + 16)
    pushed = dict(added, rsp=STACK_TOP - 8, rip=CODE + 17)
    popped = dict(pushed, rsp=STACK_TOP, rbx=value, rip=CODE + 18)
    return [
        instruction(CODE, bytes.fromhex("488b042500200000"), start, loaded,
                    reads=[(DATA, value.to_bytes(8, "little"))]),
        instruction(CODE + 8, bytes.fromhex("4801042500200000"), loaded, added,
                    reads=[(DATA, value.to_bytes(8, "little"))], writes=[(DATA, doubled.to_bytes(8, "little"))]),
        instruction(CODE + 16, bytes.fromhex("50"), added, pushed, writes=[(STACK_TOP - 8, value.to_bytes(8, "little"))]),
        instruction(CODE + 17, bytes.fromhex("5b"), pushed, popped, reads=[(STACK_TOP - 8, value.to_bytes(8, "little"))]),
    ]


def test_reads_and_writes_go_on_the_next_line_and_the_last_instruction_gets_a_line_of_its_own(tmp_path):
    writer = TenetWriter(tmp_path, {})
    for line in program():
        writer.instruction(line)
    writer.close([], {})
    text = (tmp_path / "hv2-root.lp0.log").read_text(encoding="ascii")
    assert text.splitlines() == [
        "rax=0x0,rbx=0x0,rcx=0x0,rdx=0x0,rbp=0x0,rsp=0x8000,rsi=0x0,rdi=0x0,"
        "r8=0x0,r9=0x0,r10=0x0,r11=0x0,r12=0x0,r13=0x0,r14=0x0,r15=0x0,rip=0x1000",
        "rax=0x1122334455667788,rip=0x1008,mr=0x2000:8877665544332211",
        "rip=0x1010,mr=0x2000:8877665544332211,mw=0x2000:10efccaa88664422",
        "rsp=0x7ff8,rip=0x1011,mw=0x7ff8:8877665544332211",
        "rbx=0x1122334455667788,rsp=0x8000,rip=0x1012,mr=0x7ff8:8877665544332211",
    ]
    assert all(LINE_PATTERN.match(line) for line in text.splitlines())
    assert writer.paths == [tmp_path / "hv2-root.lp0.log"]


def test_files_of_different_contexts_each_end_with_their_own_last_instruction(tmp_path):
    guest = ContextInfo("p0.vp0", "GUEST", "NEW", 0, 0)
    first, second, *_ = program()
    writer = TenetWriter(tmp_path, {})
    writer.instruction(first)
    writer.instruction(TracedInstruction(0, 0, guest, "commit", 0x500, None, b"\x90", "", [], [], [],
                                         registers(rip=0x500), registers(rip=0x501)))
    writer.instruction(second)
    writer.close([], {})
    root = (tmp_path / "hv2-root.lp0.log").read_text(encoding="ascii").splitlines()
    assert len(root) == 3 and root[-1] == "rip=0x1010,mr=0x2000:8877665544332211,mw=0x2000:10efccaa88664422"
    assert (tmp_path / "p0.vp0.lp0.log").read_text(encoding="ascii").splitlines()[1:] == ["rip=0x501"]
