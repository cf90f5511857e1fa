"""Exercise 5: two VPs on one LP: two VMCSs, the VMX-preemption timer, and the state VM transitions leave to the hypervisor (x87/SSE, CR2, IA32_KERNEL_GS_BASE) saved and restored per VP."""
from __future__ import annotations

from asm.layout import Struct
from emu.vmx_defs import ExitReason, PinBasedControls
from tools.lab import checks, material, monitor_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 5
TIME_SLICE = 1000                 # VMX-preemption timer value: guest instructions per turn (IA32_VMX_MISC rate 0)
ROUNDS = (6, 12)                  # each guest sets its registers, waits and checks them this many times;
                                  # the second runs alone at the end, so a finished VP must not be resumed
SPIN = 1500                       # iterations of the wait (two instructions each): longer than a time slice
FXSAVE_AREA_BYTES = 512
CANONICAL_BITS = 47               # KERNEL_GS_BASE must be canonical (WRMSR refuses others)
# What the monitor keeps per VP. The FXSAVE area comes first: the VPs are 16-byte aligned.
VP = Struct("vp", [("fx_area", FXSAVE_AREA_BYTES), ("registers", monitor_run.GUEST_REGISTERS.size),
                   ("vmcs", 8), ("launched", 8), ("done", 8), ("cr2", 8), ("kernel_gs_base", 8)])
# Each guest's data in guest memory: its own values, the rounds it finished, what it found changed.
OWN_VALUES = Struct("own_values", [("xmm_low", 8), ("xmm_high", 8), ("cr2", 8), ("kernel_gs_base", 8),
                                   ("rounds", 8), ("rounds_wanted", 8), ("differed", 8)])
FIRST_GUEST_DATA = 0x9000         # guest-physical, in the RAM both guests share
SECOND_GUEST_DATA = 0xA000
DIFFERED = {"xmm": 1, "cr2": 2, "kernel_gs_base": 4}   # the bits a guest sets when it finds a register changed
REGISTER_NAMES = {"xmm": "XMM0", "cr2": "CR2", "kernel_gs_base": "IA32_KERNEL_GS_BASE"}
GUEST_TEMPLATE = """
    mov rbp, OWN_VALUES_ADDRESS
guest_round:
    movdqu xmm0, [rbp + OWN_VALUES_XMM_LOW]
    mov rax, [rbp + OWN_VALUES_CR2]
    mov cr2, rax
    mov ecx, IA32_KERNEL_GS_BASE
    mov eax, [rbp + OWN_VALUES_KERNEL_GS_BASE]
    mov edx, [rbp + OWN_VALUES_KERNEL_GS_BASE + 4]
    wrmsr
    mov ecx, LAB_SPIN
guest_wait:
    dec ecx
    jnz guest_wait
    movq rax, xmm0
    cmp rax, [rbp + OWN_VALUES_XMM_LOW]
    jne guest_xmm_differs
    movhlps xmm1, xmm0
    movq rax, xmm1
    cmp rax, [rbp + OWN_VALUES_XMM_HIGH]
    je guest_xmm_checked
guest_xmm_differs:
    or qword ptr [rbp + OWN_VALUES_DIFFERED], LAB_DIFFERED_XMM
guest_xmm_checked:
    mov rax, cr2
    cmp rax, [rbp + OWN_VALUES_CR2]
    je guest_cr2_checked
    or qword ptr [rbp + OWN_VALUES_DIFFERED], LAB_DIFFERED_CR2
guest_cr2_checked:
    mov ecx, IA32_KERNEL_GS_BASE
    rdmsr
    shl rdx, 32
    or rax, rdx
    cmp rax, [rbp + OWN_VALUES_KERNEL_GS_BASE]
    je guest_kernel_gs_base_checked
    or qword ptr [rbp + OWN_VALUES_DIFFERED], LAB_DIFFERED_KERNEL_GS_BASE
guest_kernel_gs_base_checked:
    inc qword ptr [rbp + OWN_VALUES_ROUNDS]
    mov rax, [rbp + OWN_VALUES_ROUNDS]
    cmp rax, [rbp + OWN_VALUES_ROUNDS_WANTED]
    jb guest_round
    hlt
"""


def _guest(data_constant: str) -> str:
    return GUEST_TEMPLATE.replace("OWN_VALUES_ADDRESS", data_constant)


def _prepare(machine, rng, values):
    """Each guest's own seeded values, in its data."""
    for address, rounds in zip((FIRST_GUEST_DATA, SECOND_GUEST_DATA), ROUNDS):
        machine.ram.write(values["guest_ram"] + address, OWN_VALUES.pack(
            xmm_low=rng.getrandbits(64), xmm_high=rng.getrandbits(64), cr2=rng.getrandbits(64),
            kernel_gs_base=rng.getrandbits(CANONICAL_BITS), rounds_wanted=rounds))
    return {}


SETUP = monitor_run.MonitorSetup(
    guest=_guest("LAB_FIRST_GUEST_DATA"), second_guest=_guest("LAB_SECOND_GUEST_DATA"), prepare=_prepare,
    constants={**VP.constants("LAB_VP"), **OWN_VALUES.constants(),
               "LAB_FIRST_GUEST_DATA": FIRST_GUEST_DATA, "LAB_SECOND_GUEST_DATA": SECOND_GUEST_DATA,
               "LAB_TIME_SLICE": TIME_SLICE, "LAB_SPIN": SPIN,
               **{f"LAB_DIFFERED_{name.upper()}": bit for name, bit in DIFFERED.items()}})


def _vmcs_regions(run) -> tuple[int, int]:
    return run.values["vmcs_region"], run.values["second_vmcs_region"]


def _guest_data(run, address: int) -> dict[str, int]:
    data = checks.ram_bytes(run, run.values["guest_ram"] + address, OWN_VALUES.size)
    return OWN_VALUES.unpack(data)


def _both_ran(run):
    entries = (run.values["guest_entry"], run.values["second_guest_entry"])
    for vmcs, entry in zip(_vmcs_regions(run), entries):
        checks.guest_entered(run, vmcs, entry)
        halts = [event for event in checks.vm_exits(run, ExitReason.HLT) if event.data["vmcs"] == vmcs]
        if len(halts) != 1:
            raise Expected(f"the guest of the VMCS at {vmcs:#x} to halt once and never run again",
                           f"{len(halts)} HLT exits")
    checks.ended_with(run, monitor_run.DONE_VALUE, "the run to end at lab_done once both guests halted")


def _preemption(run):
    for vmcs in _vmcs_regions(run):
        pin = checks.vmcs_field(run, vmcs, "PIN_BASED_VM_EXEC_CONTROL")
        timer = checks.vmcs_field(run, vmcs, "VMX_PREEMPTION_TIMER_VALUE")
        if not pin & PinBasedControls.ACTIVATE_VMX_PREEMPTION_TIMER or timer != TIME_SLICE:
            raise Expected(f"the VMCS at {vmcs:#x} with 'activate VMX-preemption timer' and the timer value "
                           f"{TIME_SLICE} (LAB_TIME_SLICE)", f"pin-based controls {pin:#x}, timer value {timer}")
    timer_exits = checks.vm_exits(run, ExitReason.PREEMPTION_TIMER)
    wanted = sum(ROUNDS)              # at least one per round of each guest's waiting
    if len(timer_exits) < wanted:
        raise Expected(f"at least {wanted} preemption-timer exits", f"{len(timer_exits)}")
    halted = set()
    following = {event.seq: event for event in run.events_of("vm-entry")}
    entries = sorted(following)
    for event in run.events:
        if event.kind == "vm-exit" and event.data["reason"] == ExitReason.HLT:
            halted.add(event.data["vmcs"])
        if event.kind != "vm-exit" or event.data["reason"] != ExitReason.PREEMPTION_TIMER:
            continue
        other = [vmcs for vmcs in _vmcs_regions(run) if vmcs != event.data["vmcs"]][0]
        later = [seq for seq in entries if seq > event.seq]
        if other not in halted and later and following[later[0]].data["vmcs"] != other:
            raise Expected(f"after a timer exit of the VMCS at {event.data['vmcs']:#x}, an entry to the other VMCS "
                           f"{other:#x}", f"an entry to {following[later[0]].data['vmcs']:#x}")


def _register_kept(name: str):
    def check(run):
        for number, (address, rounds) in enumerate(zip((FIRST_GUEST_DATA, SECOND_GUEST_DATA), ROUNDS), start=1):
            data = _guest_data(run, address)
            if data["rounds"] != rounds:
                raise Expected(f"guest {number} to finish its {rounds} rounds", f"{data['rounds']}")
            if data["differed"] & DIFFERED[name]:
                raise Expected(f"guest {number} to find its own {REGISTER_NAMES[name]} after every switch",
                               "it found another value (the other guest's, or the monitor's)")
    return check


EXERCISE = Exercise(
    number=NUMBER, slug="two-vps", title="Two VPs on one LP",
    summary="two VMCSs, the VMX-preemption timer, and FXSAVE, CR2 and KERNEL_GS_BASE saved and restored per VP",
    files=(monitor_run.SOURCE_FILE,),
    holes=(
        Hole(1, "Arm the VMX-preemption timer", "SDM 25.6.1, 26.5.1, A.6", """
With the pin-based control "activate VMX-preemption timer" (PIN_ACTIVATE_VMX_PREEMPTION_TIMER),
the timer counts down from VMX_PREEMPTION_TIMER_VALUE from every VM entry and causes a VM exit
(reason 52) when it reaches 0 (SDM 26.5.1). It counts at the TSC rate divided by 2^X, X being
IA32_VMX_MISC bits 4:0 (SDM A.6); on this machine X = 0 and it counts retired guest instructions
(docs/machine.md 7.12). Write the pin-based controls with vmcs_write_control (EAX =
VMCS_FIELD_PIN_BASED_VM_EXEC_CONTROL, ECX = IA32_VMX_PINBASED_CTLS, EBX = the control), then
VMWRITE LAB_TIME_SLICE into VMCS_FIELD_VMX_PREEMPTION_TIMER_VALUE. The field keeps its value
across exits (unless "save VMX-preemption timer value"), so each entry gets a full slice."""),
        Hole(2, "Save what the exit left in the processor", "SDM 28.3, 28.5; Vol. 1 10.5 FXSAVE", """
A VM exit saves the guest state the VMCS has fields for and loads the host state (SDM 28.3, 28.5):
nothing else. The x87/SSE registers, CR2 and MSRs such as IA32_KERNEL_GS_BASE still hold the
guest's values after the exit (docs/machine.md 7.4), and the next guest would see them. Save them
into the VP at RBX: `fxsave [rbx + LAB_VP_FX_AREA]` (512 bytes, 16-byte aligned), CR2 into [rbx +
LAB_VP_CR2], and RDMSR of IA32_KERNEL_GS_BASE (EDX:EAX) into [rbx + LAB_VP_KERNEL_GS_BASE]."""),
        Hole(3, "Load the incoming VP's registers", "SDM 27.3; Vol. 1 10.5 FXRSTOR", """
VM entry loads the guest state of the VMCS and nothing else either (SDM 27.3): before entering the
VP at RBX, give the processor what save_vp_state kept for it: `fxrstor [rbx + LAB_VP_FX_AREA]`,
CR2 from [rbx + LAB_VP_CR2] (MOV to CR2), and WRMSR of IA32_KERNEL_GS_BASE with EDX:EAX from [rbx
+ LAB_VP_KERNEL_GS_BASE]."""),
        Hole(4, "Switch to the other VP", "SDM 25.1, 31.3 VMPTRLD", """
Each VP has its own VMCS ([rbx + LAB_VP_VMCS]); VMREAD, VMWRITE and VMRESUME work on the current
one, and VMPTRLD makes another current (SDM 25.1). The two VPs are first_vp and second_vp: choose
the one that is not RBX, unless it has finished ([rax + LAB_VP_DONE] not 0), in which case the
current VP goes on. VMPTRLD its VMCS (jbe lab_failed), store it in [rip + current_vp] and return
it in RBX. enter_vp then VMLAUNCHes it the first time and VMRESUMEs it afterwards
(LAB_VP_LAUNCHED)."""),
    ),
    tests=(
        Test("two-vps", 10, "E#5-4", "both guests launched, each halted once", _both_ran),
        Test("preemption", 10, "E#5-1", "the preemption timer switches the VPs", _preemption),
        Test("xmm", 10, "E#5-2", "each guest kept its XMM registers", _register_kept("xmm")),
        Test("cr2", 10, "E#5-3", "each guest kept its CR2", _register_kept("cr2")),
        Test("kernel-gs-base", 10, "E#5-3", "each guest kept its IA32_KERNEL_GS_BASE",
             _register_kept("kernel_gs_base")),
    ),
    mistakes=(
        Mistake("E#5-1", "mov ebx, LAB_TIME_SLICE ", "mov ebx, LAB_TIME_SLICE * 1000 ", ("preemption",),
                "a time slice longer than a guest's whole run: no VP is ever preempted"),
        Mistake("E#5-2", "    fxsave [rbx + LAB_VP_FX_AREA]         ; x87, MXCSR, XMM0-XMM15: still the guest's\n", "",
                ("xmm",), "the x87/SSE state not saved at the exit"),
        Mistake("E#5-3", "    mov cr2, rax\n", "", ("cr2",), "CR2 not restored"),
        Mistake("E#5-3", "    wrmsr\n", "", ("kernel-gs-base",), "IA32_KERNEL_GS_BASE not restored"),
        Mistake("E#5-4", "    jne switch_vp_load                ; it has finished: the current one goes on\n", "",
                ("two-vps",), "a finished VP scheduled again"),
    ),
    prepare=material.prepare_monitor,
    run=lambda exercise, directory, seed: monitor_run.run(exercise, directory, seed, SETUP),
    includes=("support.inc", "vmx_on.inc", "vmcs_setup.inc"),
)
