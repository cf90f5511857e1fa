"""A VP's state beyond the VMCS (hypervisors/vp_state.py): each VP's x87/SSE state, CR2, debug registers
and shared MSRs kept apart on a shared LP, guest RDMSR/WRMSR served and refused as a processor would,
and all of it carried by every kind of hot restart (the vpstate guest checks its own values)."""
from __future__ import annotations

import pytest

from emu import msrs
from emu.vmx_defs import ExitReason
from guests import catalog
from hypervisors import boot, build, transfer, vp_state
from tools import restart as restart_module
from tools import run as run_module

GUESTS = ["vpstate,vps=3,mem=8M", "counter,mem=4M"]     # three VPs with their own values; a neighbour
LPS = 2                                                # VPs 0 and 2 of vpstate share LP 0 with counter
REQUEST_AT = 4_000_000                                 # while the VPs are in their checks
DIRECTIONS = [("hv1", "hv2"), ("hv2", "hv1"), ("hv1", "hv1"), ("hv2", "hv2")]
MODES = ["precopy", "stop-and-copy", "suspend"]
SWITCHING_RUN = 10_000_000                              # about 500 slices of counters on one LP
MSR_BITMAP_BYTES = 4096
RETURN = b"\xc3"
BOOTED_BEFORE_FIRST_SWITCH = 10_000                     # the VPs are made; none has left its LP yet
INTACT = "vp 0: intact\nvp 1: intact\nvp 2: intact\nrefused with #GP: 7 of 7\n"


def vpstate_guest(document: dict) -> dict:
    return next(guest for guest in document["guests"] if guest["name"] == "vpstate")


@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
def test_vps_sharing_an_lp_keep_their_own_state_and_msr_refusals_are_general_protection(hypervisor):
    """Two VPs of vpstate and counter on one LP, a third on the other: every VP finds every value it
    set (the LP switches x87/SSE, CR2, DR0-DR3 and the MSRs with the VP), and VP 0's seven WRMSR and
    RDMSR a processor refuses each raise #GP(0)."""
    document = run_module.run(hypervisor, GUESTS, lps=LPS).document
    guest = vpstate_guest(document)
    assert guest["console"] == INTACT and guest["exit_code"] == 0, guest
    assert document["exits_by_reason"].get("RDMSR", 0) > 0 and document["exits_by_reason"].get("WRMSR", 0) > 0


@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
def test_rdmsr_passes_by_the_msr_bitmap_and_is_served_the_same_when_it_exits(hypervisor):
    """The MSR bitmap lets vpstate's RDMSRs of served MSRs run without an exit (only its RDMSR of an
    MSR there is none of exits); with every bit of the bitmap set, each exits and the hypervisor's
    handler gives the same values."""
    document = run_module.run(hypervisor, GUESTS, lps=LPS).document
    assert document["exits_by_reason"]["RDMSR"] == 1
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor=hypervisor, lps=LPS)
    booted.machine.run(max_instructions=BOOTED_BEFORE_FIRST_SWITCH)
    booted.machine.ram.write(booted.msr_bitmap, b"\xff" * MSR_BITMAP_BYTES)
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    exiting = run_module.document(booted, result, LPS)
    assert exiting["exits_by_reason"]["RDMSR"] > 1000
    guest = vpstate_guest(exiting)
    assert guest["console"] == INTACT and guest["exit_code"] == 0, guest


@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
def test_without_the_switch_the_guest_sees_its_state_change(hypervisor):
    """The control: with load_vp_state patched to return at once, VPs sharing an LP see each other's
    values, and vpstate says which (so the test above could fail)."""
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor=hypervisor, lps=LPS)
    booted.machine.ram.write(booted.symbol("load_vp_state"), RETURN)
    result = booted.machine.run(max_instructions=run_module.DEFAULT_INSTRUCTION_LIMIT)
    guest = vpstate_guest(run_module.document(booted, result, LPS))
    assert guest["exit_code"] == 1
    assert "changed: x87 mxcsr xmm cr2 dr0 dr1 dr2 dr3 kernel_gs_base" in guest["console"], guest["console"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source, target", DIRECTIONS)
def test_a_restart_carries_every_vps_state(source, target, mode):
    """In the middle of vpstate's checks the hypervisor is replaced (or the guests suspended and
    resumed): no VP sees any value change, and VP_STATE records crossed for every VP."""
    document = restart_module.restart(source, target, GUESTS, lps=LPS, request_at=REQUEST_AT, mode=mode)
    restart = document["restart"]
    assert restart["outcome"] in ("committed", "resumed"), restart
    assert restart["records_sent"]["vp_state"] >= 4, restart["records_sent"]   # every VP of both guests
    guest = vpstate_guest(document)
    assert guest["console"] == INTACT and guest["exit_code"] == 0, guest


def test_each_vp_starts_with_the_state_a_processor_has_after_reset():
    """VP records as boot leaves them: FXSAVE image of FNINIT with MXCSR 0x1F80, DR6 0xFFFF0FF0,
    IA32_PAT at its power-up value, IA32_TSC_AUX the VP's index, everything else zero."""
    for hypervisor in ("hv1", "hv2"):
        booted = boot.boot([catalog.parse("counter,vps=3,mem=4M")], hypervisor=hypervisor, lps=1)
        booted.machine.run(max_instructions=BOOTED_BEFORE_FIRST_SWITCH)
        vp = build.hypervisor(hypervisor).records.vp
        vps = booted.vp_base
        for index in range(3):
            record = booted.machine.ram.read(vps + index * vp.size, vp.size)
            fields = vp.unpack(record)
            assert fields["fx_area"] == vp_state.initial_fxsave_image()
            assert (fields["cr2"], fields["dr0"], fields["dr1"], fields["dr2"], fields["dr3"]) == (0,) * 5
            assert fields["dr6"] == vp_state.DR6_INITIAL
            assert fields["pat"] == vp_state.PAT_INITIAL and fields["tsc_aux"] == index
            assert all(fields[name] == 0 for name in ("kernel_gs_base", "star", "lstar", "cstar", "fmask"))


def test_the_vp_records_keep_the_state_in_each_hypervisors_own_shape():
    hv1, hv2 = (build.hypervisor(name).records.vp for name in ("hv1", "hv2"))
    for layout in (hv1, hv2):
        assert layout.offset("fx_area") % vp_state.FXSAVE_ALIGNMENT == 0
        assert layout.size % vp_state.FXSAVE_ALIGNMENT == 0
        assert layout.field_size("fx_area") == vp_state.FXSAVE_AREA_BYTES
    assert hv1.offset("fx_area") != hv2.offset("fx_area")
    assert hv1.offset("cr2") < hv1.offset("dr6") and hv2.offset("cr2") > hv2.offset("dr6")


def test_the_vp_state_record_holds_every_piece_of_state():
    record = transfer.VP_STATE_RECORD
    for name, _ in vp_state.SHARED_MSRS:
        assert record.field_size(name) == vp_state.SHARED_MSR_BYTES
    assert {index for _, index in vp_state.SHARED_MSRS} == {
        msrs.IA32_KERNEL_GS_BASE, msrs.IA32_STAR, msrs.IA32_LSTAR, msrs.IA32_CSTAR, msrs.IA32_FMASK,
        msrs.IA32_TSC_AUX, msrs.IA32_PAT}
    assert record.size - record.offset("fx_header") == vp_state.FXSAVE_AREA_BYTES
    assert transfer.RECORD_LAYOUTS[transfer.RecordType.VP_STATE] is record


@pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])
def test_a_switch_between_vps_whose_msrs_agree_writes_no_msr(hypervisor):
    """Four counters (VP index 0 each, so the same MSR values) take turns on one LP: each switch
    reads IA32_KERNEL_GS_BASE once (SWAPGS may have changed it) and writes no MSR, since the LP holds
    the values already; only the LP's first load may write (its power-up values are not the VPs')."""
    booted = boot.boot([catalog.parse("counter,mem=4M")] * 4, hypervisor=hypervisor, lps=1)
    trapped: list[str] = []
    booted.machine.trapped_instruction_observer = lambda lp, context, insn: trapped.append(insn.mnemonic)
    result = booted.machine.run(max_instructions=SWITCHING_RUN)
    switches = result.exits_by_reason[ExitReason.PREEMPTION_TIMER]
    assert switches > 100
    assert trapped.count("wrmsr") <= len(vp_state.SHARED_MSRS)
    assert abs(trapped.count("rdmsr") - switches) <= len(vp_state.SHARED_MSRS) + 1
