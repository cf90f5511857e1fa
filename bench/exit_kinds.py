"""Host cost of one VM-exit round trip for each kind of exit, with the C transition loop and on the Python path, side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from emu.machine import Machine
from emu.memory import MIB
from emu.ports import TIMER_ARM_PORT, TIMER_PERIOD_PORT, TIMER_VECTOR_PORT
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES as CAPS
from emu.vmx_defs import ExitReason, PinBasedControls
from hypervisors import bare_monitor

EXITS_PER_KIND = 2_000
INSTRUCTIONS_PER_EXIT_BOUND = 1_000   # far more than a round trip retires: a runaway loop stops
UNMAPPED_GPA = 0x1000_0000            # in the guest's identity-mapped first GiB, beyond the bare monitor's EPT
LOAD_THROUGH_RSI_LENGTH = 3           # mov rax, [rsi]: 48 8B 06
MSR_IA32_TSC = 0x10
EXIT_PORT = 0x80
PREEMPTION_TIMER_TICKS = 1            # the guest runs (1 << rate) instructions between timer exits
INTERRUPT_VECTOR = 0x40
INTERRUPT_PERIOD = 50                 # ticks between the LP timer's interrupts


@dataclass(frozen=True)
class ExitKind:
    """A guest that causes one kind of exit over and over, and what its VMCS needs for it."""

    name: str
    reason: ExitReason
    guest: str                                  # loops forever; the monitor counts its exits
    pin: int = 0
    fields: dict[str, int] = field(default_factory=dict)
    rip_advance: int = 0                        # added to GUEST_RIP beyond the exit's instruction length
    before: str = ""                            # guest code run once before the loop (a VMCALL may arm a timer)


KINDS = (
    ExitKind("CPUID", ExitReason.CPUID, "cpuid"),
    ExitKind("VMCALL", ExitReason.VMCALL, "vmcall"),
    ExitKind("I/O (OUT imm8)", ExitReason.IO_INSTRUCTION, f"out {EXIT_PORT:#x}, al"),
    ExitKind("HLT (HLT exiting)", ExitReason.HLT, "hlt"),
    ExitKind("RDMSR (no MSR bitmaps)", ExitReason.RDMSR, "rdmsr", before=f"mov ecx, {MSR_IA32_TSC:#x}"),
    ExitKind("EPT violation", ExitReason.EPT_VIOLATION, "mov rax, [rsi]", rip_advance=LOAD_THROUGH_RSI_LENGTH,
             before=f"mov rsi, {UNMAPPED_GPA:#x}"),
    ExitKind("VMX-preemption timer", ExitReason.PREEMPTION_TIMER, "nop",
             pin=PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER,
             fields={"VMX_PREEMPTION_TIMER_VALUE": PREEMPTION_TIMER_TICKS}),
    ExitKind("external interrupt (LP timer)", ExitReason.EXTERNAL_INTERRUPT, "nop",
             pin=PinBasedControls.EXTERNAL_INTERRUPT_EXITING, before="vmcall"),
)


def _vmread(register: str, name: str) -> str:
    return f"  mov r14, {bare_monitor.ENCODING[name]:#x}\n  vmread {register}, r14"


def _advance_guest_rip(length: int) -> str:
    """Monitor code moving GUEST_RIP past an instruction the exit reports no length for."""
    if not length:
        return ""
    return f"""{_vmread("r12", "GUEST_RIP")}
      add r12, {length}
      mov r14, {bare_monitor.ENCODING['GUEST_RIP']:#x}
      vmwrite r14, r12"""


def counting_exit_handler(kind: ExitKind) -> str:
    """Monitor code run first at each exit: an exit of `kind` decrements the guest's R9 (handed to
    root at the exit and back at the entry), ends the machine at zero, else skips the exiting
    instruction and resumes. The first VMCALL of the external-interrupt guest arms a periodic LP timer."""
    arm_timer = ""
    if kind.reason == ExitReason.EXTERNAL_INTERRUPT:
        arm_timer = f"""
      cmp r13, {int(ExitReason.VMCALL)}
      jne bench_counted
      mov dx, {TIMER_VECTOR_PORT:#x}
      mov eax, {INTERRUPT_VECTOR:#x}
      out dx, eax
      mov dx, {TIMER_PERIOD_PORT:#x}
      mov eax, {INTERRUPT_PERIOD}
      out dx, eax
      mov dx, {TIMER_ARM_PORT:#x}
      out dx, eax
      jmp bench_resume
    bench_counted:"""
    return f"""
    {_vmread("r13", "VM_EXIT_REASON")}
    {arm_timer}
      cmp r13, {int(kind.reason)}
      jne bench_not_counted
      dec r9
      jnz bench_skip
      xor eax, eax
      out 0xF4, al
    bench_skip:
    {_advance_guest_rip(kind.rip_advance)}
    bench_resume:
    {_vmread("r13", "GUEST_RIP")}
    {_vmread("r12", "VM_EXIT_INSTRUCTION_LEN")}
      add r13, r12
      mov r14, {bare_monitor.ENCODING['GUEST_RIP']:#x}
      vmwrite r14, r13
      vmresume
    bench_not_counted:
    """


def round_trip(kind: ExitKind, exits: int = EXITS_PER_KIND, *, fast_transitions: bool = True) -> float:
    """Host microseconds per exit of `kind` handled by the bare monitor's monitor (VMREADs, a VMWRITE,
    VMRESUME), with the C transition loop on or off."""
    guest = bare_monitor.assemble(f"""
      mov r9, {exits}
      {kind.before}
    again:
      {kind.guest}
      jmp again
    """, bare_monitor.GUEST_CODE)
    fields = bare_monitor.guest_fields(pin=kind.pin) | kind.fields
    machine = Machine(ram_size=bare_monitor.GUEST_HOST_BASE + bare_monitor.GUEST_RAM + 16 * MIB, lps=1,
                      fast_transitions=fast_transitions)
    machine.ram.write_u32(bare_monitor.VMXON_REGION, CAPS.vmcs_revision_id)
    machine.ram.write_u32(bare_monitor.VMCS_REGION, CAPS.vmcs_revision_id)
    bare_monitor.write_guest_memory(machine, guest)
    monitor = bare_monitor.monitor_source(fields, on_exit=counting_exit_handler(kind))
    machine.load(bare_monitor.MONITOR_CODE, bare_monitor.assemble(monitor, bare_monitor.MONITOR_CODE))
    machine.start(bare_monitor.MONITOR_CODE, [bare_monitor.MONITOR_STACK_TOP])
    started = time.perf_counter()
    result = machine.run(max_instructions=exits * INSTRUCTIONS_PER_EXIT_BOUND)
    seconds = time.perf_counter() - started
    made = machine.statistics()["exits_by_reason"].get(int(kind.reason), 0)
    if result.stop.reason != "debug-exit" or made < exits:
        raise RuntimeError(f"the {kind.name} loop did not run as built ({made} exits): {result.stop}")
    return seconds / exits * 1e6


def measure(exits: int = EXITS_PER_KIND) -> dict[str, dict[str, float]]:
    """Per kind: microseconds per round trip with the C loop ("c_loop_us") and without ("python_us")."""
    return {kind.name: {"c_loop_us": round_trip(kind, exits, fast_transitions=True),
                        "python_us": round_trip(kind, exits, fast_transitions=False)} for kind in KINDS}
