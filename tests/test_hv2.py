"""hv2, the newer hypervisor: every built-in guest runs under it as under hv1, and it is different where a
new version is: its version number, its record layouts, where its page records live, its scheduling."""
from __future__ import annotations

import pytest

from asm import assemble_file
from guests import catalog
from hypervisors import boot, build, guest_abi, layouts, memory_state
from tools import run as run_module

# Outputs that depend on timing or on the order VPs run in, which hv2 may change.
TIMING_DEPENDENT = {"heartbeat", "timer", "hello"}
ALL_GUESTS = ["sieve", "hashchain", "hypercalls", "pingpong,vps=2", "storm,vps=2", "hello,vps=3", "timer",
              "heartbeat", "hostile"]


def outcome(document: dict) -> list[tuple]:
    return [(g["name"], g["state"], g["exit_code"], g["stop_reason"],
             None if g["name"] in TIMING_DEPENDENT else g["console"]) for g in document["guests"]]


def test_every_builtin_guest_ends_under_hv2_as_under_hv1():
    under_hv1 = run_module.run("hv1", ALL_GUESTS, lps=2).document
    under_hv2 = run_module.run("hv2", ALL_GUESTS, lps=2).document
    assert outcome(under_hv2) == outcome(under_hv1)
    assert all(g["exit_code"] == 0 for g in under_hv2["guests"] if g["name"] != "hostile")
    # Three VPs print at once, byte by byte: the bytes are the same, their interleaving may not be.
    assert sorted(under_hv2["guests"][5]["console"]) == sorted("".join(f"hello from VP {n}\n" for n in range(3)))


def test_the_version_guests_see_is_hv2s():
    versions = {name: spec.version for name, spec in build.HYPERVISORS.items()}
    assert versions["hv2"] > versions["hv1"]
    hypercalls = run_module.run("hv2", ["hypercalls"]).document["guests"][0]
    assert hypercalls["exit_code"] == 0


def test_hv2_records_differ_from_hv1s_in_shape():
    hv1, hv2 = layouts.RECORDS["hv1"], layouts.RECORDS["hv2"]
    for role in ("partition", "vp", "frame", "page"):
        one, two = getattr(hv1, role), getattr(hv2, role)
        assert [(f, one.offset(f)) for f in one.field_names] != [(f, two.offset(f)) for f in two.field_names]
    assert set(hv2.vp.field_names) - set(hv1.vp.field_names) == {"last_run", "runs"}
    assert hv2.page.size == 2 * hv1.page.size


def test_hv2_keeps_the_guest_name_and_its_page_records_in_its_heap():
    booted = boot.boot([catalog.parse("storm"), catalog.parse("sieve")], hypervisor="hv2")
    booted.machine.run(max_instructions=4_000_000)
    while memory_state.lock_held(booted):
        booted.machine.run(max_instructions=booted.machine.lps[0].instructions + 100)
    names = [p["name"].rstrip(b"\0") for p in booted.partitions()]
    assert names == [b"storm", b"sieve"]
    state = memory_state.read(booted)
    assert state.split_free_counts and not state.records_inside
    assert memory_state.problems(state) == []


def test_hv2_runs_the_vp_that_waited_longest():
    """Three busy guests on one LP: each is picked in turn, so their pick counts differ by at most one."""
    booted = boot.boot([catalog.parse("hashchain")] * 3, hypervisor="hv2")
    booted.machine.run(max_instructions=3_000_000)
    records = build.hypervisor("hv2").records.vp
    base = booted.vp_base
    runs = [records.unpack(booted.machine.ram.read(base + n * records.size, records.size))["runs"] for n in range(3)]
    assert min(runs) >= 10 and max(runs) - min(runs) <= 1


@pytest.mark.parametrize("name", sorted(build.HYPERVISORS))
def test_images_are_position_independent(name):
    """A hot restart loads the new image wherever the service region is: the same bytes at any base."""
    spec = build.hypervisor(name)
    images = [assemble_file(spec.source, base, constants=build.constants(name), include_dirs=build.include_dirs())
              for base in (build.memory_map.HYPERVISOR_BASE, build.memory_map.HYPERVISOR_BASE + 0x1234_5000)]
    assert images[0].code == images[1].code


def test_map_window_constants_are_shared_by_both():
    for name in build.HYPERVISORS:
        assert build.constants(name)["MAP_WINDOW_BASE"] == guest_abi.MAP_WINDOW_BASE


def test_the_boot_info_table_of_docs_boot_md_is_the_layout():
    import re
    from pathlib import Path

    text = (Path(build.HERE).parent / "docs" / "boot.md").read_text()
    section = text[text.index("## Boot info"):text.index("## Guest descriptor")]
    documented = [name for row in re.findall(r"^\| ([a-z_, ]+) \| [\d, ]+ \|", section, re.MULTILINE)
                  for name in row.split(", ")]
    assert documented == [name for name in layouts.BOOT_INFO.field_names if not name.startswith("_")]
