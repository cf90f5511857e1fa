"""What the C recorder asks of capstone: which traced registers an instruction may write (its written registers, implicit ones included, and RFLAGS unless it affects no flag), so that only those are read after it inside a block; the instructions whose effects the machine makes are read whole."""
from __future__ import annotations

import ctypes

import capstone
from capstone import x86_const as x86

from emu import fast
from tools.trace.registers import REGISTER_NAMES

ffi, lib = fast.ffi, fast.lib

# Every capstone register name that is part of a traced register (sub-registers write their whole
# register: a 32-bit write zero-extends, SDM Vol. 1 3.4.1.1; an 8- or 16-bit one changes its value).
_PARTS = {
    "rax": ("AL", "AH", "AX", "EAX", "RAX"), "rbx": ("BL", "BH", "BX", "EBX", "RBX"),
    "rcx": ("CL", "CH", "CX", "ECX", "RCX"), "rdx": ("DL", "DH", "DX", "EDX", "RDX"),
    "rsi": ("SIL", "SI", "ESI", "RSI"), "rdi": ("DIL", "DI", "EDI", "RDI"), "rbp": ("BPL", "BP", "EBP", "RBP"),
    "rsp": ("SPL", "SP", "ESP", "RSP"), "rip": ("IP", "EIP", "RIP"), "rflags": ("EFLAGS",),
    "cr0": ("CR0",), "cr3": ("CR3",), "cr4": ("CR4",),
    **{f"r{n}": (f"R{n}B", f"R{n}W", f"R{n}D", f"R{n}") for n in range(8, 16)},
}
# Instructions whose register effects come from the machine (a hook, a trap, a VM transition) or
# that capstone may not describe fully: every traced register is read after them (moves to control
# registers are in the privileged group).
_READ_WHOLE = ("IN", "INSB", "INSW", "INSD", "OUT", "OUTSB", "OUTSW", "OUTSD", "CPUID", "RDMSR", "WRMSR", "RDTSC",
               "RDTSCP", "RDRAND", "RDSEED", "RDPID", "SYSCALL", "SYSRET", "SYSENTER", "SYSEXIT", "HLT", "UD2", "UD0",
               "UD1", "INT", "INT1", "INT3", "INTO", "IRET", "IRETD", "IRETQ", "XSAVE", "XSAVEOPT", "XRSTOR", "XSETBV",
               "FXRSTOR", "FXRSTOR64", "LGDT", "LIDT", "LLDT", "LTR", "INVLPG",
               "WBINVD", "INVD", "CLTS", "LMSW", "SWAPGS", "WRFSBASE", "WRGSBASE", "VERR", "VERW", "LAR", "LSL")
_GROUPS = ("X86_GRP_PRIVILEGE", "X86_GRP_INT", "X86_GRP_IRET", "X86_GRP_VM")
# Instructions whose "Flags Affected" section in the SDM (Vol. 2) reads "None": RFLAGS is not read
# after them inside a block. Capstone's register lists cannot say this: they leave the flags out of
# some instructions that do affect them (TEST with a memory operand), so RFLAGS is read after every
# other instruction.
_CONDITIONS = ("A", "AE", "B", "BE", "E", "G", "GE", "L", "LE", "NE", "NO", "NP", "NS", "O", "P", "S")
_CONDITIONAL_JUMPS = (*(f"J{condition}" for condition in _CONDITIONS), "JRCXZ")
# Instructions that end their block (branches, PAUSE, each iteration of a REP string instruction)
# and whose register effects the SDM gives in full (Vol. 2A CALL, Jcc, JMP, CMPS, LODS, MOVS;
# Vol. 2B PAUSE, RET, SCAS, STOS; RCX as a REP prefix counts it, Vol. 2B REP): the recorder reads
# only these (and RIP, and RFLAGS unless they affect no flag) at the start of the block that follows
# them, instead of every register. CALL pushes, near or far, so RSP (capstone leaves it out of a far
# CALL's writes); a far JMP changes CS and RIP only (no task switch in IA-32e mode); RETF, IRET and
# the rest are read whole. (MOVSD and CMPSD are also SSE2 instructions, which write none of these.)
_STRING_WRITES = {"CMPS": ("rsi", "rdi", "rcx"), "LODS": ("rax", "rsi", "rcx"), "MOVS": ("rsi", "rdi", "rcx"),
                  "SCAS": ("rdi", "rcx"), "STOS": ("rdi", "rcx")}
_BLOCK_END_WRITES = {"JMP": (), "CALL": ("rsp",), "RET": ("rsp",), "PAUSE": (),
                     **{name: () for name in _CONDITIONAL_JUMPS},
                     **{f"{string}{size}": written for string, written in _STRING_WRITES.items() for size in "BWDQ"}}
_FLAGS_KEPT = ("MOV", "MOVABS", "MOVZX", "MOVSX", "MOVSXD", "LEA", "PUSH", "POP", "NOP", "XCHG", "BSWAP", "LEAVE",
               "NOT", "CBW", "CWDE", "CDQE", "CWD", "CDQ", "CQO", "MOVSB", "MOVSW", "MOVSD", "MOVSQ", "STOSB",
               "STOSW", "STOSD", "STOSQ", "LODSB", "LODSW", "LODSD", "LODSQ",
               *(f"CMOV{condition}" for condition in _CONDITIONS), *(f"SET{condition}" for condition in _CONDITIONS),
               "JMP", "CALL", "RET", "PAUSE", *_CONDITIONAL_JUMPS)


def _function(name: str, signature: str):
    return ffi.cast(signature, ctypes.cast(getattr(capstone._cs, name), ctypes.c_void_p).value)


class Decoder:
    """An hhr_decoder (emu/tracepath.h) for the recorder, with the capstone handle it uses."""

    def __init__(self):
        self._capstone = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._capstone.detail = True
        d = self.state = ffi.new("hhr_decoder *")
        d.handle = self._capstone.csh.value
        d.disasm = _function("cs_disasm", "size_t (*)(size_t, const uint8_t *, size_t, uint64_t, size_t, void **)")
        d.free = _function("cs_free", "void (*)(void *, size_t)")
        d.regs_access = _function("cs_regs_access",
                                  "int (*)(size_t, const void *, uint16_t *, uint8_t *, uint16_t *, uint8_t *)")
        d.in_group = _function("cs_insn_group", "bool (*)(size_t, const void *, unsigned int)")
        for bit, name in enumerate(REGISTER_NAMES):
            for part in _PARTS[name]:
                d.register_bits[getattr(x86, f"X86_REG_{part}")] |= 1 << bit
        for name in _READ_WHOLE:
            identifier = getattr(x86, f"X86_INS_{name}", None)
            if identifier is not None and identifier < lib.HHR_DECODER_INSTRUCTION_LIMIT:
                d.read_all[identifier] = 1
        for name in _FLAGS_KEPT:
            d.flags_kept[getattr(x86, f"X86_INS_{name}")] = 1
        for name, written in _BLOCK_END_WRITES.items():
            d.block_end_writes[getattr(x86, f"X86_INS_{name}")] = sum(1 << REGISTER_NAMES.index(register)
                                                                      for register in ("rip", *written))
        for index, name in enumerate(_GROUPS):
            d.groups[index] = getattr(x86, name)
        d.group_count = len(_GROUPS)
