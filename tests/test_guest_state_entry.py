"""No guest state crashes the machine: fresh VMCSs with generated guest-state areas (selectors with
matching GDT entries in guest memory, access rights, bases, limits, control registers, RFLAGS, RIP,
RSP, activity state, paging and EPT around the GDT) are entered with VMLAUNCH, and VMRESUME after
more fields are written, the guest running generated code too; each must end in a VM exit, a VMfail
or a VM-entry failure.

The cases run in a subprocess (tests/guest_state_worker.py), one process for many cases, so that a
crash or a hang fails the test, with the case and the process's last words, instead of killing pytest."""
from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from emu.vmentry_checks import GUEST_FS_GS_DESCRIPTOR_LOADABLE, GUEST_FS_GS_DESCRIPTOR_TRANSLATES
from emu.vmx_defs import (
    AR_DB, AR_G, AR_L, AR_P, AR_S, AR_UNUSABLE, EPT_READ, EPT_RWX_MASK, EPT_WRITE, SEGMENT_TYPE_ACCESSED,
    SEGMENT_TYPE_READABLE_OR_WRITABLE, SELECTOR_TI, Cr0, Cr4, Efer, InterruptionType, Rflags,
    make_interruption_info,
)
from tests.machine_programs import (
    DATA_ACCESS_RIGHTS, FLAT_LIMIT, GDT_CODE64, GDT_DATA, GUEST_CODE, GUEST_GDT, GUEST_PDPT, GUEST_PML4,
    GUEST_RAM_SIZE, PAGE_SIZE, assemble, guest_state_fields,
)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, "-X", "faulthandler", "-m", "tests.guest_state_worker"]
CASE_TIMEOUT_SECONDS = 60        # one case takes milliseconds; a case still running after this hangs
CASES_PER_WORKER = 40            # a machine's Unicorn instances are not freed: a fresh worker now and then
PROPERTY_EXAMPLES = 400
CODE_EXAMPLES = 150
LAST_WORDS = 4000                # characters of the worker's stderr shown with a finding
EXPECTED_OUTCOMES = {"exit", "vmfail", "entry-failure"}
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
NON_CANONICAL = 1 << 47
SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS")
DATA_INDEX = 2                   # the guest GDT of tests.machine_programs: null, code, data, TSS
GDT_ENTRY = 8
LIMIT_GRANULARITY_SHIFT = 12


class Worker:
    """One guest_state_worker process, restarted after CASES_PER_WORKER cases or when it dies."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.cases = 0

    def _start(self) -> None:
        self.process = subprocess.Popen(WORKER, cwd=REPOSITORY_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.cases = 0

    def stop(self) -> tuple[int | None, str]:
        """Ends the process; returns its exit status and what it wrote to stderr (a crash's
        fault-handler report)."""
        if self.process is None:
            return None, ""
        process, self.process = self.process, None
        try:
            _out, err = process.communicate(timeout=CASE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate()
        return process.returncode, err[-LAST_WORDS:]

    def run(self, case: dict) -> dict:
        if self.process is None or self.cases >= CASES_PER_WORKER:
            self.stop()
            self._start()
        self.cases += 1
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], CASE_TIMEOUT_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.process.kill()
            returncode, last_words = self.stop()
            what = "hung" if not ready else f"died with status {returncode}"
            raise AssertionError(f"the machine {what} on case {json.dumps(case)}\n{last_words}")
        return json.loads(line)


@pytest.fixture(scope="module")
def worker():
    process = Worker()
    yield process
    process.stop()


def enter(worker: Worker, case: dict) -> dict:
    answer = worker.run(case)
    assert answer["outcome"] in EXPECTED_OUTCOMES, f"case {json.dumps(case)}: {answer}"
    return answer


# --- descriptors (SDM Vol. 3A Figure 3-8) and the VMCS fields that match them ----------------------
DESCRIPTOR_LIMIT_LOW = 0xFFFF
DESCRIPTOR_LIMIT_HIGH_SHIFT = 48
DESCRIPTOR_BASE_LOW_SHIFT = 16
DESCRIPTOR_BASE_LOW_BITS = 24
DESCRIPTOR_BASE_HIGH_SHIFT = 56
DESCRIPTOR_ACCESS_SHIFT = 40     # type, S, DPL, P: the access-rights byte
DESCRIPTOR_FLAGS_SHIFT = 52      # AVL, L, D/B, G: access-rights bits 15:12
ACCESS_BYTE = 0xFF
FLAGS_NIBBLE = 0xF
AR_FLAGS_SHIFT = 12


def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """A code or data segment descriptor from its base, 20-bit limit, access byte and flags nibble."""
    return ((limit & DESCRIPTOR_LIMIT_LOW) | (limit >> 16) << DESCRIPTOR_LIMIT_HIGH_SHIFT
            | (base & ((1 << DESCRIPTOR_BASE_LOW_BITS) - 1)) << DESCRIPTOR_BASE_LOW_SHIFT
            | (base >> DESCRIPTOR_BASE_LOW_BITS) << DESCRIPTOR_BASE_HIGH_SHIFT
            | access << DESCRIPTOR_ACCESS_SHIFT | flags << DESCRIPTOR_FLAGS_SHIFT)


def segment_fields(name: str, selector: int, quad: int) -> dict[str, int]:
    """The guest-state fields of segment `name` as a MOV of `selector` would load them from `quad`."""
    base = (quad >> DESCRIPTOR_BASE_LOW_SHIFT) & ((1 << DESCRIPTOR_BASE_LOW_BITS) - 1) | \
        (quad >> DESCRIPTOR_BASE_HIGH_SHIFT) << DESCRIPTOR_BASE_LOW_BITS
    limit = (quad & DESCRIPTOR_LIMIT_LOW) | ((quad >> DESCRIPTOR_LIMIT_HIGH_SHIFT) & FLAGS_NIBBLE) << 16
    flags = (quad >> DESCRIPTOR_FLAGS_SHIFT) & FLAGS_NIBBLE
    if flags & (AR_G >> AR_FLAGS_SHIFT):
        limit = limit << LIMIT_GRANULARITY_SHIFT | (1 << LIMIT_GRANULARITY_SHIFT) - 1
    access_rights = (quad >> DESCRIPTOR_ACCESS_SHIFT) & ACCESS_BYTE | flags << AR_FLAGS_SHIFT
    return {f"GUEST_{name}_SELECTOR": selector, f"GUEST_{name}_BASE": base, f"GUEST_{name}_LIMIT": limit,
            f"GUEST_{name}_AR_BYTES": access_rights}


DATA_SELECTOR = DATA_INDEX * GDT_ENTRY
FLAT_DATA = segment_fields("FS", DATA_SELECTOR, GDT_DATA)
assert FLAT_DATA["GUEST_FS_AR_BYTES"] == DATA_ACCESS_RIGHTS and FLAT_DATA["GUEST_FS_LIMIT"] == FLAT_LIMIT
NOT_ACCESSED_DATA = GDT_DATA & ~(SEGMENT_TYPE_ACCESSED << DESCRIPTOR_ACCESS_SHIFT)
NOT_PRESENT_DATA = GDT_DATA & ~(AR_P << DESCRIPTOR_ACCESS_SHIFT)


def fs_or_gs(segment: str) -> dict[str, int]:
    """Segment `segment` loaded with the GDT's data selector, its fields as the VMCS has them."""
    return {name.replace("FS", segment): value for name, value in FLAT_DATA.items()}


def gdt_with_data(quad: int) -> list[int]:
    return [0, GDT_CODE64, quad]


# GDTs elsewhere: descriptors that straddle a page boundary, or run off the end of guest RAM.
GDT_PLACES = [GUEST_GDT + PAGE_SIZE - DATA_INDEX * GDT_ENTRY - GDT_ENTRY // 2, GUEST_GDT + GDT_ENTRY // 2,
              GUEST_RAM_SIZE - DATA_INDEX * GDT_ENTRY - GDT_ENTRY // 2]


def straddling(gdt_at: int) -> dict:
    """FS holds the data selector of a GDT at `gdt_at`, whose data descriptor spans two pages."""
    return {"fields": {**fs_or_gs("FS"), "GUEST_GDTR_BASE": gdt_at}, "gdt_at": gdt_at,
            "gdt": gdt_with_data(GDT_DATA)}


# --- the cases a property test or a bug report found, kept as regressions ------------------------------
REGRESSIONS = [
    # (case id, case, outcome, the failed check or None)
    ("fs-data-selector", {"fields": fs_or_gs("FS")}, "exit", None),
    ("gs-data-selector", {"fields": fs_or_gs("GS")}, "exit", None),
    ("fs-gdt-page-not-in-ept", {"fields": fs_or_gs("FS"), "ept": [[GUEST_GDT, 0]]},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("gs-gdt-page-read-only-accessed", {"fields": fs_or_gs("GS"), "ept": [[GUEST_GDT, EPT_READ]]}, "exit", None),
    ("fs-gdt-page-read-only-not-accessed",
     {"fields": fs_or_gs("FS"), "ept": [[GUEST_GDT, EPT_READ]], "gdt": gdt_with_data(NOT_ACCESSED_DATA)},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("fs-gdt-page-write-only (EPT misconfiguration)",
     {"fields": fs_or_gs("FS"), "ept": [[GUEST_GDT, EPT_WRITE]]}, "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("fs-descriptor-not-present", {"fields": fs_or_gs("FS"), "gdt": gdt_with_data(NOT_PRESENT_DATA)},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_LOADABLE),
    ("gs-beyond-gdt-limit", {"fields": {**fs_or_gs("GS"), "GUEST_GS_SELECTOR": 0x7F8}},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_LOADABLE),
    ("fs-ldt-selector-no-ldt", {"fields": {**fs_or_gs("FS"), "GUEST_FS_SELECTOR": DATA_SELECTOR | SELECTOR_TI}},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_LOADABLE),
    ("fs-gdt-not-mapped-by-guest-paging", {"fields": fs_or_gs("FS"), "guest_memory": [[GUEST_PML4, 0]]},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("fs-gdt-beyond-guest-ram", {"fields": {**fs_or_gs("FS"), "GUEST_GDTR_BASE": GUEST_RAM_SIZE + PAGE_SIZE}},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("fs-gdt-crosses-into-non-canonical",
     {"fields": {**fs_or_gs("FS"), "GUEST_GDTR_BASE": NON_CANONICAL - DATA_SELECTOR - 4}},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("fs-descriptor-straddles-two-pages", straddling(GDT_PLACES[0]), "exit", None),
    ("fs-descriptor-runs-off-guest-ram", straddling(GDT_PLACES[2]), "entry-failure", GUEST_FS_GS_DESCRIPTOR_TRANSLATES),
    ("gs-written-before-vmresume-not-present",
     {"gdt": gdt_with_data(NOT_PRESENT_DATA), "resume_fields": fs_or_gs("GS")},
     "entry-failure", GUEST_FS_GS_DESCRIPTOR_LOADABLE),
    ("fs-written-before-vmresume", {"resume_fields": fs_or_gs("FS")}, "exit", None),
]


@pytest.mark.parametrize("case, outcome, check", [pytest.param(*entry[1:], id=entry[0]) for entry in REGRESSIONS])
def test_known_guest_states_end_as_the_machine_documents(worker, case, outcome, check):
    answer = enter(worker, case)
    assert answer["outcome"] == outcome, answer
    assert (answer["detail"]["checks"] or [None])[-1] == check, answer
    if check is not None and check.startswith("guest.fs_gs."):
        segment = "FS" if "GUEST_FS_SELECTOR" in {**case.get("fields", {}), **case.get("resume_fields", {})} else "GS"
        message = answer["detail"]["messages"][-1]
        assert message.startswith(f"VMENTER FAIL: VMCS guest state invalid {segment} selector 0x"), message


def test_a_refused_fs_keeps_the_vmcs_as_software_wrote_it_and_enters_once_the_gdt_is_fixed(worker):
    """After the failed entry, nothing of the VMCS changed: the hypervisor makes the descriptor present
    (through guest memory, no VMWRITE) and the same VMCS launches."""
    case = {"fields": fs_or_gs("FS"), "gdt": gdt_with_data(NOT_PRESENT_DATA), "fix_gdt_after_failure": True}
    answer = enter(worker, case)
    assert answer["detail"]["checks"] == [GUEST_FS_GS_DESCRIPTOR_LOADABLE], answer
    assert answer["outcome"] == "exit" and answer["detail"]["fs_selector"] == DATA_SELECTOR, answer


# --- generated guest-state areas -------------------------------------------------------------------------
def bits_of(flags) -> list[int]:
    return [int(flag) for flag in flags if int(flag).bit_count() == 1]


def flipped(base: int, bits: list[int]):
    """`base` with a random subset of `bits` inverted."""
    return st.lists(st.sampled_from(bits), max_size=3).map(lambda chosen: base ^ sum(set(chosen)))


def rarely(strategy, usual, odds: int = 3):
    """`usual` most of the time (`odds` to 1), a value of `strategy` now and then. (st.one_of would
    not do: it draws each distinct branch equally often.)"""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda unusual: strategy if unusual else st.just(usual))


VALID = guest_state_fields()
u64s = st.one_of(st.integers(0, U64), st.sampled_from([0, U32, U64, NON_CANONICAL, NON_CANONICAL - 1]))
addresses = st.one_of(st.integers(0, GUEST_RAM_SIZE + PAGE_SIZE), u64s)
USABLE_DATA = AR_P | AR_S | SEGMENT_TYPE_ACCESSED       # what the SDM's checks ask of DS, ES, FS, GS
access_bytes = st.one_of(st.integers(0, ACCESS_BYTE), st.integers(0, ACCESS_BYTE).map(lambda byte: byte | USABLE_DATA),
                         st.sampled_from([USABLE_DATA | SEGMENT_TYPE_READABLE_OR_WRITABLE,
                                          AR_P | AR_S | SEGMENT_TYPE_READABLE_OR_WRITABLE]))
flag_nibbles = st.one_of(st.integers(0, FLAGS_NIBBLE), st.just((AR_G | AR_DB) >> AR_FLAGS_SHIFT),
                         st.just((AR_G | AR_L) >> AR_FLAGS_SHIFT))
descriptors = st.one_of(
    st.builds(descriptor, st.integers(0, U32), st.integers(0, (1 << 20) - 1), access_bytes, flag_nibbles),
    st.sampled_from([GDT_DATA, GDT_CODE64, NOT_ACCESSED_DATA, NOT_PRESENT_DATA]), st.integers(0, U64))
access_rights = st.one_of(st.integers(0, U32), st.just(int(AR_UNUSABLE)), st.just(DATA_ACCESS_RIGHTS))


rpls = rarely(st.integers(1, 3), 0, odds=15)


@st.composite
def data_segment(draw, name: str, gdt: list[int]) -> dict[str, int]:
    """DS, ES, FS or GS: null, the data selector, or any selector (beyond the GDT, in the LDT) with
    the fields its descriptor gives, or unusable with any selector (its descriptor is not read)."""
    kind = draw(st.sampled_from(["null", "data", "gdt", "gdt", "unusable"]))
    if kind == "null":
        return {f"GUEST_{name}_SELECTOR": draw(st.integers(0, 3)), f"GUEST_{name}_AR_BYTES": int(AR_UNUSABLE)}
    if kind == "data":
        return segment_fields(name, DATA_INDEX * GDT_ENTRY | draw(rpls), GDT_DATA)
    index = draw(st.integers(1, len(gdt) + 1))
    selector = index * GDT_ENTRY | draw(rarely(st.just(SELECTOR_TI), 0, odds=15)) | draw(rpls)
    if kind == "unusable":
        return {f"GUEST_{name}_SELECTOR": selector, f"GUEST_{name}_AR_BYTES": int(AR_UNUSABLE)}
    return segment_fields(name, selector, gdt[index] if index < len(gdt) else GDT_DATA)


def mutation(name: str, values) -> st.SearchStrategy:
    return values.map(lambda value: {name: value})


@st.composite
def random_segment(draw) -> dict[str, int]:
    name = draw(st.sampled_from(SEGMENTS))
    return {f"GUEST_{name}_SELECTOR": draw(st.integers(0, U16)), f"GUEST_{name}_AR_BYTES": draw(access_rights),
            f"GUEST_{name}_LIMIT": draw(st.integers(0, U32)), f"GUEST_{name}_BASE": draw(u64s)}


@st.composite
def usable_ldtr(draw) -> dict[str, int]:
    return {"GUEST_LDTR_SELECTOR": draw(st.integers(0, U16)), "GUEST_LDTR_BASE": draw(addresses),
            "GUEST_LDTR_LIMIT": draw(st.integers(0, U32)), "GUEST_LDTR_AR_BYTES": draw(access_rights)}


# One broken or unusual piece of guest state each; a case takes a few.
FIELD_MUTATIONS = st.one_of(
    mutation("GUEST_CR0", flipped(VALID["GUEST_CR0"], bits_of(Cr0))),
    mutation("GUEST_CR4", flipped(VALID["GUEST_CR4"], bits_of(Cr4))),
    mutation("GUEST_IA32_EFER", st.one_of(flipped(VALID["GUEST_IA32_EFER"], bits_of(Efer)), u64s)),
    mutation("GUEST_CR3", addresses),
    mutation("GUEST_RFLAGS", st.one_of(flipped(VALID["GUEST_RFLAGS"], bits_of(Rflags)), u64s)),
    mutation("GUEST_RIP", addresses), mutation("GUEST_RSP", addresses),
    mutation("GUEST_ACTIVITY_STATE", st.one_of(st.integers(0, 3), st.integers(0, U32))),
    mutation("GUEST_INTERRUPTIBILITY_INFO", st.integers(0, 0xF)),
    mutation("VM_ENTRY_INTR_INFO_FIELD", st.builds(make_interruption_info, st.integers(0, 0xFF),
                                                   st.sampled_from(list(InterruptionType)), st.booleans())),
    mutation("GUEST_GDTR_BASE", addresses), mutation("GUEST_GDTR_LIMIT", st.integers(0, U32)),
    mutation("GUEST_FS_BASE", u64s), mutation("GUEST_GS_BASE", u64s),
    mutation("GUEST_IDTR_BASE", addresses), mutation("GUEST_IDTR_LIMIT", st.integers(0, U32)),
    random_segment(), usable_ldtr(),
)


@st.composite
def guest_state_cases(draw, most_mutations: int = 3) -> dict:
    gdt = [0, GDT_CODE64, GDT_DATA] + draw(st.lists(descriptors, min_size=1, max_size=5))
    fields: dict[str, int] = {"GUEST_GDTR_LIMIT": len(gdt) * GDT_ENTRY - 1}
    for name in ("DS", "ES", "FS", "GS"):
        fields.update(draw(data_segment(name, gdt)))
    for mutated in draw(st.lists(FIELD_MUTATIONS, max_size=most_mutations)):
        fields.update(mutated)
    case = {"fields": fields, "gdt": gdt}
    gdt_at = draw(rarely(st.sampled_from(GDT_PLACES), GUEST_GDT))
    if gdt_at != GUEST_GDT:
        case["gdt_at"] = fields["GUEST_GDTR_BASE"] = gdt_at
    corruptions = draw(rarely(st.lists(st.tuples(st.sampled_from([GUEST_PML4, GUEST_PDPT]), u64s),
                                       min_size=1, max_size=2), []))
    if corruptions:
        case["guest_memory"] = [list(pair) for pair in corruptions]
    permissions = draw(rarely(st.integers(0, EPT_RWX_MASK), None))
    if permissions is not None:
        case["ept"] = [[GUEST_GDT, permissions]]
    if draw(st.booleans()):
        resume: dict[str, int] = {}
        for name in draw(st.lists(st.sampled_from(["FS", "GS", "DS"]), min_size=1, max_size=2, unique=True)):
            resume.update(draw(data_segment(name, gdt)))
        for mutated in draw(rarely(st.lists(FIELD_MUTATIONS, min_size=1, max_size=1), [])):
            resume.update(mutated)
        case["resume_fields"] = resume
    return case


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=guest_state_cases())
def test_no_generated_guest_state_crashes_the_machine(worker, case):
    answer = enter(worker, case)
    event(answer["outcome"])     # the spread of outcomes and checks: pytest --hypothesis-show-statistics
    for check in answer["detail"]["checks"]:
        event(f"failed check {check}")


# Guest code the guest runs after such an entry: random bytes, or instructions that load segments and
# descriptor tables, change control registers, MSRs and the stack, fault, trap and return across privilege.
GUEST_INSTRUCTIONS = [
    "mov ax, 0x10", "mov ax, 0x13", "mov ax, 0x4", "mov ax, 0x18", "mov fs, ax", "mov gs, ax", "mov ss, ax",
    "mov ds, ax", "mov ax, fs", "lldt ax", "ltr ax", "verr ax", "lar eax, ecx", "lsl eax, ecx", "lgdt [rip]",
    "lidt [rip]", "sgdt [rsp]", "iretq", "retfq", "push 0x8", "push 0x10", "pushfq", "popfq", "int3",
    "int 0x80", "ud2", "hlt", "cpuid", "vmcall", "mov rax, cr0", "mov cr0, rax", "mov cr3, rax", "mov cr4, rax",
    "clts", "xor eax, eax", "mov rsp, 0x8000", "mov rax, 0x1000", "mov ecx, 0xc0000100", "mov ecx, 0xc0000102",
    "wrmsr", "rdmsr", "swapgs", "syscall", "sysret", "mov rax, [rax]", "mov [rax], rax", "jmp rax", "fld1",
    "movd xmm0, eax", "fxsave [rsp]", "fxrstor [rsp]", "mov dr7, rax", "mov rax, dr6", "invlpg [rax]",
    "in al, 0x60", "out 0x80, al", "rep movsb", "sti", "cli", "rdtscp",
]
STOP = ["vmcall", "hlt"]
guest_code = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.lists(st.sampled_from(GUEST_INSTRUCTIONS), min_size=1, max_size=12).map(
        lambda chosen: assemble("\n".join(chosen + STOP), GUEST_CODE)))


@settings(max_examples=CODE_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=guest_state_cases(most_mutations=1), code=guest_code)
def test_no_generated_guest_code_crashes_the_machine(worker, case, code):
    answer = enter(worker, {**case, "code": code.hex()})
    event(answer["outcome"])


@pytest.mark.parametrize("instruction", GUEST_INSTRUCTIONS)
def test_every_listed_guest_instruction_assembles(instruction):
    """The generated guest code is drawn from this list: an entry keystone refuses would fail the
    property test only when hypothesis happens to draw it."""
    assert assemble(instruction, GUEST_CODE)
