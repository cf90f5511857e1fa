"""The one x86-64 target description the stub serves (as QEMU's i386-64bit.xml: general, segment, x87, SSE, fs_base/gs_base and the control registers), and how each of its registers is read and written in an execution context."""
from __future__ import annotations

from dataclasses import dataclass

from unicorn import x86_const as x86

from emu import fast
from emu.vmx_defs import MSR_IA32_EFER

X87_SSE = fast.lib.HHR_SHARED_X87_SSE   # classes of the state an LP's root and guests share (docs/machine.md 7.4)
SCALARS = fast.lib.HHR_SHARED_SCALARS
FLOAT80_BYTES = 10
MANTISSA_BYTES = 8


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    unicorn: int | None                 # a Unicorn register id; None: the MSR `msr`
    shared: int | None = None           # the shared class that holds it, if the LP's contexts share it
    msr: int | None = None
    kind: str = "int"                   # int, float80, vector
    group: str | None = None            # gdb's register group when not the general one

    @property
    def size(self) -> int:
        return self.bits // 8


def _reg(name: str, bits: int, unicorn: int | None, **details) -> Register:
    return Register(name, bits, unicorn, **details)


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{n}" for n in range(8, 16))
_X87_CONTROL = (("fctrl", x86.UC_X86_REG_FPCW), ("fstat", x86.UC_X86_REG_FPSW), ("ftag", x86.UC_X86_REG_FPTAG),
                ("fiseg", x86.UC_X86_REG_FCS), ("fioff", x86.UC_X86_REG_FIP), ("foseg", x86.UC_X86_REG_FDS),
                ("fooff", x86.UC_X86_REG_FDP), ("fop", x86.UC_X86_REG_FOP))

REGISTERS: tuple[Register, ...] = (
    tuple(_reg(name, 64, getattr(x86, f"UC_X86_REG_{name.upper()}")) for name in _GPRS)
    + (_reg("rip", 64, x86.UC_X86_REG_RIP), _reg("eflags", 32, x86.UC_X86_REG_EFLAGS))
    + tuple(_reg(name, 32, getattr(x86, f"UC_X86_REG_{name.upper()}")) for name in ("cs", "ss", "ds", "es", "fs", "gs"))
    + tuple(_reg(f"st{n}", 80, getattr(x86, f"UC_X86_REG_FP{n}"), shared=X87_SSE, kind="float80", group="float")
            for n in range(8))
    + tuple(_reg(name, 32, unicorn, shared=X87_SSE, group="float") for name, unicorn in _X87_CONTROL)
    + tuple(_reg(f"xmm{n}", 128, getattr(x86, f"UC_X86_REG_XMM{n}"), shared=X87_SSE, kind="vector", group="vector")
            for n in range(16))
    + (_reg("mxcsr", 32, x86.UC_X86_REG_MXCSR, shared=X87_SSE, group="vector"),
       _reg("fs_base", 64, x86.UC_X86_REG_FS_BASE), _reg("gs_base", 64, x86.UC_X86_REG_GS_BASE),
       _reg("cr0", 64, x86.UC_X86_REG_CR0, group="system"),
       _reg("cr2", 64, x86.UC_X86_REG_CR2, shared=SCALARS, group="system"),
       _reg("cr3", 64, x86.UC_X86_REG_CR3, group="system"), _reg("cr4", 64, x86.UC_X86_REG_CR4, group="system"),
       _reg("cr8", 64, x86.UC_X86_REG_CR8, group="system"),
       _reg("efer", 64, None, msr=MSR_IA32_EFER, group="system"))
)
# gdb's types for the registers that are not plain integers (gdb's own 64bit-core.xml and 64bit-sse.xml).
_TDESC_TYPES = {"rip": "code_ptr", "rsp": "data_ptr", "rbp": "data_ptr", "eflags": "i386_eflags"}
_TDESC_KIND_TYPES = {"float80": "i387_ext", "vector": "vec128"}
BY_NAME = {register.name: number for number, register in enumerate(REGISTERS)}
G_PACKET_BYTES = sum(register.size for register in REGISTERS)


def _tdesc_reg(register: Register, number: int) -> str:
    kind = _TDESC_TYPES.get(register.name, _TDESC_KIND_TYPES.get(register.kind, "int"))
    group = f' group="{register.group}"' if register.group else ""
    return f'<reg name="{register.name}" bitsize="{register.bits}" type="{kind}" regnum="{number}"{group}/>'


def _feature(name: str, body: list[str]) -> str:
    return f'<feature name="{name}">' + "".join(body) + "</feature>"


def target_xml() -> str:
    """The description gdb asks for with qXfer:features:read:target.xml (one document, no includes)."""
    regs = [_tdesc_reg(register, number) for number, register in enumerate(REGISTERS)]
    core_end = BY_NAME["fop"] + 1
    sse_end = BY_NAME["mxcsr"] + 1
    segments_end = BY_NAME["gs_base"] + 1
    eflags = ('<flags id="i386_eflags" size="4">'
              + "".join(f'<field name="{name}" start="{bit}" end="{bit}"/>' for bit, name in
                        ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
                         (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
                         (20, "VIP"), (21, "ID")))
              + "</flags>")
    vectors = ('<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
               '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
               '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
               '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
               '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
               '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
               '<field name="uint128" type="uint128"/></union>')
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
            "<architecture>i386:x86-64</architecture>"
            + _feature("org.gnu.gdb.i386.core", [eflags] + regs[:core_end])
            + _feature("org.gnu.gdb.i386.sse", [vectors] + regs[core_end:sse_end])
            + _feature("org.gnu.gdb.i386.segments", regs[sse_end:segments_end])
            + _feature("org.hhr.x86.system", regs[segments_end:])
            + "</target>")


class RegisterAccess:
    """The registers of one context as its LP sees them: what the LP's contexts share (x87/SSE, CR2)
    is read from and written to the instance that holds it now, so that nothing moves."""

    def __init__(self, context, holder_of):
        self.context = context
        self._holder_of = holder_of     # shared class: the context that holds it

    def _where(self, register: Register):
        return self.context if register.shared is None else self._holder_of(register.shared)

    def read(self, number: int) -> bytes:
        register = REGISTERS[number]
        context = self._where(register)
        if register.msr is not None:
            value = context.uc.msr_read(register.msr)
        elif register.kind == "float80":
            mantissa, exponent = context.uc.reg_read(register.unicorn)
            return mantissa.to_bytes(MANTISSA_BYTES, "little") + \
                (exponent & 0xFFFF).to_bytes(FLOAT80_BYTES - MANTISSA_BYTES, "little")
        else:
            value = context.uc.reg_read(register.unicorn)
        return (value & ((1 << register.bits) - 1)).to_bytes(register.size, "little")

    def write(self, number: int, data: bytes) -> None:
        register = REGISTERS[number]
        if len(data) != register.size:
            raise ValueError(f"{register.name} takes {register.size} bytes, not {len(data)}")
        context = self._where(register)
        if register.kind == "float80":
            context.uc.reg_write(register.unicorn, (int.from_bytes(data[:MANTISSA_BYTES], "little"),
                                                    int.from_bytes(data[MANTISSA_BYTES:], "little")))
            return
        value = int.from_bytes(data, "little")
        if register.msr is not None:
            context.uc.msr_write(register.msr, value)
        else:
            context.uc.reg_write(register.unicorn, value)

    def read_all(self) -> bytes:
        return b"".join(self.read(number) for number in range(len(REGISTERS)))

    def write_all(self, data: bytes) -> None:
        if len(data) != G_PACKET_BYTES:
            raise ValueError(f"a G packet carries {G_PACKET_BYTES} bytes, not {len(data)}")
        offset = 0
        for number, register in enumerate(REGISTERS):
            self.write(number, data[offset:offset + register.size])
            offset += register.size
