"""The map and unmap hypercalls of hv1 and hv2: the storm guest's figures recomputed in Python, and the
page-ownership database checked against every partition's map window while guests map and unmap, and
after they end."""
from __future__ import annotations

import re

import pytest

from guests import catalog
from hypervisors import boot, guest_abi, memory_state, layouts
from hypervisors.memory_map import FREE_BASE, HEAP_BASE, HYPERVISOR_BASE, LARGE_PAGE_SIZE, PAGE_SIZE
from tools import run as run_module

MASK64 = (1 << 64) - 1
LOCK_STEP = 200          # instructions to run on while an LP holds hv1's memory_lock


def storm_define(name: str) -> int:
    """A %define of guests/builtin/storm.s, so the test follows the guest's own numbers."""
    source = (catalog.BUILTIN_DIRECTORY / "storm.s").read_text()
    return int(re.search(rf"^%define {name} (\S+)", source, re.MULTILINE).group(1), 0)


def storm_expected(vps: int) -> str:
    """The storm guest's report, computed independently: per VP its xorshift64 picks over its slots."""
    rounds, slots, seed = storm_define("ROUNDS"), storm_define("SLOTS_PER_VP"), storm_define("SEED")
    lines, left_mapped = [], 0
    for vp in range(vps):
        state, tags, maps, unmaps = seed + vp, {}, 0, 0
        for round_number in range(1, rounds + 1):
            state ^= (state << 13) & MASK64
            state ^= state >> 7
            state ^= (state << 17) & MASK64
            slot = state % slots
            if slot in tags:
                del tags[slot]
                unmaps += 1
            else:
                tags[slot] = ((vp * slots + slot) << 32) | round_number
                maps += 1
        left_mapped += len(tags)
        lines.append(f"storm vp {vp}: maps {maps} unmaps {unmaps} mapped {len(tags)} "
                     f"tag sum {sum(tags.values()) & MASK64}\n")
    lines.append(f"storm quota: {guest_abi.MAP_QUOTA_PAGES - left_mapped} more pages, then ENOMEM\n")
    return "".join(lines)


def guest_named(document: dict, name: str) -> dict:
    (found,) = [g for g in document["guests"] if g["name"] == name]
    return found


HYPERVISORS = pytest.mark.parametrize("hypervisor", ["hv1", "hv2"])


@HYPERVISORS
def test_storm_figures_match_an_independent_computation(hypervisor):
    storm = guest_named(run_module.run(hypervisor, ["storm"]).document, "storm")
    assert storm["exit_code"] == 0, "the exit code names the first failed check (guests/builtin/storm.s)"
    assert storm["console"] == storm_expected(1)


@HYPERVISORS
def test_storm_on_three_vps_over_two_lps_beside_other_guests(hypervisor):
    document = run_module.run(hypervisor, ["storm,vps=3", "sieve", "storm"], lps=2).document
    storms = [g for g in document["guests"] if g["name"] == "storm"]
    assert [g["exit_code"] for g in storms] == [0, 0]
    assert storms[0]["console"] == storm_expected(3)
    assert storms[1]["console"] == storm_expected(1)
    assert guest_named(document, "sieve")["exit_code"] == 0


def booted_storms(hypervisor: str = "hv1", lps: int = 2):
    return boot.boot([catalog.parse("storm,vps=2"), catalog.parse("storm"), catalog.parse("hello")],
                     hypervisor=hypervisor, lps=lps)


@HYPERVISORS
def test_ownership_database_agrees_with_the_map_windows_while_guests_map_and_unmap(hypervisor):
    booted = booted_storms(hypervisor)
    seen_mapped = 0
    for pause in (1_000_000, 3_000_000, 6_000_000, 12_000_000):
        booted.machine.run(max_instructions=pause)
        while memory_state.lock_held(booted):     # a map or unmap is half done: let it finish
            pause += LOCK_STEP
            booted.machine.run(max_instructions=pause)
        state = memory_state.read(booted)
        assert memory_state.problems(state) == [], f"after {pause} instructions"
        seen_mapped = max(seen_mapped, sum(len(window) for window in state.windows.values()))
        for partition, window in state.windows.items():
            assert all(guest_abi.MAP_WINDOW_BASE <= gpa < guest_abi.MAP_WINDOW_BASE + guest_abi.MAP_WINDOW_SIZE
                       for gpa in window)
    assert seen_mapped > 100, "the pauses should catch the storms with pages mapped"


@HYPERVISORS
def test_the_database_knows_every_frame_and_the_pages_come_back_when_partitions_end(hypervisor):
    booted = booted_storms(hypervisor)
    result = booted.machine.run(max_instructions=400_000_000)
    assert result.stop.reason == "debug-exit"
    assert [p["exit_code"] for p in booted.partitions()] == [0, 0, 0]
    state = memory_state.read(booted)
    assert memory_state.problems(state) == []
    assert all(not window for window in state.windows.values())
    assert all(count == 0 for count in state.mapped_counts.values())
    first_free_frame = FREE_BASE // LARGE_PAGE_SIZE
    below_free = state.frame_owners[:first_free_frame]
    image_frame, heap_frames = HYPERVISOR_BASE // LARGE_PAGE_SIZE, range(HEAP_BASE // LARGE_PAGE_SIZE,
                                                                          FREE_BASE // LARGE_PAGE_SIZE)
    assert {below_free[frame] for frame in (image_frame, *heap_frames)} == {layouts.OWNER_HYPERVISOR}
    assert {owner for frame, owner in enumerate(below_free)
            if frame != image_frame and frame not in heap_frames} == {layouts.OWNER_FIRMWARE}
    for number, partition in enumerate(booted.partitions()):
        frames = range(partition["memory"] // LARGE_PAGE_SIZE,
                       (partition["memory"] + partition["memory_size"]) // LARGE_PAGE_SIZE)
        assert {state.frame_owners[frame] for frame in frames} == {number + layouts.OWNER_PARTITION_BASE}
    # The storms filled their quotas, so the pool split frames; every page of them is free again
    # except, under hv1, each frame's own records page (hv2 keeps its records in its heap).
    assert len(state.split_free_counts) >= 2 * guest_abi.MAP_QUOTA_PAGES * PAGE_SIZE // LARGE_PAGE_SIZE
    hypervisor_pages = {page for page, (owner, _) in state.page_owners.items() if owner == layouts.OWNER_HYPERVISOR}
    assert {owner for owner, _ in state.page_owners.values()} <= {layouts.OWNER_FREE, layouts.OWNER_HYPERVISOR}
    assert hypervisor_pages == {frame * LARGE_PAGE_SIZE for frame in state.records_inside}
    assert bool(state.records_inside) == (hypervisor == "hv1")


def test_problems_finds_a_page_the_database_does_not_give_to_its_mapper():
    booted = booted_storms(lps=1)
    booted.machine.run(max_instructions=3_000_000)
    state = memory_state.read(booted)
    partition, window = next((p, w) for p, w in state.windows.items() if w)
    gpa, page = next(iter(window.items()))
    state.page_owners[page] = (layouts.OWNER_FREE, 0)
    assert any(f"{gpa:#x} maps {page:#x}" in problem for problem in memory_state.problems(state))
    state.mapped_counts[partition] += 1
    assert any("record says" in problem for problem in memory_state.problems(state))


def test_a_guest_too_large_for_the_space_below_the_map_window_is_refused():
    huge = catalog.parse("hello")
    too_big = boot.GuestImage(huge.name, huge.image, guest_abi.MAP_WINDOW_BASE + LARGE_PAGE_SIZE)
    with pytest.raises(boot.BootError, match="map window"):
        boot.boot([too_big])


def test_a_machine_without_room_for_maps_answers_enomem_and_guests_go_on():
    storm = catalog.parse("storm")
    ram = FREE_BASE + storm.memory_size         # not one frame left for the map pool
    booted = boot.boot([storm, catalog.parse("hello")], ram_size=ram + catalog.parse("hello").memory_size)
    booted.machine.run(max_instructions=50_000_000)
    storm_record, hello_record = booted.partitions()
    assert storm_record["state"] == layouts.PARTITION_EXITED
    assert storm_record["exit_code"] == storm_define("CHECK_PROBE_MAP"), "its first map gets ENOMEM"
    assert hello_record["exit_code"] == 0
    assert memory_state.problems(memory_state.read(booted)) == []


def test_the_documented_hypercall_table_is_the_abi():
    text = (catalog.BUILTIN_DIRECTORY.parent.parent / "docs" / "guests.md").read_text()
    section = text[text.index("## Hypercalls"):text.index("## Map window")]
    documented = {int(number): name for number, name in re.findall(r"^\| (\d+) \| ([a-z ]+?) \|", section, re.MULTILINE)}
    assert documented == {int(call): call.name.lower().replace("_", " ") for call in guest_abi.Hypercall}
    for error in guest_abi.HypercallError:
        assert f"−{-int(error)} {error.name}" in section
