"""Exercise 8: devirtualization: on every LP the old hypervisor switches to the new page tables, leaves VMX operation and jumps into the new hypervisor, which enters VMX operation with its own region and launches the guests from VMCSs of its own."""
from __future__ import annotations

from hypervisors import transfer
from tools.lab import checks, hypervisor_run, material, restart_checks
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 8
RESTART_SOURCE = "hypervisors/common/restart.inc"
SERVICE_SOURCE = "hypervisors/common/service.inc"
LPS = (2,)                               # every LP hands over, not only the one that drives the restart
RUNNING = "running"                      # a VP's state at the blackout (tools/blackout.py) that must run on
NEW_PAGE_TABLES = "hv_cr3"               # the new hypervisor's PML4 (data.inc)


def _lps(run) -> range:
    return range(run.extra["scenario"].lps)


def _after_devirtualize(run) -> list:
    """The events from the DEVIRTUALIZE phase on."""
    for index, event in enumerate(run.events):
        if event.kind == "restart-phase" and event.data["phase"] == transfer.Phase.DEVIRTUALIZE:
            return run.events[index:]
    raise Expected("the restart to reach its DEVIRTUALIZE phase", restart_checks.describe_ending(
        restart_checks.restart(run, -1)) + f"; {run.summary()}")


def _left_vmx(run):
    events = _after_devirtualize(run)
    counts = [sum(1 for event in events if event.kind == "vmxoff" and event.lp == lp) for lp in _lps(run)]
    if counts != [1] * len(counts):
        raise Expected("one VMXOFF on every LP after the commit",
                       ", ".join(f"LP {lp}: {count}" for lp, count in enumerate(counts)))


def _new_page_tables(run):
    restart_checks.document(run)                 # (a run that did not happen says why)
    booted, image = run.extra["booted"], run.extra["images"][run.extra["scenario"].to_hypervisor]
    if booted.hypervisor != run.extra["scenario"].to_hypervisor:
        raise Expected(f"{run.extra['scenario'].to_hypervisor} to have taken over", booted.hypervisor)
    wanted = run.machine.ram.read_u64(booted.image_base + image.symbol(NEW_PAGE_TABLES) - image.base)
    for lp in _lps(run):
        cr3 = checks.root_register(run, "cr3", lp)
        if cr3 != wanted:
            raise Expected(f"LP {lp}'s root CR3 = the new hypervisor's page tables {wanted:#x}", f"CR3 = {cr3:#x}")


def _entered_vmx_again(run):
    events = _after_devirtualize(run)
    booted = run.extra["booted"]
    region = (booted.image_base, booted.image_base + transfer.SERVICE_REGION_SIZE)
    for lp in _lps(run):
        ours = [event for event in events if event.lp == lp and event.kind in ("vmxoff", "vmxon")]
        kinds = [event.kind for event in ours]
        if kinds[:2] != ["vmxoff", "vmxon"]:
            raise Expected(f"LP {lp}: VMXOFF, then VMXON by the new hypervisor", " ".join(kinds) or "neither")
        vmxon = ours[1].data
        if not vmxon["ok"] or not region[0] <= vmxon["region"] < region[1]:
            raise Expected(f"LP {lp}: a VMXON that succeeds, on a region inside the new hypervisor's memory "
                           f"[{region[0]:#x}, {region[1]:#x})",
                           f"VMXON on {vmxon['region']:#x}, {'succeeded' if vmxon['ok'] else 'failed'}")


def _every_vp_back(run):
    restart_checks.committed(run)
    missing = [vp for vp in restart_checks.restart(run, -1)["blackout"]["per_vp"]
               if vp["state"] == RUNNING and vp["blackout_ticks"] is None]
    if missing:
        came = "never entered again: " + ", ".join(f"partition {vp['partition']} VP {vp['vp']} (LP {vp['lp']})"
                                                   for vp in missing)
        if all(vp["lp"] != 0 for vp in missing):
            came += " (only VPs of the other LPs: did they leave takeover_wait, E#8-2?)"
        raise Expected("every VP that was running at the blackout entered again under the new hypervisor", came)


EXERCISE = Exercise(
    number=NUMBER, slug="devirtualize", title="Devirtualization",
    summary="CR3 switch, VMXOFF and the jump on every LP; VMXON, a VMCS per VP and the first VM entries of the new side",
    files=(RESTART_SOURCE, SERVICE_SOURCE),
    includes=(),
    holes=(
        Hole(1, "Leave VMX operation for the new hypervisor: CR3, VMXOFF, the jump", "SDM 31.3 VMXOFF; SDM 4.10.4.1", """
Past the commit every LP comes here (R15 = its index). The new hypervisor's take-over entry
(new_takeover) expects RDI = the LP index and RSI = its boot info (service_boot), CR3 = its own
page tables (new_cr3, the COMMIT reply), VMX off and IF = 0. Load what you need from memory first:
once CR3 changes, this code runs on the new tables (they map all RAM to itself, so the next
instruction is still there). MOV to CR3 (SDM 4.10.4.1), then VMXOFF (SDM 31.3: leaves VMX
operation; the old VMXON region and VMCSs are no longer the processor's), then JMP to the entry."""),
        Hole(2, "The take-over on every LP: VMXON, LP 0 finishes, the others wait", "SDM 24.7, 31.3 VMXON", """
Each LP runs this with its own stack and descriptor tables; VMX is off. Enter VMX operation with
this hypervisor's own VMXON region: `call enable_vmx` (cpu.inc: CR4.VMXE, the region's revision
identifier, VMXON). Then LP 0 (R15 = 0) makes the VMCSs (`call takeover_finish`), sets boot_done
to 1 and goes to the scheduler (`jmp schedule`); every other LP waits (PAUSE in a loop) until
boot_done is 1, then goes to the scheduler. The scheduler launches each VP: VMLAUNCH when its
VP_LAUNCHED is 0, VMRESUME otherwise."""),
        Hole(3, "A VMCS of the new hypervisor for every VP, from its image", "SDM 25.11.3, 25.11.5, 31.3 VMPTRLD, VMWRITE", """
RSI = a VP record, R12 = its number. Make its VMCS the current one, fresh (load_fresh_vmcs:
revision identifier, VMCLEAR, VMPTRLD; SDM 25.11.3), with RBP = its partition (VP_PARTITION) for
write_vm_controls (this hypervisor's controls and the partition's EPTP) and write_host_state (this
LP's host state). Then VMWRITE every field of its VMCS image (vmcs_images[R12], one qword per
field of vmcs_transfer_fields, VMCS_TRANSFER_FIELD_COUNT of them; a failed VMWRITE: jbe panic).
A VMCS just cleared is not launched (SDM 25.11.3): its first entry must be VMLAUNCH, so set
VP_LAUNCHED to 0. VMCLEAR it (release_vmcs) so any LP can load it."""),
    ),
    tests=(
        Test("vmxoff", 10, "E#8-1", "every LP left VMX operation once", _left_vmx),
        Test("cr3", 5, "E#8-1", "every LP on the new page tables", _new_page_tables),
        Test("vmxon", 10, "E#8-2", "every LP entered VMX operation again", _entered_vmx_again),
        Test("vps", 10, "E#8-3", "every VP entered again under the new hypervisor", _every_vp_back),
        Test("guests", 15, "E#8-3", "guests' output as without a restart", restart_checks.guests_as_in_reference),
    ),
    mistakes=(
        Mistake("E#8-1", "    mov cr3, rax\n", "", ("cr3",), "the old page tables kept"),
        Mistake("E#8-2", "    mov qword ptr [rip + boot_done], 1\n", "", ("vps", "guests"),
                "the other LPs never released"),
        Mistake("E#8-3", "mov dword ptr [rsi + VP_LAUNCHED], 0", "mov dword ptr [rsi + VP_LAUNCHED], 1",
                ("vps", "guests"), "VMRESUME on a VMCS that was never launched"),
    ),
    prepare=material.prepare_hypervisor,
    run=lambda exercise, directory, seed: hypervisor_run.run(
        exercise, directory, seed, hypervisor_run.seeded_scenario(seed, lps=LPS, required=(hypervisor_run.LONG_GUEST,))),
)
