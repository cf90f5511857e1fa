"""Exercise 3: exit handling: the exit-reason dispatch, CPUID (a hypervisor leaf and the processor's), guest I/O to the console, HLT, and the guest's RIP after an exit."""
from __future__ import annotations

from emu import cpuid
from emu.vmx_defs import ExitReason
from tools.lab import checks, material, monitor_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 3
HYPERVISOR_LEAF = 0x4000_0000             # SDM Vol. 2A CPUID: leaves 0x40000000-0x4FFFFFFF are reserved for software
SIGNATURE = b"HHRlabVM"                   # the hypervisor leaf's ECX:EDX
IGNORED_PORT = 0x80                       # the guest writes one byte here; the monitor must not forward it
IGNORED_BYTE = ord("!")
HEX_DIGITS = 16
VENDOR_LEAF = 0                           # CPUID leaf 0: the highest basic leaf and the vendor string
LAB_MACHINE_LPS = 1                       # the lab machine runs the monitor on one LP (LP 0)
GUEST = """
    mov eax, LAB_HYPERVISOR_LEAF
    cpuid
    mov r12d, ebx
    mov r13d, ecx
    mov r14d, edx
    lea rsi, [rip + text_hypervisor]
    call guest_print
    mov eax, r13d
    call guest_print4
    mov eax, r14d
    call guest_print4
    lea rsi, [rip + text_number]
    call guest_print
    mov eax, r12d
    call guest_print_hex
    lea rsi, [rip + text_end_of_line]
    call guest_print
    xor eax, eax
    xor ecx, ecx
    cpuid
    mov r12d, eax
    mov r13d, ebx
    mov r14d, edx
    mov r15d, ecx
    lea rsi, [rip + text_leaf0]
    call guest_print
    mov eax, r13d
    call guest_print4
    mov eax, r14d
    call guest_print4
    mov eax, r15d
    call guest_print4
    lea rsi, [rip + text_max]
    call guest_print
    mov eax, r12d
    call guest_print_hex
    lea rsi, [rip + text_end_of_line]
    call guest_print
    mov al, LAB_IGNORED_BYTE
    out LAB_IGNORED_PORT, al
guest_halt:
    hlt
guest_print:
    mov dx, COM1_BASE
guest_print_next:
    lodsb
    test al, al
    jz guest_print_done
    out dx, al
    jmp guest_print_next
guest_print_done:
    ret
guest_print4:
    mov ecx, 4
    mov dx, COM1_BASE
guest_print4_next:
    out dx, al
    shr eax, 8
    dec ecx
    jnz guest_print4_next
    ret
guest_print_hex:
    mov rbx, rax
    mov dx, COM1_BASE
    mov al, '0'
    out dx, al
    mov al, 'x'
    out dx, al
    mov ecx, 16
guest_print_hex_digit:
    rol rbx, 4
    mov al, bl
    and al, 0xF
    add al, '0'
    cmp al, '9'
    jbe guest_print_hex_out
    add al, 'a' - '0' - 10
guest_print_hex_out:
    out dx, al
    dec ecx
    jnz guest_print_hex_digit
    ret
text_hypervisor:
    .asciz "hypervisor: "
text_number:
    .asciz " number "
text_leaf0:
    .asciz "leaf 0: "
text_max:
    .asciz " max "
text_end_of_line:
    .asciz "\\n"
"""
SETUP = monitor_run.MonitorSetup(guest=GUEST, constants={
    "LAB_HYPERVISOR_LEAF": HYPERVISOR_LEAF,
    "LAB_SIGNATURE_ECX": int.from_bytes(SIGNATURE[:4], "little"),
    "LAB_SIGNATURE_EDX": int.from_bytes(SIGNATURE[4:], "little"),
    "LAB_IGNORED_PORT": IGNORED_PORT, "LAB_IGNORED_BYTE": IGNORED_BYTE})
GUEST_CPUIDS = 2


def _hypervisor_line(run) -> str:
    return f"hypervisor: {SIGNATURE.decode()} number {run.values['challenge']:#0{HEX_DIGITS + 2}x}"


def _leaf0_line() -> str:
    max_leaf, ebx, ecx, edx = cpuid.cpuid(VENDOR_LEAF, 0, 0, LAB_MACHINE_LPS)
    vendor = b"".join(value.to_bytes(4, "little") for value in (ebx, edx, ecx)).decode()
    return f"leaf 0: {vendor} max {max_leaf:#0{HEX_DIGITS + 2}x}"


def _guest_outs(run) -> int:
    """The guest's OUT instructions: one per byte of its two lines, and the ignored one."""
    return len(_hypervisor_line(run)) + 1 + len(_leaf0_line()) + 1 + 1


def _dispatch(run):
    match = checks.console_matches(run, r"guest halted; VM exits: 0x([0-9a-f]+)$",
                                   "'guest halted; VM exits: N' from handle_hlt: the HLT exit dispatched to it")
    exits = len(run.events_of("vm-exit"))
    if int(match.group(1), 16) != exits:
        raise Expected(f"{exits} VM exits counted", match.group(0))
    checks.ended_with(run, monitor_run.DONE_VALUE, "the run to end at lab_done after the guest's HLT")


def _hypervisor_leaf(run):
    line = _hypervisor_line(run)
    checks.console_matches(run, f"^{line}$", f"the guest to print '{line}': leaf {HYPERVISOR_LEAF:#x} answered "
                           f"with EBX = the challenge and ECX:EDX = the signature {SIGNATURE.decode()!r}")


def _pass_through(run):
    line = _leaf0_line()
    checks.console_matches(run, f"^{line}$", f"the guest to print '{line}': leaf 0 as the processor answers it")
    found = len(checks.vm_exits(run, ExitReason.CPUID))
    if found != GUEST_CPUIDS:
        raise Expected(f"{GUEST_CPUIDS} CPUID exits, one per guest CPUID", f"{found}")


def _io(run):
    if chr(IGNORED_BYTE) in run.console:
        raise Expected(f"the guest's byte to port {IGNORED_PORT:#x} not forwarded to COM1",
                       f"{chr(IGNORED_BYTE)!r} on the console")
    for start in ("hypervisor: ", "leaf 0: "):
        checks.console_matches(run, f"^{start}", f"the guest's line starting '{start}' on the console")
    found = len(checks.vm_exits(run, ExitReason.IO_INSTRUCTION))
    if found != _guest_outs(run):
        raise Expected(f"{_guest_outs(run)} I/O exits, one per guest OUT", f"{found}")


def _guest_rip(run):
    halt = run.extra["guest_image"].symbol("guest_halt")
    halts = checks.vm_exits(run, ExitReason.HLT)
    if len(halts) != 1 or halts[0].data["rip"] != halt:
        came = ", ".join(f"{event.data['rip']:#x}" for event in halts) or run.summary()
        raise Expected(f"one HLT exit, at the guest's HLT ({halt:#x}): each exit resumed the guest right after "
                       f"the instruction that exited", f"HLT exits at {came}")


EXERCISE = Exercise(
    number=NUMBER, slug="exits", title="Exit handling",
    summary="the exit-reason dispatch, CPUID (a hypervisor leaf and the processor's), I/O to the console, HLT, "
            "the guest's RIP",
    files=(monitor_run.SOURCE_FILE,),
    holes=(
        Hole(1, "Dispatch on the exit reason", "SDM 25.9.1, Appendix C", """
The exit reason is in the VM_EXIT_REASON field (VMCS_FIELD_VM_EXIT_REASON): bits 15:0 hold the
basic exit reason, the other bits are flags, bit 31 a VM-entry failure (SDM 25.9.1). VMREAD it
(`vmread rax, rcx` with the field's encoding in RCX), keep bits 15:0 (EXIT_REASON_BASIC_MASK) and
compare with the numbers of SDM Appendix C: EXIT_REASON_CPUID (10), EXIT_REASON_IO_INSTRUCTION
(30), EXIT_REASON_HLT (12). Jump to handle_cpuid, handle_io or handle_hlt; any other reason goes
to unknown_exit with the reason in RAX."""),
        Hole(2, "Emulate CPUID", "SDM 26.1.2, Vol. 2A CPUID", """
CPUID always exits in VMX non-root operation (SDM 26.1.2): the guest sees what the monitor writes
into its RAX, RBX, RCX and RDX (in guest_registers: the exit handler saved them and loads them
back before VMRESUME). The guest asks for leaf EAX (and subleaf ECX). Leaves 0x40000000 and up are
free for software: for LAB_HYPERVISOR_LEAF answer EAX = LAB_HYPERVISOR_LEAF (the highest
hypervisor leaf), EBX = the challenge ([r15 + LAB_INFO_CHALLENGE]), ECX = LAB_SIGNATURE_ECX, EDX =
LAB_SIGNATURE_EDX. For any other leaf execute CPUID yourself with the guest's EAX and ECX and give
the guest what it returns. `mov qword ptr [rip + guest_registers + GUEST_REGISTERS_RAX], VALUE`
writes a guest register."""),
        Hole(3, "Forward guest output on COM1", "SDM 26.1.3, 28.2.1 Table 28-5", """
With "unconditional I/O exiting" every IN and OUT of the guest exits (SDM 26.1.3). The exit
qualification (VMCS_FIELD_EXIT_QUALIFICATION, SDM Table 28-5) describes the access: bits 2:0 the
size - 1, bit 3 the direction (IO_QUAL_DIRECTION_IN: 1 = IN), bits 31:16 the port
(IO_QUAL_PORT_SHIFT). For an OUT to COM1_BASE, write the guest's AL (its saved RAX) to COM1
yourself: `mov dx, COM1_BASE` and `out dx, al`. Ignore every other access: the guest also writes
to another port, and that byte must not reach the console."""),
        Hole(4, "Move the guest past the instruction that exited", "SDM 28.2.4, 27.3.2", """
After a CPUID, I/O or HLT exit, GUEST_RIP still points at the instruction that caused it: it has
not executed (SDM 28.2). VM entry continues the guest at GUEST_RIP, so a monitor that emulated the
instruction must add its length, which the exit left in VM_EXIT_INSTRUCTION_LEN (SDM 28.2.4):
VMREAD both, add, VMWRITE GUEST_RIP. (Do not assume a length: CPUID is 2 bytes, OUT DX, AL 1, OUT
imm8, AL 2.)"""),
    ),
    tests=(
        Test("dispatch", 10, "E#3-1", "the exit reason dispatched; HLT ends the run", _dispatch),
        Test("cpuid-leaf", 10, "E#3-2", "CPUID: the hypervisor leaf", _hypervisor_leaf),
        Test("cpuid-passthrough", 10, "E#3-2", "CPUID: other leaves from the processor", _pass_through),
        Test("io", 10, "E#3-3", "guest OUT to COM1 forwarded, other ports not", _io),
        Test("rip", 10, "E#3-4", "the guest resumed after each exiting instruction", _guest_rip),
    ),
    mistakes=(
        Mistake("E#3-1", "je handle_hlt", "je unknown_exit", ("dispatch",),
                "HLT sent to the unknown-reason path"),
        Mistake("E#3-2", "mov rbx, [r15 + LAB_INFO_CHALLENGE]", "mov rbx, [r15 + LAB_INFO_SEED]", ("cpuid-leaf",),
                "the hypervisor leaf answers the seed, not the challenge"),
        Mistake("E#3-2", "    jne cpuid_pass_through\n", "", ("cpuid-passthrough",),
                "every leaf answered as the hypervisor leaf"),
        Mistake("E#3-3", "    jne io_done                       ; another port: ignored\n", "", ("io",),
                "every port forwarded to the console"),
        Mistake("E#3-4", "    vmread rbx, rcx\n", "    mov ebx, 2\n",
                ("dispatch", "cpuid-leaf", "cpuid-passthrough", "io", "rip"),
                "a fixed instruction length of 2 instead of VM_EXIT_INSTRUCTION_LEN"),
    ),
    prepare=material.prepare_monitor,
    run=lambda exercise, directory, seed: monitor_run.run(exercise, directory, seed, SETUP),
    includes=("support.inc", "vmx_on.inc", "vmcs_setup.inc", "guest_registers.inc"),
)
