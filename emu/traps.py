"""The one table of trapped instructions and VM exits: where each is caught, its exit reason, the control that decides, and what carries it out."""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from functools import lru_cache

from asm.isa import VMCALLR_OPCODE
from emu.ports import DEBUG_EXIT_PORT
from emu.vmx_defs import ExitReason, PinBasedControls, PrimaryProcessorControls

# Capstone prints a REP/REPE/REPNE prefix as part of the mnemonic ("rep outsb").
REPEAT_PREFIXES = ("rep ", "repe ", "repne ", "repz ", "repnz ")
CR3_REGISTER_NAME = "cr3"


def base_mnemonic(mnemonic: str) -> str:
    """The mnemonic without a repeat prefix: "rep outsb" -> "outsb"."""
    for prefix in REPEAT_PREFIXES:
        if mnemonic.startswith(prefix):
            return mnemonic[len(prefix):]
    return mnemonic


class Catch(enum.Enum):
    """How a context of one kind gets hold of an instruction before (or instead of) Unicorn running it."""

    NATIVE = "runs natively"             # Unicorn executes it; the machine is not involved
    EXIT_POINT = "exit point"            # emu/decode.scan_block puts a Unicorn exit point in front of it:
    #                                      the run stops there (context.STOP_TRAPPED_INSTRUCTION)
    INVALID_OPCODE = "#UD"               # Unicorn does not know it: UC_HOOK_INSN_INVALID (C first, then Python)
    HOOK = "instruction hook"            # a Unicorn instruction hook of emu/context.py carries it out in place
    STOPS_AFTER = "stops after it"       # Unicorn runs it and the run ends (HLT: context.STOP_HLT)
    EVENT = "event"                      # not an instruction: a condition between or during instructions


class Decision(enum.Enum):
    """What decides whether a guest's instruction or event causes a VM exit (SDM Vol. 3C 26.1, 26.2)."""

    ALWAYS = "always"                    # SDM 26.1.2: instructions that cause VM exits unconditionally
    NEVER = "never"                      # no control on this machine makes it exit
    CONTROL = "the control is 1"         # one VM-execution control bit (SDM 26.1.3)
    MSR_BITMAP = "MSR bitmaps"           # "use MSR bitmaps" 0, or the MSR's bit (SDM 25.6.9, 26.1.3)
    IO_BITMAP = "I/O bitmaps"            # "use I/O bitmaps" and its bitmaps, else "unconditional I/O exiting"
    EXCEPTION_BITMAP = "exception bitmap"   # the vector's bit in EXCEPTION_BITMAP (SDM 25.6.3)


@dataclass(frozen=True)
class FastPath:
    """Where the C transition loop (emu/fastpath.c) carries out this exit instead of Python: the C
    function that recognises it, and the hhr_transition_constants members of its exit reason and
    deciding controls (filled from this table by emu/vmcs.py, checked by tests/test_traps.py)."""

    function: str
    reason_constant: str
    control_constants: tuple[str, ...] = ()
    # The C function that, during an inverse hypercall, carries out the instruction's return of the
    # call instead of its exit (docs/machine.md 8.3 step 11), if the loop does.
    inverse_call_return: str | None = None


@dataclass(frozen=True)
class Trap:
    """One row: a trapped instruction (or an event) and everything the machine does with it."""

    name: str                                   # as the SDM names it
    root: Catch                                 # how root mode catches it
    guest: Catch                                # how a guest catches it
    exit_reason: ExitReason | None              # the guest's VM exit (None: it never exits)
    decision: Decision                          # what decides whether the guest exits
    controls: tuple[enum.IntEnum, ...] = ()     # the VM-execution controls the decision reads
    emulation: str | None = None                # "module:function" that carries it out without an exit
    fast_path: FastPath | None = None           # the C loop's share of the exit
    fast_emulation: str | None = None           # the C function that carries it out in root mode
    mnemonics: frozenset[str] = frozenset()     # capstone's mnemonics, repeat prefixes stripped
    operands_start: str = ""                    # only with operands that start ...
    operands_end: str = ""                      # ... or end like this (capstone's text)
    opcode: bytes = b""                         # for an instruction capstone does not know
    sdm: str = ""

    @property
    def is_instruction(self) -> bool:
        return self.guest is not Catch.EVENT

    def matches(self, mnemonic: str, op_str: str) -> bool:
        """Whether an instruction capstone printed as `mnemonic op_str` is this row's."""
        if self.operands_start or self.operands_end:
            return mnemonic in self.mnemonics and op_str.startswith(self.operands_start) and \
                op_str.endswith(self.operands_end)
        return base_mnemonic(mnemonic) in self.mnemonics


def _vmx_instruction(mnemonic: str, reason: ExitReason, fast_emulation: str | None = None) -> Trap:
    """A VMX instruction: #UD in Unicorn, carried out by emu/vmx.py in root mode, an unconditional
    exit in a guest (SDM Vol. 3C 26.1.2)."""
    return Trap(mnemonic.upper(), Catch.INVALID_OPCODE, Catch.INVALID_OPCODE, reason, Decision.ALWAYS,
                emulation="emu.vmx:VmxUnit.execute", fast_emulation=fast_emulation,
                mnemonics=frozenset({mnemonic}), sdm="Vol. 3C 26.1.2, 31.3")


_IO = dict(root=Catch.HOOK, guest=Catch.EXIT_POINT, exit_reason=ExitReason.IO_INSTRUCTION,
           decision=Decision.IO_BITMAP,
           controls=(PrimaryProcessorControls.USE_IO_BITMAPS, PrimaryProcessorControls.UNCONDITIONAL_IO_EXITING),
           sdm="Vol. 3C 26.1.3, 25.6.4")

CPUID = Trap("CPUID", Catch.HOOK, Catch.EXIT_POINT, ExitReason.CPUID, Decision.ALWAYS,
             emulation="emu.cpuid:cpuid", mnemonics=frozenset({"cpuid"}),
             fast_path=FastPath("hhr_run_transitions", "exit_reason_cpuid"), sdm="Vol. 3C 26.1.2")
HLT = Trap("HLT", Catch.STOPS_AFTER, Catch.EXIT_POINT, ExitReason.HLT, Decision.CONTROL,
           (PrimaryProcessorControls.HLT_EXITING,), emulation="emu.trap_emulation:halt",
           mnemonics=frozenset({"hlt"}),
           fast_path=FastPath("hhr_run_transitions", "exit_reason_hlt", ("hlt_exiting_control",)),
           sdm="Vol. 3C 26.1.3")
# The debug-exit write is trapped in root mode too, so that the machine stops right after it.
DEBUG_EXIT_OUT = Trap("OUT imm8 to the debug-exit port", **{**_IO, "root": Catch.EXIT_POINT},
                      emulation="emu.trap_emulation:port_io", mnemonics=frozenset({"out"}),
                      operands_start=f"{DEBUG_EXIT_PORT:#x},",
                      fast_path=FastPath("io_exit", "exit_reason_io",
                                         ("io_bitmaps_control", "unconditional_io_control")))
IN_OUT = Trap("IN, OUT", **_IO, emulation="emu.trap_emulation:port_io", mnemonics=frozenset({"in", "out"}),
              fast_path=FastPath("io_exit", "exit_reason_io", ("io_bitmaps_control", "unconditional_io_control")))
STRING_IO = Trap("INS, OUTS (REP too)", **_IO, emulation="emu.trap_emulation:port_io",
                 mnemonics=frozenset({"insb", "insw", "insd", "outsb", "outsw", "outsd"}))
RDMSR = Trap("RDMSR", Catch.EXIT_POINT, Catch.EXIT_POINT, ExitReason.RDMSR, Decision.MSR_BITMAP,
             (PrimaryProcessorControls.USE_MSR_BITMAPS,), emulation="emu.trap_emulation:rdmsr",
             mnemonics=frozenset({"rdmsr"}), sdm="Vol. 3C 26.1.3, 25.6.9")
WRMSR = Trap("WRMSR", Catch.EXIT_POINT, Catch.EXIT_POINT, ExitReason.WRMSR, Decision.MSR_BITMAP,
             (PrimaryProcessorControls.USE_MSR_BITMAPS,), emulation="emu.trap_emulation:wrmsr",
             mnemonics=frozenset({"wrmsr"}), sdm="Vol. 3C 26.1.3, 25.6.9")
RDTSC = Trap("RDTSC", Catch.EXIT_POINT, Catch.EXIT_POINT, ExitReason.RDTSC, Decision.CONTROL,
             (PrimaryProcessorControls.RDTSC_EXITING,), emulation="emu.trap_emulation:rdtsc",
             mnemonics=frozenset({"rdtsc"}), sdm="Vol. 3C 26.1.3")
RDTSCP = Trap("RDTSCP", Catch.EXIT_POINT, Catch.EXIT_POINT, ExitReason.RDTSCP, Decision.CONTROL,
              (PrimaryProcessorControls.RDTSC_EXITING,), emulation="emu.trap_emulation:rdtsc",
              mnemonics=frozenset({"rdtscp"}), sdm="Vol. 3C 26.1.3")
# No "RDRAND exiting" or "RDSEED exiting" on this machine (docs/machine.md 7.1): they never exit.
RDRAND_RDSEED = Trap("RDRAND, RDSEED", Catch.EXIT_POINT, Catch.EXIT_POINT, None, Decision.NEVER,
                     emulation="emu.trap_emulation:rdrand", mnemonics=frozenset({"rdrand", "rdseed"}),
                     sdm="Vol. 2B RDRAND, RDSEED")
XSETBV = Trap("XSETBV", Catch.NATIVE, Catch.EXIT_POINT, ExitReason.XSETBV, Decision.ALWAYS,
              mnemonics=frozenset({"xsetbv"}), sdm="Vol. 3C 26.1.2")
INVD = Trap("INVD", Catch.NATIVE, Catch.EXIT_POINT, ExitReason.INVD, Decision.ALWAYS,
            mnemonics=frozenset({"invd"}), sdm="Vol. 3C 26.1.2")
# MOV to CR3 is trapped in root mode too, so that every address-space switch is an exact event.
MOV_TO_CR3 = Trap("MOV to CR3", Catch.EXIT_POINT, Catch.EXIT_POINT, ExitReason.CR_ACCESS, Decision.CONTROL,
                  (PrimaryProcessorControls.CR3_LOAD_EXITING,), emulation="emu.trap_emulation:mov_to_cr3",
                  mnemonics=frozenset({"mov"}), operands_start=CR3_REGISTER_NAME + ",",
                  sdm="Vol. 3C 26.1.3 (no CR3-target values)")
MOV_FROM_CR3 = Trap("MOV from CR3", Catch.NATIVE, Catch.EXIT_POINT, ExitReason.CR_ACCESS, Decision.CONTROL,
                    (PrimaryProcessorControls.CR3_STORE_EXITING,), emulation="emu.trap_emulation:mov_from_cr3",
                    mnemonics=frozenset({"mov"}), operands_end=", " + CR3_REGISTER_NAME, sdm="Vol. 3C 26.1.3")
# VMCALL in a guest during an inverse hypercall ends the call instead (docs/machine.md 8.3).
VMCALL = Trap("VMCALL", Catch.INVALID_OPCODE, Catch.INVALID_OPCODE, ExitReason.VMCALL, Decision.ALWAYS,
              emulation="emu.vmx:VmxUnit.execute", mnemonics=frozenset({"vmcall"}),
              fast_path=FastPath("hhr_guest_invalid_instruction", "exit_reason_vmcall",
                                 inverse_call_return="return_from_inverse_call"), sdm="Vol. 3C 26.1.2")
VMX_INSTRUCTIONS = (
    _vmx_instruction("vmclear", ExitReason.VMCLEAR), _vmx_instruction("vmlaunch", ExitReason.VMLAUNCH),
    _vmx_instruction("vmptrld", ExitReason.VMPTRLD), _vmx_instruction("vmptrst", ExitReason.VMPTRST),
    _vmx_instruction("vmread", ExitReason.VMREAD, "hhr_invalid_instruction"),
    _vmx_instruction("vmresume", ExitReason.VMRESUME, "hhr_invalid_instruction"),
    _vmx_instruction("vmwrite", ExitReason.VMWRITE, "hhr_invalid_instruction"),
    _vmx_instruction("vmxoff", ExitReason.VMXOFF), _vmx_instruction("vmxon", ExitReason.VMXON),
    _vmx_instruction("invept", ExitReason.INVEPT), _vmx_instruction("invvpid", ExitReason.INVVPID),
    _vmx_instruction("vmfunc", ExitReason.VMFUNC),
)
VMCALLR = Trap("VMCALLR (machine-specific)", Catch.INVALID_OPCODE, Catch.INVALID_OPCODE, ExitReason.VMCALLR,
               Decision.ALWAYS, emulation="emu.vmx:VmxUnit.vmcallr", fast_emulation="enter_inverse_call",
               opcode=VMCALLR_OPCODE, sdm="docs/machine.md 8")

# Exits that no instruction causes (docs/machine.md 7.8.4, 7.9.2, 7.11, 7.12).
EVENTS = (
    Trap("exception", Catch.EVENT, Catch.EVENT, ExitReason.EXCEPTION_NMI, Decision.EXCEPTION_BITMAP,
         sdm="Vol. 3C 26.2, 25.6.3"),
    Trap("external interrupt", Catch.EVENT, Catch.EVENT, ExitReason.EXTERNAL_INTERRUPT, Decision.CONTROL,
         (PinBasedControls.EXTERNAL_INTERRUPT_EXITING,), sdm="Vol. 3C 26.2, 25.6.1"),
    Trap("triple fault", Catch.EVENT, Catch.EVENT, ExitReason.TRIPLE_FAULT, Decision.ALWAYS, sdm="Vol. 3C 26.2"),
    Trap("interrupt window", Catch.EVENT, Catch.EVENT, ExitReason.INTERRUPT_WINDOW, Decision.CONTROL,
         (PrimaryProcessorControls.INTERRUPT_WINDOW_EXITING,), sdm="Vol. 3C 26.7.5"),
    Trap("EPT violation", Catch.EVENT, Catch.EVENT, ExitReason.EPT_VIOLATION, Decision.ALWAYS,
         sdm="Vol. 3C 29.3.3.2"),
    Trap("EPT misconfiguration", Catch.EVENT, Catch.EVENT, ExitReason.EPT_MISCONFIG, Decision.ALWAYS,
         sdm="Vol. 3C 29.3.3.1"),
    Trap("VMX-preemption timer expired", Catch.EVENT, Catch.EVENT, ExitReason.PREEMPTION_TIMER, Decision.CONTROL,
         (PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER,),
         fast_path=FastPath("hhr_run_transitions", "exit_reason_preemption_timer", ("preemption_timer_control",)),
         sdm="Vol. 3C 26.5.1"),
    Trap("VM-entry failure: invalid guest state", Catch.EVENT, Catch.EVENT, ExitReason.INVALID_GUEST_STATE,
         Decision.ALWAYS, sdm="Vol. 3C 27.8"),
    Trap("VM-entry failure: MSR loading", Catch.EVENT, Catch.EVENT, ExitReason.MSR_LOADING, Decision.ALWAYS,
         sdm="Vol. 3C 27.8"),
    Trap("guest cannot continue (machine-specific)", Catch.EVENT, Catch.EVENT, ExitReason.GUEST_CANNOT_CONTINUE,
         Decision.ALWAYS, sdm="docs/machine.md 7.9.2"),
)

# Operand forms come before the plain mnemonics they narrow (the debug-exit OUT before IN, OUT).
INSTRUCTIONS: tuple[Trap, ...] = (
    CPUID, HLT, DEBUG_EXIT_OUT, IN_OUT, STRING_IO, RDMSR, WRMSR, RDTSC, RDTSCP, RDRAND_RDSEED, XSETBV, INVD,
    MOV_TO_CR3, MOV_FROM_CR3, VMCALL, *VMX_INSTRUCTIONS, VMCALLR,
)
TABLE: tuple[Trap, ...] = INSTRUCTIONS + EVENTS


# --- views of the table for the parts that follow it ---------------------------------------------------
def caught_by(guest: bool, catch: Catch) -> tuple[Trap, ...]:
    """The instructions a context of that kind catches in that way."""
    return tuple(trap for trap in INSTRUCTIONS if (trap.guest if guest else trap.root) is catch)


def trapped_mnemonics(guest: bool) -> frozenset[str]:
    """Mnemonics trapped at an exit point whatever their operands."""
    return frozenset(mnemonic for trap in caught_by(guest, Catch.EXIT_POINT)
                     if not (trap.operands_start or trap.operands_end) for mnemonic in trap.mnemonics)


def trapped_operand_forms(guest: bool) -> tuple[Trap, ...]:
    """Rows trapped at an exit point only with particular operands (MOV to CR3, the debug-exit OUT)."""
    return tuple(trap for trap in caught_by(guest, Catch.EXIT_POINT) if trap.operands_start or trap.operands_end)


@lru_cache(maxsize=1 << 12)
def exit_point_trap(mnemonic: str, op_str: str, guest: bool) -> Trap:
    """The row of an instruction a context of that kind stopped at (its exit point)."""
    for trap in caught_by(guest, Catch.EXIT_POINT):
        if trap.matches(mnemonic, op_str):
            return trap
    raise LookupError(f"{mnemonic} {op_str} is not trapped at an exit point")


INVALID_OPCODE_MNEMONICS = {mnemonic: trap for trap in INSTRUCTIONS if trap.guest is Catch.INVALID_OPCODE
                            for mnemonic in trap.mnemonics}


def invalid_opcode_trap(mnemonic: str) -> Trap | None:
    """The row of an instruction Unicorn raised #UD for (a VMX instruction), or None (a real #UD)."""
    return INVALID_OPCODE_MNEMONICS.get(mnemonic)


@lru_cache(maxsize=None)
def resolve(path: str):
    """The function a row names as "module:qualified.name"."""
    module_name, _, qualified = path.partition(":")
    target = importlib.import_module(module_name)
    for part in qualified.split("."):
        target = getattr(target, part)
    return target


# --- the manual's view (docs/machine.md 7.9.4, checked by tests/test_traps.py) ---------------------------
def _decided_by(trap: Trap) -> str:
    if trap.decision in (Decision.ALWAYS, Decision.NEVER) or not trap.controls:
        return trap.decision.value
    controls = " or ".join(f"`{control.name}`" for control in trap.controls)
    return controls if trap.decision is Decision.CONTROL else f"{trap.decision.value}: {controls}"


def _in_c(fast_path: FastPath | None) -> str:
    if fast_path is None:
        return ""
    if fast_path.inverse_call_return is None:
        return f"`{fast_path.function}`"
    return f"`{fast_path.function}`; the return of an inverse hypercall: `{fast_path.inverse_call_return}`"


def manual_table() -> str:
    """The table as docs/machine.md 7.9.4 shows it."""
    lines = ["| instruction or event | root | guest | exit reason | exits when | without an exit | exit in C "
             "| root in C | SDM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for trap in TABLE:
        reason = f"{int(trap.exit_reason)} {trap.exit_reason.name}" if trap.exit_reason is not None else "none"
        lines.append(" | ".join((
            f"| {trap.name}", trap.root.value, trap.guest.value, reason, _decided_by(trap),
            f"`{trap.emulation}`" if trap.emulation else "none",
            _in_c(trap.fast_path),
            f"`{trap.fast_emulation}`" if trap.fast_emulation else "", trap.sdm)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(manual_table(), end="")
