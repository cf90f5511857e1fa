"""The registers a trace records for every instruction: their names, in the order traces print them, and Unicorn ids."""
from __future__ import annotations

from unicorn import x86_const as x86


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
