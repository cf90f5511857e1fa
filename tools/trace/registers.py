"""The registers a trace records for every instruction, read from a Unicorn instance in one C call."""
from __future__ import annotations

import ctypes

from unicorn import x86_const as x86
from unicorn.unicorn_py3 import unicorn as uc_binding

from emu import fast

# Name and Unicorn id, in the order traces print them (the general registers, then RIP, RFLAGS and
# the control registers a hypervisor hand-off changes).
TRACED_REGISTERS = (
    ("rax", x86.UC_X86_REG_RAX), ("rbx", x86.UC_X86_REG_RBX), ("rcx", x86.UC_X86_REG_RCX),
    ("rdx", x86.UC_X86_REG_RDX), ("rsi", x86.UC_X86_REG_RSI), ("rdi", x86.UC_X86_REG_RDI),
    ("rbp", x86.UC_X86_REG_RBP), ("rsp", x86.UC_X86_REG_RSP), ("r8", x86.UC_X86_REG_R8),
    ("r9", x86.UC_X86_REG_R9), ("r10", x86.UC_X86_REG_R10), ("r11", x86.UC_X86_REG_R11),
    ("r12", x86.UC_X86_REG_R12), ("r13", x86.UC_X86_REG_R13), ("r14", x86.UC_X86_REG_R14),
    ("r15", x86.UC_X86_REG_R15), ("rip", x86.UC_X86_REG_RIP), ("rflags", x86.UC_X86_REG_RFLAGS),
    ("cr0", x86.UC_X86_REG_CR0), ("cr3", x86.UC_X86_REG_CR3), ("cr4", x86.UC_X86_REG_CR4),
)
REGISTER_NAMES = tuple(name for name, _ in TRACED_REGISTERS)
RIP_INDEX = REGISTER_NAMES.index("rip")
REGISTER_COUNT = len(TRACED_REGISTERS)

_read_batch = fast.ffi.cast("int (*)(void *, int *, void **, int)",
                            ctypes.cast(uc_binding.uclib.uc_reg_read_batch, ctypes.c_void_p).value)
_REGISTER_IDS = fast.ffi.new("int[]", [register for _, register in TRACED_REGISTERS])


class RegisterReader:
    """All TRACED_REGISTERS of one instance as a tuple, in about two microseconds."""

    def __init__(self, uc):
        self._handle = fast.uc_handle(uc)
        self._values = fast.ffi.new("uint64_t[]", REGISTER_COUNT)
        self._pointers = fast.ffi.new("void *[]", [self._values + index for index in range(REGISTER_COUNT)])

    def read(self) -> tuple[int, ...]:
        _read_batch(self._handle, _REGISTER_IDS, self._pointers, REGISTER_COUNT)
        return tuple(self._values)


def changed(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[str, int]]:
    """The registers whose value differs, as (name, new value), in TRACED_REGISTERS order."""
    if before == after:
        return []
    return [(name, value) for name, old, value in zip(REGISTER_NAMES, before, after) if old != value]
