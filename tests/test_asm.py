"""Tests of the assembler toolkit (asm/): preprocessor, keystone checks, image, disassembly, layouts."""

from __future__ import annotations

import json
import re
import time

import pytest
from capstone import x86_const as cs_x86
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as uc_x86

from asm import (
    VMCALLR_OPCODE,
    AsmError,
    Image,
    LayoutError,
    Struct,
    SymbolNotFound,
    assemble,
    assemble_file,
    decode,
)

BASE = 0x100000
HIGH_BASE = 0x8000_1000  # above 2 GiB: sign-extended 32-bit label fields go wrong here
VERY_HIGH_BASE = 0x1_0000_1000  # above 4 GiB: keystone itself refuses 32-bit label fields


def instructions(image: Image) -> list:
    return list(decode(image.code, image.base))


# --- labels, symbols, symbolize -----------------------------------------------------------------

def test_labels_get_absolute_addresses_at_a_nonzero_base():
    image = assemble("start:\n  nop\n  nop\nsecond: mov rax, 1\nthird:\n  ret\n", BASE)
    assert image.base == BASE
    assert image.symbols == {"start": BASE, "second": BASE + 2, "third": BASE + 2 + 7}
    assert image.symbol("third") == BASE + 9
    assert image.end == BASE + len(image.code) == BASE + 10
    # A jump to a label lands on the label's absolute address.
    jumping = assemble("here: nop\n  jmp here\n", 0x40_0000)
    assert instructions(jumping)[1].target() == 0x40_0000


def test_missing_symbol_is_a_clear_error_and_a_key_error():
    image = assemble("start: nop\n", BASE)
    with pytest.raises(SymbolNotFound, match="no label 'nowhere'"):
        image.symbol("nowhere")
    with pytest.raises(KeyError):
        image.symbol("nowhere")


def test_symbolize_names_the_nearest_label_at_or_below():
    image = assemble("entry: nop\n  nop\nhandler: nop\nalias: nop\n  ret\n", BASE)
    assert image.symbolize(BASE) == "entry"
    assert image.symbolize(BASE + 1) == "entry+0x1"
    assert image.symbolize(BASE + 2) == "handler"
    assert image.symbolize(BASE + 4) == "alias+0x1"
    assert image.symbolize(BASE - 1) == hex(BASE - 1)
    assert image.symbolize(image.end + 0x100) == hex(image.end + 0x100)
    shared = assemble("first:\nsecond: nop\n  ret\n", BASE)
    assert shared.symbolize(BASE + 1) == "first+0x1"  # the first-defined label wins at a shared address


def test_decimal_literals_stay_decimal():
    # keystone 0.9.2 reads decimal as hex when a symbol resolver is installed; the toolkit must not.
    image = assemble("mov rcx, 100\nmov rdx, [rax + 10]\n", BASE)
    first, second = instructions(image)
    assert first.immediates() == [100]
    assert second.memory_operands()[0].mem.disp == 10


# --- preprocessor ---------------------------------------------------------------------------------

def test_include_searches_the_including_directory_then_include_dirs(tmp_path):
    (tmp_path / "main.s").write_text('start: nop\n%include "local.inc"\n%include "shared.inc"\n  ret\n')
    (tmp_path / "local.inc").write_text("local_label: mov eax, 7\n")
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    (shared_dir / "shared.inc").write_text("shared_label: mov ebx, 9\n")
    image = assemble_file(tmp_path / "main.s", BASE, include_dirs=[shared_dir])
    assert image.symbol("local_label") == BASE + 1
    assert image.symbol("shared_label") == BASE + 6
    assert [i.text for i in instructions(image)] == ["nop", "mov eax, 7", "mov ebx, 9", "ret"]
    with pytest.raises(AsmError, match='cannot find include file "shared.inc"'):
        assemble_file(tmp_path / "main.s", BASE)


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.s").write_text('nop\n%include "b.inc"\n')
    (tmp_path / "b.inc").write_text('%include "a.s"\n')
    with pytest.raises(AsmError, match=r"include cycle: a\.s -> b\.inc -> a\.s") as caught:
        assemble_file(tmp_path / "a.s", BASE)
    assert f"{tmp_path / 'b.inc'}:1" in str(caught.value)


def test_macro_expansions_get_their_own_local_labels():
    source = """
%macro COUNT_DOWN reg, times
    mov %reg, %times
%%again:
    dec %reg
    jnz %%again
%endmacro
start:
    COUNT_DOWN rcx, 3
    COUNT_DOWN rdx, 5
    ret
"""
    image = assemble(source, BASE)
    first, second = image.symbol("COUNT_DOWN.1.again"), image.symbol("COUNT_DOWN.2.again")
    assert first != second
    decoded = instructions(image)
    assert [i.text for i in decoded if not i.is_branch] == [
        "mov rcx, 3", "dec rcx", "mov rdx, 5", "dec rdx", "ret",
    ]
    branches = [i for i in decoded if i.is_branch]
    assert [branch.target() for branch in branches] == [first, second]


def test_macro_argument_count_and_unknown_parameter_errors_name_the_line():
    source = "%macro PAIR a, b\n  mov %a, %b\n%endmacro\nnop\nPAIR rax\n"
    with pytest.raises(AsmError, match=r"m\.s:5: macro PAIR takes 2 argument\(s\) \(a, b\), got 1"):
        assemble(source, BASE, filename="m.s")
    with pytest.raises(AsmError, match=r"m\.s:2: macro BAD has no parameter %c") as caught:
        assemble("%macro BAD a\n  mov %a, %c\n%endmacro\nBAD rax\n", BASE, filename="m.s")
    assert "macro BAD invoked at m.s:4" in str(caught.value)
    with pytest.raises(AsmError, match=r"m\.s:2: keystone: Invalid operand") as caught:
        assemble("%macro LOAD a\n  mov eax, %a\n%endmacro\nLOAD rbx\n", BASE, filename="m.s")
    assert "(expanded: mov eax, rbx)" in str(caught.value)


def test_define_and_constants_substitute_whole_words_only():
    source = "%define STEP 8\nmov rax, [rbx + STEP]\nmov rcx, OFFSET_A\nmov rdx, OFFSET_AB\nadd rsi, NEG\n"
    image = assemble(source, BASE, constants={"OFFSET_A": 0x40, "OFFSET_AB": 0x44, "NEG": -16})
    assert [i.text for i in instructions(image)] == [
        "mov rax, qword ptr [rbx + 8]", "mov rcx, 0x40", "mov rdx, 0x44", "add rsi, -0x10",
    ]


def test_constants_from_a_struct_reach_the_instruction_encoding():
    guest = Struct("guest_state", [("rax", 8), ("rbx", 8), ("flags", 4), ("_pad", 4), ("rip", 8)])
    assert guest.constants() == {
        "GUEST_STATE_RAX": 0, "GUEST_STATE_RBX": 8, "GUEST_STATE_FLAGS": 16, "GUEST_STATE_RIP": 24,
        "GUEST_STATE_SIZE": 32,
    }
    source = "mov rax, [rdi + GUEST_STATE_RIP]\nmov dword ptr [rdi + GUEST_STATE_FLAGS], 1\nadd rdi, GUEST_STATE_SIZE\n"
    image = assemble(source, BASE, constants=guest.constants())
    load, store, advance = instructions(image)
    assert load.memory_operands()[0].mem.disp == guest.offset("rip") == 24
    assert store.memory_operands()[0].mem.disp == guest.offset("flags") == 16
    assert advance.immediates() == [guest.size]


@pytest.mark.parametrize(
    "source, name",
    [
        ("mov rax, [rbx + VMCS_MISSING]", "VMCS_MISSING"),
        ("jmp nowhere", "nowhere"),
        (".space UNKNOWN_SIZE", "UNKNOWN_SIZE"),  # keystone alone emits 0 bytes here
        (".fill UNKNOWN_COUNT, 1, 0", "UNKNOWN_COUNT"),  # keystone alone hangs here
        ("jmp $", "$"),  # keystone alone emits nothing for this
    ],
)
def test_unknown_identifier_is_an_error_with_file_and_line(source, name):
    with pytest.raises(AsmError, match=rf"u\.s:2: unknown identifier '{re.escape(name)}'"):
        assemble("nop\n" + source + "\n", BASE, filename="u.s")


def test_case_mismatch_gets_a_suggestion():
    with pytest.raises(AsmError, match="did you mean Loop_Top"):
        assemble("Loop_Top: nop\njmp loop_top\n", BASE)


def test_refused_directives_point_to_the_preprocessor():
    with pytest.raises(AsmError, match="%define"):
        assemble(".equ LIMIT, 5\n", BASE)
    with pytest.raises(AsmError, match="%define"):
        assemble("LIMIT = 5\n", BASE)
    with pytest.raises(AsmError, match="unsupported directive .section"):
        assemble(".section .data\n", BASE)


@pytest.mark.parametrize(
    "source, message",
    [
        ("a: nop\na: nop\n", r"d\.s:2: label 'a' is already defined at d\.s:1"),
        ("%define X Y\n%define Y X\nmov rax, X\n", r"d\.s:3: %define expansion does not end"),
        ("%macro OPEN\n  nop\n", r"d\.s:1: macro OPEN has no %endmacro"),
        ("%endmacro\n", r"d\.s:1: %endmacro without %macro"),
        ("rax: nop\n", r"d\.s:1: label 'rax' has the name of a register"),
        ("%if 1\n", r"d\.s:1: unknown preprocessor directive %if"),
        ("jmp short there\nthere: nop\n", r"d\.s:1: unknown identifier 'short'.*chooses jump sizes"),
    ],
)
def test_preprocessor_errors_name_file_and_line(source, message):
    with pytest.raises(AsmError, match=message):
        assemble(source, BASE, filename="d.s")


def test_comments_are_stripped_but_not_inside_strings():
    image = assemble('msg: .asciz "a;b#c" ; trailing comment\n  nop # another\n', BASE)
    assert image.code == b"a;b#c\x00\x90"


# --- keystone errors --------------------------------------------------------------------------------

def test_keystone_error_names_file_line_and_text_without_a_keystone_traceback(tmp_path):
    (tmp_path / "main.s").write_text('nop\n%include "bad.inc"\n')
    (tmp_path / "bad.inc").write_text("  xor eax, eax\n  mov eax, rbx\n")
    with pytest.raises(AsmError) as caught:
        assemble_file(tmp_path / "main.s", BASE)
    message = str(caught.value)
    assert f"{tmp_path / 'bad.inc'}:2: keystone: Invalid operand" in message
    assert "mov eax, rbx" in message
    assert f"file included from {tmp_path / 'main.s'}:2" in message
    assert caught.value.location.line == 2
    # Raised outside the except block that caught keystone's error: no keystone frames are chained.
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_invalid_mnemonic_is_located():
    with pytest.raises(AsmError, match=r"p\.s:3: keystone: Invalid mnemonic"):
        assemble("nop\nnop\nfrobnicate rax\nnop\n", BASE, filename="p.s")


def test_layout_dependent_error_is_located_by_prefix():
    # Each line is fine alone; the second .org moves backwards only after the .space.
    source = "nop\n.org 0x100010\n.space 0x20\n.org 0x100020\nnop\n"
    with pytest.raises(AsmError, match=r"o\.s:4: keystone: Invalid fragment"):
        assemble(source, BASE, filename="o.s")


# --- VMX mnemonics and VMCALLR ------------------------------------------------------------------------

VMX_INSTRUCTIONS = [
    ("vmxon qword ptr [rax]", "f30fc730", "vmxon", "qword ptr [rax]"),
    ("vmxoff", "0f01c4", "vmxoff", ""),
    ("vmclear qword ptr [rbx]", "660fc733", "vmclear", "qword ptr [rbx]"),
    ("vmptrld qword ptr [rcx]", "0fc731", "vmptrld", "qword ptr [rcx]"),
    ("vmptrst qword ptr [rdx]", "0fc73a", "vmptrst", "qword ptr [rdx]"),
    ("vmread rax, rbx", "0f78d8", "vmread", "rax, rbx"),
    ("vmwrite rbx, rax", "0f79d8", "vmwrite", "rbx, rax"),
    ("vmlaunch", "0f01c2", "vmlaunch", ""),
    ("vmresume", "0f01c3", "vmresume", ""),
    ("vmcall", "0f01c1", "vmcall", ""),
    ("invept rax, xmmword ptr [rbx]", "660f388003", "invept", "rax, xmmword ptr [rbx]"),
    ("vmcallr", VMCALLR_OPCODE.hex(), "vmcallr", ""),
]


@pytest.mark.parametrize("source, encoding, mnemonic, operands", VMX_INSTRUCTIONS)
def test_vmx_mnemonics_round_trip_through_the_disassembler(source, encoding, mnemonic, operands):
    image = assemble(f"{source}\nnop\n", BASE)
    decoded = instructions(image)
    assert decoded[0].raw.hex() == encoding
    assert (decoded[0].mnemonic, decoded[0].op_str) == (mnemonic, operands)
    assert decoded[1].text == "nop"  # decoding goes on after it


def test_vmcallr_in_listing_and_undecodable_bytes_do_not_stop_disassembly():
    image = assemble("entry: vmcall\n  vmcallr\n  .byte 0x06\n  VMCALLR\n  hlt\n", BASE)
    assert image.code == bytes.fromhex("0f01c1") + VMCALLR_OPCODE + b"\x06" + VMCALLR_OPCODE + b"\xf4"
    texts = [i.text for i in instructions(image)]
    assert texts == ["vmcall", "vmcallr", ".byte 0x06", "vmcallr", "hlt"]
    listing = image.disassemble(BASE, BASE + 5)
    assert listing[0].split() == ["0x100000", "entry", "0f", "01", "c1", "vmcall"]
    assert listing[1].split() == ["0x100003", "entry+0x3", "0f", "0a", "vmcallr"]
    with pytest.raises(AsmError, match="vmcallr takes no operands"):
        assemble("vmcallr rax\n", BASE)


def test_decoding_crosses_capstone_windows():
    image = assemble("mov rax, 0x123456789abcdef0\n" * 1000, BASE)
    decoded = instructions(image)
    assert len(decoded) == 1000
    assert all(i.text == "movabs rax, 0x123456789abcdef0" for i in decoded)


# --- RIP-relative and sign-extension checks -----------------------------------------------------------

def test_implicit_rip_relative_operand_is_refused():
    with pytest.raises(AsmError, match=r"r\.s:2: keystone encoded this memory operand RIP-relative") as caught:
        assemble("nop\nmov qword ptr [0x3000], 1\n", BASE, filename="r.s")
    assert "mov rax, ADDRESS" in str(caught.value)
    with pytest.raises(AsmError, match="RIP-relative"):
        assemble("%define SCRATCH 0x3000\nmov rbx, [SCRATCH]\n", BASE)


def test_register_and_explicit_rip_forms_are_accepted():
    image = assemble("mov rax, 0x3000\nmov qword ptr [rax], 1\nlea rsi, [rip + data]\nmov rdx, [rip + data]\n"
                     "data: .quad 5\n", BASE)
    store, load_address, load = instructions(image)[1:4]
    assert store.memory_operands()[0].mem.base == cs_x86.X86_REG_RAX
    assert load_address.target() == load.target() == image.symbol("data")


def test_absolute_label_operands_below_2_gib_are_correct():
    image = assemble("mov rbx, [data]\nlea rcx, [data]\nmov rdx, data\ndata: .quad 5\n", BASE)
    load, address, immediate = instructions(image)[:3]
    assert load.memory_operands()[0].mem.disp == image.symbol("data")
    assert address.memory_operands()[0].mem.disp == image.symbol("data")
    assert immediate.immediates() == [image.symbol("data")]


@pytest.mark.parametrize("line", ["mov rbx, [data]", "lea rcx, [data]", "mov rdx, data", "push data",
                                  "mov rax, [data + rcx*8]"])
def test_labels_above_2_gib_in_sign_extended_fields_are_refused(line):
    with pytest.raises(AsmError, match="at or above 2 GiB"):
        assemble(f"{line}\ndata: .quad 5\n", HIGH_BASE)


@pytest.mark.parametrize("line", ["mov rbx, [data]", "mov rdx, data"])
def test_labels_above_4_gib_in_32_bit_fields_are_refused_with_advice(line):
    with pytest.raises(AsmError, match=r"<source>:1: keystone: Invalid fixup.*\[rip \+ label\]"):
        assemble(f"{line}\ndata: .quad 5\n", VERY_HIGH_BASE)


@pytest.mark.parametrize("base", [BASE, HIGH_BASE, VERY_HIGH_BASE])
def test_rip_relative_and_movabs_work_at_any_base(base):
    image = assemble("lea rsi, [rip + data]\nmov rax, [rip + data]\nmovabs rcx, data\nmov rax, [data]\n"
                     "data: .quad 5\n", base)
    lea, load, absolute, moffs = instructions(image)[:4]
    data = image.symbol("data")
    assert lea.target() == load.target() == data
    assert absolute.immediates() == [data]
    assert moffs.memory_operands()[0].mem.disp == data  # mov rax-family, [label] is a 64-bit moffs


# --- image persistence and listing ----------------------------------------------------------------------

def test_json_round_trip_keeps_code_symbols_and_lines(tmp_path):
    image = assemble("start: mov eax, 1\nloop: dec eax\n  jnz loop\n  vmcallr\ntable: .quad start, loop\n",
                     0x20_0000, filename="rt.s")
    path = tmp_path / "image.json"
    image.save(path)
    loaded = Image.load(path)
    assert loaded == image
    assert loaded.symbols == {"start": 0x20_0000, "loop": 0x20_0005, "table": image.symbol("table")}
    assert loaded.disassemble() == image.disassemble()
    assert str(loaded.source_line(image.symbol("loop") + 1)) == "rt.s:2"
    assert json.loads(path.read_text())["symbols"]["loop"] == 0x20_0005
    assert Image.from_dict(json.loads(json.dumps(image.to_dict()))) == image
    with pytest.raises(AsmError, match="not an hhr-asm-image"):
        Image.from_dict({"format": "something else"})


def test_listing_shows_data_as_data_and_annotates_targets():
    image = assemble("entry: call helper\n  hlt\nhelper: ret\nbuffer: .zero 64\nvalues: .quad 1\n", BASE)
    listing = image.disassemble()
    assert listing[0].endswith("call 0x100006  <helper>")
    assert listing[3].split()[1:] == ["buffer"] + ["00"] * 8 + [".zero", "64"]
    assert listing[4].endswith(".byte 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00")


# --- layouts -----------------------------------------------------------------------------------------

def test_struct_offsets_alignment_and_pack_unpack():
    record = Struct("transfer", [("magic", 4), ("version", 2), ("flags", 2), ("base", 8), ("name", 16)], size=32)
    assert [record.offset(name) for name in ("magic", "version", "flags", "base", "name")] == [0, 4, 6, 8, 16]
    packed = record.pack(magic=0x48485221, version=3, base=0x1122334455667788, name=b"x" * 16)
    assert len(packed) == 32
    assert packed[:4] == (0x48485221).to_bytes(4, "little")
    assert record.unpack(packed) == {
        "magic": 0x48485221, "version": 3, "flags": 0, "base": 0x1122334455667788, "name": b"x" * 16,
    }
    with pytest.raises(LayoutError, match="not aligned to 8 bytes"):
        Struct("bad", [("small", 4), ("big", 8)])
    with pytest.raises(LayoutError, match="expected 0x20"):
        Struct("short", [("a", 8)], size=32)
    with pytest.raises(LayoutError, match="does not fit in 2 unsigned bytes"):
        record.pack(version=0x10000)
    with pytest.raises(LayoutError, match="has no field 'bogus'"):
        record.pack(bogus=1)
    with pytest.raises(LayoutError, match="is 32 bytes, got 31"):
        record.unpack(packed[:31])


# --- a program that runs -------------------------------------------------------------------------------

def test_assembled_program_runs_in_unicorn():
    result = Struct("result", [("sum", 8), ("count", 8)])
    source = """
%macro ACCUMULATE total, counter
%%next:
    add %total, %counter
    dec %counter
    jnz %%next
%endmacro
start:
    lea rsp, [rip + stack_top]
    xor eax, eax
    mov ecx, 100
    call sum_down
    lea rbx, [rip + results]
    mov [rbx + RESULT_SUM], rax
    mov qword ptr [rbx + RESULT_COUNT], 100
done:
    hlt
sum_down:
    ACCUMULATE rax, rcx
    ret
results: .zero RESULT_SIZE
    .align 16
stack: .zero 256
stack_top:
"""
    image = assemble(source, BASE, constants=result.constants())
    emulator = Uc(UC_ARCH_X86, UC_MODE_64)
    emulator.mem_map(BASE, 0x10000)
    emulator.mem_write(BASE, image.code)
    emulator.emu_start(image.symbol("start"), image.symbol("done"), count=10_000)
    assert emulator.reg_read(uc_x86.UC_X86_REG_RAX) == sum(range(1, 101)) == 5050
    stored = result.unpack(bytes(emulator.mem_read(image.symbol("results"), result.size)))
    assert stored == {"sum": 5050, "count": 100}


# --- speed -----------------------------------------------------------------------------------------------

def test_three_thousand_lines_assemble_quickly():
    body = "\n".join(
        f"L{i}: mov rax, [rbx + {i % 64 * 8}]\n  add rax, rcx\n  jne L{(i * 7) % 1000}" for i in range(1000)
    )
    started = time.perf_counter()
    image = assemble(body, BASE)
    elapsed = time.perf_counter() - started
    assert len(image.symbols) == 1000
    assert elapsed < 5.0  # about 0.2 s measured; generous for loaded test machines
