"""Hot restart (docs/protocol.md): the oracle (guests compute with a restart what they compute without
one), every direction, every fault at every step, restarts in a row, isolation of the service
partition, and a blackout that does not grow with guest RAM."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guests import catalog
from hypervisors import boot, layouts, memory_state, transfer
from hypervisors.memory_map import FREE_BASE, HEAP_BASE, HYPERVISOR_BASE, LARGE_PAGE_SIZE
from tools import faults
from tools import restart as restart_module
from tools import run as run_module

GUESTS = ["storm,vps=2", "heartbeat", "hashchain", "timer"]
TIMING_DEPENDENT = {"heartbeat", "timer", "hello"}     # their output names times or interleavings
REQUEST_AT = 400_000
PHASES_IN_ORDER = ["requested", "service", "invariants", "precopy", "blackout", "commit", "devirtualize"]
_reference_cache: dict[tuple, dict] = {}


def reference(guests: list[str], lps: int) -> dict:
    """Each guest's outcome without a restart (under hv1: the oracle's other side)."""
    key = (tuple(guests), lps)
    if key not in _reference_cache:
        _reference_cache[key] = {g["name"]: g for g in run_module.run("hv1", guests, lps=lps).document["guests"]}
    return _reference_cache[key]


def assert_oracle(document: dict, guests: list[str], lps: int) -> None:
    """Every guest ends as without a restart: same exit code, and the same console where it does not
    depend on time."""
    without = reference(guests, lps)
    for guest in document["guests"]:
        assert guest["state"] == without[guest["name"]]["state"], guest
        assert guest["exit_code"] == without[guest["name"]]["exit_code"], guest
        if guest["name"] not in TIMING_DEPENDENT:
            assert guest["console"] == without[guest["name"]]["console"], guest["name"]


@pytest.mark.parametrize("source, target", [("hv1", "hv2"), ("hv2", "hv1"), ("hv1", "hv1"), ("hv2", "hv2")])
def test_restart_in_every_direction(source, target):
    document = restart_module.restart(source, target, GUESTS, lps=2, request_at=REQUEST_AT)
    restart = document["restart"]
    assert restart["outcome"] == "committed" and restart["reason"] is None and document["hypervisor"] == target
    assert_oracle(document, GUESTS, 2)
    assert [phase["phase"] for phase in restart["phases"]] == PHASES_IN_ORDER
    assert restart["guest_memory_unchanged"] is True, "a hypervisor wrote guest memory in the blackout"
    assert restart["guest_pages_in_place"] is True, "a guest page moved"
    assert restart["digest_agrees_with_python"] is True
    running = [vp for vp in restart["blackout"]["per_vp"] if vp["state"] == "running"]
    assert running and all(vp["blackout_ticks"] > 0 for vp in running)
    assert restart["blackout"]["max_ticks"] == max(vp["blackout_ticks"] for vp in running)
    assert restart["phases"][PHASES_IN_ORDER.index("blackout")]["inverse_calls"] >= 2    # final state, verify


ORACLE_SWEEP = [  # (guests, LPs, restart point, direction): early, in storms, mid-I/O, ticks pending
    (["storm,vps=2", "timer", "hashchain"], 1, 300_000, ("hv1", "hv2")),
    (["storm,vps=2", "timer", "hashchain"], 1, 6_000_000, ("hv2", "hv1")),
    (["storm", "heartbeat", "pingpong,vps=2", "sieve"], 2, 2_000_000, ("hv1", "hv1")),
    (["storm", "heartbeat", "pingpong,vps=2", "sieve"], 3, 1_000_000, ("hv2", "hv2")),
    (["hypercalls", "storm,vps=3", "hostile", "hello,vps=2", "counter"], 4, 3_000_000, ("hv1", "hv2")),
    (["timer", "storm,vps=2", "counter"], 2, 12_000_000, ("hv2", "hv1")),
]


@pytest.mark.parametrize("guests, lps, request_at, direction", ORACLE_SWEEP)
def test_the_oracle_guests_compute_the_same_with_a_restart(guests, lps, request_at, direction):
    document = restart_module.restart(*direction, guests, lps=lps, request_at=request_at)
    assert document["restart"]["outcome"] == "committed"
    assert document["restart"]["guest_memory_unchanged"] and document["restart"]["guest_pages_in_place"]
    assert_oracle(document, guests, lps)


FAULT_GUESTS = ["storm", "hashchain"]


@pytest.mark.parametrize("step", faults.ABORT_STEPS)
@pytest.mark.parametrize("fault", faults.FAULTS)
def test_every_fault_at_every_step_aborts_cleanly(step, fault):
    document = restart_module.restart("hv1", "hv2", FAULT_GUESTS, lps=1, request_at=REQUEST_AT,
                                      inject=f"{step}:{fault}")
    restart = document["restart"]
    assert restart["outcome"] == "aborted", restart["phases"]
    assert restart["phases"][-1]["phase"] == "aborted"
    assert document["hypervisor"] == "hv1"
    assert f"restart aborted: status {transfer.Status[restart['reason'].upper()].value}" in document["hypervisor_console"]
    assert_oracle(document, FAULT_GUESTS, 1)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    status = open("/proc/self/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_fifty_restarts_in_a_row_alternating_versions():
    guests = ["counter,mem=4M", "counter,mem=4M", "storm,mem=8M"]
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=REQUEST_AT)
    pool_frames, resident = [], []
    for number in range(50):
        target = "hv2" if booted.hypervisor == "hv1" else "hv1"
        recorder = restart_module.request(booted, target, check_memory=False)
        assert recorder.finished and booted.hypervisor == target, f"restart {number}"
        while memory_state.lock_held(booted):
            booted.machine.run(max_instructions=booted.machine.retired + 100)
        state = memory_state.read(booted)
        assert memory_state.problems(state) == []
        # Memory for the pool: free frames and split frames (their pages free or mapped). The first
        # restart frees the boot-time hypervisor's memory; after that each restart frees exactly what
        # the one before took.
        pool_frames.append(state.frame_owners.count(layouts.OWNER_FREE) + state.frame_owners.count(layouts.OWNER_SPLIT))
        resident.append(resident_bytes())
    assert len(set(pool_frames[1:])) == 1, pool_frames
    assert resident[-1] - resident[9] < RESIDENT_GROWTH_ALLOWED, "host memory grows with every restart"
    result = booted.machine.run(max_instructions=4_000_000_000)
    assert result.stop.reason == "debug-exit"
    assert_oracle(run_module.document(booted, result, 2), guests, 2)


RESIDENT_GROWTH_ALLOWED = 64 << 20      # from restart 10 to 50: caches warm, nothing may accumulate


def test_after_the_restart_the_old_hypervisors_memory_is_free_and_the_database_agrees():
    booted = boot.boot([catalog.parse(spec) for spec in GUESTS], hypervisor="hv1", lps=2)
    booted.machine.run(max_instructions=REQUEST_AT)
    recorder = restart_module.request(booted, "hv2")
    assert recorder.finished and booted.hypervisor == "hv2"
    while memory_state.lock_held(booted):
        booted.machine.run(max_instructions=booted.machine.retired + 100)
    state = memory_state.read(booted)
    assert memory_state.problems(state) == []
    assert layouts.OWNER_PREVIOUS not in state.frame_owners
    assert all(owner != layouts.OWNER_PREVIOUS for owner, _ in state.page_owners.values())
    old_frames = [HYPERVISOR_BASE // LARGE_PAGE_SIZE, *range(HEAP_BASE // LARGE_PAGE_SIZE, FREE_BASE // LARGE_PAGE_SIZE)]
    assert {state.frame_owners[frame] for frame in old_frames} == {layouts.OWNER_FREE}
    assert booted.image_base == recorder.service_region


BOOTED = 22_000         # instructions by which boot has reserved the service region, before any guest runs


def test_guests_cannot_reach_the_service_partition_or_the_doorbell():
    """The hostile guest rings the doorbell and executes VMCALLR during the restart; no partition's
    EPT maps a page of the service region or the transfer area, before or after."""
    guests = ["hostile", "storm", "hashchain"]
    booted = boot.boot([catalog.parse(spec) for spec in guests], hypervisor="hv1")
    booted.machine.run(max_instructions=BOOTED)          # the hostile guest has not run yet
    region, area = booted.service_region, booted.transfer_area
    recorder = restart_module.request(booted, "hv2")
    assert recorder.finished and booted.hypervisor == "hv2"
    forbidden = range(region, region + transfer.SERVICE_REGION_SIZE)
    for number, partition in enumerate(booted.partitions()):
        ram = range(partition["memory"], partition["memory"] + partition["memory_size"])
        assert not (set(ram[::LARGE_PAGE_SIZE]) & set(forbidden[::LARGE_PAGE_SIZE]))
        assert area not in ram
        for page in memory_state.read(booted).windows[number].values():
            assert page not in forbidden and not area <= page < area + transfer.TRANSFER_AREA_SIZE
    result = booted.machine.run(max_instructions=2_000_000_000)
    document = run_module.document(booted, result, 1)
    assert_oracle(document, guests, 1)
    hostile = next(g for g in document["guests"] if g["name"] == "hostile")
    assert hostile["stop_reason"] == "EPT_VIOLATION" and hostile["console"] == "UD UD mapped "


def test_the_blackout_does_not_grow_with_guest_ram(report_timing):
    blackouts = {}
    for memory in ("16M", "1G"):
        guests = [f"hashchain,mem={memory}", f"heartbeat,mem={memory}"]
        document = restart_module.restart("hv1", "hv2", guests, lps=1, request_at=REQUEST_AT)
        assert document["restart"]["outcome"] == "committed"
        phases = {phase["phase"]: phase for phase in document["restart"]["phases"]}
        blackouts[memory] = (phases["blackout"]["virtual_ticks"], document["restart"]["blackout"]["max_ticks"])
    report_timing(f"blackout phase / largest VP blackout (ticks): 16 MiB {blackouts['16M']}, 1 GiB {blackouts['1G']}")
    assert blackouts["1G"][0] <= 1.2 * blackouts["16M"][0]


def test_stop_and_copy_sends_everything_in_the_blackout():
    # Requested early enough that the blackout falls in storm's quota fill (it frees its pages at about
    # LP time 14 million; the new image's digest takes about 5 million before the blackout).
    document = restart_module.restart("hv1", "hv2", ["storm", "hashchain"], request_at=3_000_000,
                                      mode="stop-and-copy")
    restart = document["restart"]
    assert restart["outcome"] == "committed" and restart["mode"] == "stop-and-copy"
    assert "precopy" not in [phase["phase"] for phase in restart["phases"]]
    blackout = next(phase for phase in restart["phases"] if phase["phase"] == "blackout")
    assert blackout["bytes_sent"] > transfer.MAP_RECORD.size * 1000      # the windows went in the blackout
    assert_oracle(document, ["storm", "hashchain"], 1)


def test_several_restarts_in_one_command_alternate_direction():
    document = restart_module.restart("hv1", "hv2", ["counter", "storm"], request_at=[500_000, 40_000_000])
    assert [(r["from"], r["to"], r["outcome"]) for r in document["restarts"]] == \
        [("hv1", "hv2", "committed"), ("hv2", "hv1", "committed")]
    assert document["hypervisor"] == "hv1"
    assert_oracle(document, ["counter", "storm"], 1)


def test_a_bad_request_is_refused():
    booted = boot.boot([catalog.parse("hashchain")], hypervisor="hv1")
    booted.machine.run(max_instructions=REQUEST_AT)
    booted.machine.ring_doorbell([transfer.REQUEST_MAGIC, transfer.PROTOCOL_VERSION, 0])   # far too short
    booted.machine.run(max_instructions=REQUEST_AT + 1_000_000)
    assert transfer.Status(booted.restart_status) == transfer.Status.BAD_REQUEST
    assert booted.machine.run(max_instructions=2_000_000_000).stop.reason == "debug-exit"
    assert booted.partitions()[0]["exit_code"] == 0


def test_the_same_restart_twice_is_the_same_run():
    def without_host_times(document: dict) -> dict:
        restart = dict(document["restart"])
        restart["phases"] = [{k: v for k, v in phase.items() if k != "host_ms"} for phase in restart["phases"]]
        restart["blackout"] = {"max_ticks": restart["blackout"]["max_ticks"],
                               "per_vp": [{k: v for k, v in vp.items() if k != "blackout_host_ms"}
                                          for vp in restart["blackout"]["per_vp"]]}
        return {**{k: v for k, v in document.items() if k not in ("host_seconds", "restarts")}, "restart": restart}
    first = restart_module.restart("hv1", "hv2", GUESTS, lps=2, request_at=REQUEST_AT)
    second = restart_module.restart("hv1", "hv2", GUESTS, lps=2, request_at=REQUEST_AT)
    assert without_host_times(first) == without_host_times(second)


def test_bad_fault_specs_are_one_clear_line(capsys):
    from tools import cli
    assert cli.main(["restart", "--inject", "nowhere:hang"]) == 2
    assert "STEP:FAULT" in capsys.readouterr().err


def test_the_state_digest_changes_with_every_byte_and_with_what_came_before():
    start = transfer.STATE_DIGEST_START
    assert transfer.chain_digest(start, b"") != start
    one = transfer.chain_digest(start, b"abc")
    assert one != transfer.chain_digest(start, b"abd")
    assert one != transfer.chain_digest(start, b"abc\0")                # the length counts
    assert transfer.chain_digest(one, b"x") != transfer.chain_digest(start, b"x")


def test_a_restart_with_ram_above_4_gib():
    """Four 1 GiB guests put the service region and the new hypervisor's heap above 4 GiB: every
    address it keeps must keep its 64 bits."""
    document = restart_module.restart("hv1", "hv2", ["counter,mem=1G"] * 4, lps=2, request_at=2_000_000,
                                      max_instructions=3_000_000)
    assert document["ram"] > 4 << 30
    assert document["restart"]["outcome"] == "committed", document["restart"]["reason"]
    assert document["restart"]["guest_memory_unchanged"] and document["restart"]["guest_pages_in_place"]


CORRUPTION_GUESTS = ["storm", "hashchain"]


def corrupting(target_message: int, offset: int, xor: int, state: dict):
    """An event callback that changes one byte of the `target_message`-th message the old hypervisor
    sends (offset taken modulo its length), as it lies in the transfer area."""
    def callback(event) -> None:
        if event.kind != "vmcallr" or event.data["call"] not in (transfer.Call.INVARIANTS, transfer.Call.STATE):
            return
        state["messages"] += 1
        if state["messages"] != target_message:
            return
        area = state["booted"].transfer_area
        ram = state["booted"].machine.ram
        length = transfer.TRANSFER_HEADER.unpack(ram.read(area, transfer.TRANSFER_HEADER.size))["bytes"]
        address = area + offset % min(max(length, 1), transfer.TRANSFER_AREA_SIZE)
        ram.write(address, bytes([ram.read(address, 1)[0] ^ xor]))
        state["struck"] = True
    return callback



@settings(max_examples=6)
@given(message=st.integers(min_value=1, max_value=4), offset=st.integers(min_value=0, max_value=1 << 16),
       xor=st.integers(min_value=1, max_value=255))
def test_no_corrupted_message_is_ever_accepted(message, offset, xor):
    """Any single byte changed in flight in any message ends in an abort, and the guests compute what
    they compute without a restart."""
    booted = boot.boot([catalog.parse(spec) for spec in CORRUPTION_GUESTS], hypervisor="hv1")
    booted.machine.run(max_instructions=REQUEST_AT)
    state = {"messages": 0, "struck": False, "booted": booted}
    booted.machine.events.subscribe(corrupting(message, offset, xor, state))
    recorder = restart_module.request(booted, "hv2")
    assert recorder.finished
    if state["struck"]:
        assert booted.hypervisor == "hv1", "a corrupted state was accepted"
        assert transfer.Status(booted.restart_status) in (transfer.Status.REFUSED,
                                                                      transfer.Status.CALL_FAILED)
    result = booted.machine.run(max_instructions=2_000_000_000)
    assert_oracle(run_module.document(booted, result, 1), CORRUPTION_GUESTS, 1)
