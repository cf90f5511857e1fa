"""`hhr bench` (the restart scenarios, bench/restart_scenarios.py): the quick set runs every sweep in every
scenario, every figure is there, the files are written; pre-copy beats stop-and-copy with many mappings;
a post-copy's drain is reported beside its blackout and its targets are judged; the devices sweep restarts
with every device busy. Figures are checked for shape and sense, not for speed."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from bench import device_load, machine_speed, hypervisor_speed, report
from bench import restart_scenarios as scenarios
from tools import cli

HOT = (scenarios.PRECOPY, scenarios.POSTCOPY, scenarios.STOP_AND_COPY)
SWEEPS = {"ram", "partitions", "vps", "mappings", "storm", "lps", scenarios.DEVICES, scenarios.NO_DEVICES}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick set through the command, once: its JSON document, output directory and terminal text."""
    directory = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(["bench", "--quick", "--output", str(directory / "out"),
                           "--json", str(directory / "figures.json")])
    assert status == 0
    document = json.loads((directory / "figures.json").read_text())
    return document, directory, printed.getvalue()


def rows(document, **match):
    return [row for row in document["results"] if all(row[key] == value for key, value in match.items())]


def test_every_point_has_every_scenario(quick):
    document, _, _ = quick
    assert {point["sweep"] for point in document["points"]} == SWEEPS
    for point in document["points"]:
        found = [row["scenario"] for row in rows(document, sweep=point["sweep"], x=point["x"])]
        assert found == point["scenarios"], point
        expected = scenarios.DEVICE_SCENARIOS if point["sweep"] in (scenarios.DEVICES, scenarios.NO_DEVICES) \
            else scenarios.SCENARIOS
        assert point["scenarios"] == list(expected), point


def test_hot_restarts_commit_with_every_figure(quick):
    document, _, _ = quick
    for row in document["results"]:
        if row["scenario"] not in HOT:
            continue
        assert row["outcome"] == "committed", row
        assert row["blackout_ticks"] > 0 and row["blackout_host_ms"] > 0
        assert 0 < row["blackout_phase_ticks"] < row["blackout_ticks"] < row["restart_ticks"]
        assert row["restart_host_s"] > 0
        running = [vp for vp in row["per_vp"] if vp["state"] == "running"]
        assert running and all(vp["blackout_ticks"] > 0 and vp["blackout_host_ms"] > 0 for vp in running)
        assert row["blackout_ticks"] == max(vp["blackout_ticks"] for vp in running)
        assert row["guest_memory_unchanged"] is True and row["guests_stopped_after"] == 0
        assert {"requested", "blackout", "commit", "devirtualize"} <= set(row["phases"])
        # post-copy sends the frame owners and partitions in one round before its blackout
        assert ("precopy" in row["phases"]) == (row["scenario"] != scenarios.STOP_AND_COPY)
        drains = row["scenario"] == scenarios.POSTCOPY
        assert ("postcopy" in row["phases"]) == ("postcopy" in row) == drains
        before_takeover = [phase for name, phase in row["phases"].items() if name not in scenarios.AFTER_TAKEOVER]
        assert row["restart_ticks"] == sum(phase["virtual_ticks"] for phase in before_takeover)


def test_postcopy_reports_what_it_moved_out_of_the_blackout(quick):
    document, directory, printed = quick
    drained = rows(document, scenario=scenarios.POSTCOPY)
    assert {row["sweep"] for row in drained} == SWEEPS
    for row in drained:
        drain = row["postcopy"]
        assert drain["outcome"] == "drained" and drain["reason"] is None, row
        assert drain["drain_ticks"] == row["phases"]["resumed"]["virtual_ticks"] + \
            row["phases"]["postcopy"]["virtual_ticks"] > 0
        assert drain["mappings_as_held"] is True and drain["digest_agrees_with_python"] is True
        assert len(drain["demand_fetches_per_guest"]) == len(row["guests"])
        assert sum(drain["demand_fetches_per_guest"]) == drain["demand_fetches"]
        latency = drain["demand_latency_ticks"]
        assert len(latency["per_fetch"]) == drain["demand_fetches"]
        if drain["demand_fetches"]:
            ticks = [fetch["ticks"] for fetch in latency["per_fetch"]]
            fetched = [fetch["fetch_ticks"] for fetch in latency["per_fetch"]]
            assert all(0 < there <= tick for there, tick in zip(fetched, ticks))    # the table comes first
            assert latency["max"] == max(ticks) and min(ticks) <= latency["mean"] <= latency["max"]
            assert latency["fetch_max"] == max(fetched) and min(fetched) <= latency["fetch_mean"] <= latency["fetch_max"]
        else:
            assert latency["max"] is None and latency["mean"] is None and latency["fetch_max"] is None
        if row["sweep"] == "mappings":     # every held mapping came after the commit
            assert drain["records_fetched"]["map"] == row["mappings_at_blackout"] == row["x"]
    # the storm maps while the windows are being pulled: some of its hypercalls wait for a fetch
    storm = rows(document, sweep="storm", scenario=scenarios.POSTCOPY)[0]["postcopy"]
    assert storm["demand_fetches_per_guest"][0] == 0 < storm["demand_fetches_per_guest"][1]
    markdown = (directory / "out" / scenarios.MARKDOWN_NAME).read_text()
    assert "| " + " | ".join(report.POSTCOPY_COLUMNS) + " |" in markdown
    assert markdown.count("| drained | yes |") == len(drained)
    assert "post-copy after its commit:" in printed and "demand fetches" in printed


def test_postcopy_targets_are_judged_from_the_rows(quick):
    document, _, _ = quick
    held = {row["x"]: row for row in rows(document, sweep="mappings", scenario=scenarios.POSTCOPY)}
    assert len(held) >= 2
    ticks = [row["blackout_ticks"] for row in held.values()]
    flat = document["targets"][f"flat_in_mappings[{scenarios.POSTCOPY}]"]
    assert flat["ratio"] == max(ticks) / min(ticks) and flat["limit"] == scenarios.FLAT_LIMIT
    assert flat["verdict"] == ("met" if flat["ratio"] <= scenarios.FLAT_LIMIT else "missed")
    most = max(held)
    precopy = rows(document, sweep="mappings", x=most, scenario=scenarios.PRECOPY)[0]
    lower = document["targets"]["postcopy_vs_precopy[held]"]
    assert lower["ratio"] == precopy["blackout_ticks"] / held[most]["blackout_ticks"]
    assert lower["verdict"] == ("met" if lower["ratio"] >= scenarios.FASTER_FACTOR else "missed")
    assert f"{most:,}" in lower["target"]


def test_devices_sweep_restarts_with_every_device_busy(quick):
    document, directory, printed = quick
    counts = sorted({row["x"] for row in rows(document, sweep=scenarios.DEVICES)})
    assert counts[0] == 0 and len(counts) >= 2
    for count in counts:
        point = rows(document, sweep=scenarios.DEVICES, x=count)
        assert [row["scenario"] for row in point] == list(HOT)          # no suspend, no cold
        for row in point:
            devices = row["devices"]
            assert devices["assigned"] == devices["busy_at_request"] == count, row
            assert devices["device_records_sent"] == row["records_sent"].get("device", 0) == count
            assert devices["dma_both_sides"] == count and len(devices["per_device"]) == count
            assert devices["requested_at"] >= row["request_at"] + devices["waited_for_busy"]
            assert devices["waited_for_busy"] <= scenarios.DEVICE_BUSY_LIMIT
            assert row["blackout_ticks"] > 0 and row["blackout_phase_ticks"] > 0 and row["blackout_phase_bytes"] > 0
            if count:                   # a polling device guest runs at the blackout: it has a blackout
                assert 0 < devices["guest_vp_blackout_ticks"] <= row["blackout_ticks"]
                assert "running" in devices["guest_vp_states"]
                without = rows(document, sweep=scenarios.DEVICES, x=0, scenario=row["scenario"])[0]
                assert row["blackout_phase_bytes"] > without["blackout_phase_bytes"]
            else:
                assert devices["guest_vp_blackout_ticks"] is None
    for mode in HOT:
        target = document["targets"][f"devices_busy_against_none[{mode}]"]
        assert target["verdict"] == scenarios.REPORTED and target["met"] is None
        most = max(counts)
        busiest, none = (rows(document, sweep=scenarios.DEVICES, x=x, scenario=mode)[0] for x in (most, 0))
        assert target["ratio"] == busiest["blackout_ticks"] / none["blackout_ticks"] > 0
        assert set(target["against_counters_in_place"]) == {str(x) for x in counts if x}
    markdown = (directory / "out" / scenarios.MARKDOWN_NAME).read_text()
    assert "| " + " | ".join(report.DEVICES_COLUMNS) + " |" in markdown
    assert "DEVICE_ASSIGNED" in markdown and "block devices busy at the request" in printed


def test_cold_restart_redoes_at_least_the_work_done(quick):
    document, _, _ = quick
    for row in rows(document, scenario=scenarios.COLD):
        assert row["outcome"] == "back", row
        assert 0 < row["boot_ticks"] < row["blackout_ticks"] == row["restart_ticks"]
        assert row["blackout_phase_ticks"] is None
        for vp in row["per_vp"]:
            if vp["state"] == "running":
                assert vp["blackout_ticks"] >= vp["guest_instructions"] > 0, vp


def test_suspend_and_resume_has_every_figure_and_a_longer_blackout_than_hot_restart(quick):
    document, directory, printed = quick
    for row in rows(document, scenario=scenarios.SUSPEND):
        assert row["outcome"] == "resumed", row
        assert row["blackout_ticks"] > 0 and row["blackout_host_ms"] > 0 and row["restart_host_s"] > 0
        # (A VP's blackout may outlast the restart, request to RESUMED: with VPs sharing an LP it
        # begins at the VP's last exit, up to a round of slices before the request, and ends at its
        # first entry, after the slices of the VPs that run before it.)
        assert 0 < row["blackout_phase_ticks"] < min(row["blackout_ticks"], row["restart_ticks"])
        running = [vp for vp in row["per_vp"] if vp["state"] == "running"]
        assert running and all(vp["blackout_ticks"] > 0 and vp["blackout_host_ms"] > 0 for vp in running)
        assert row["blackout_ticks"] == max(vp["blackout_ticks"] for vp in running)
        assert row["guest_memory_unchanged"] is True and row["guests_stopped_after"] == 0
        assert {"requested", "blackout", "suspending", "suspended", "resuming"} <= set(row["phases"])
        assert row["disk"]["bytes_written"] >= sum(16 << 20 for _ in row["guests"]) and row["disk"]["busy_ticks"] > 0
        for scenario in HOT:      # the same point, hot: a shorter blackout
            hot = rows(document, sweep=row["sweep"], x=row["x"], scenario=scenario)[0]
            assert hot["blackout_ticks"] < row["blackout_ticks"], (row["sweep"], row["label"], scenario)
    target = document["targets"]["suspend_resume_comparison"]
    assert target["verdict"] in ("met", "missed") and target["limit"] == scenarios.SUSPEND_FACTOR
    largest = max(row["x"] for row in rows(document, sweep="ram"))
    at = {row["scenario"]: row for row in rows(document, sweep="ram", x=largest)}
    assert target["ratio"] == min(at[scenarios.SUSPEND]["blackout_ticks"] / at[scenario]["blackout_ticks"]
                                  for scenario in HOT)
    assert "suspend-resume" in (directory / "out" / scenarios.MARKDOWN_NAME).read_text()
    assert "not measured" not in printed


def test_precopy_blackout_is_below_stop_and_copy_with_many_mappings(quick):
    document, _, _ = quick
    point = {row["scenario"]: row for row in rows(document, sweep="mappings", x=scenarios.MANY_MAPPINGS)}
    precopy, stop = point[scenarios.PRECOPY], point[scenarios.STOP_AND_COPY]
    for row in (precopy, stop):     # the holder keeps its pages: the same state crosses either way
        assert row["mappings_at_request"] == row["mappings_at_blackout"] == scenarios.MANY_MAPPINGS
    assert precopy["blackout_ticks"] < stop["blackout_ticks"]
    assert precopy["blackout_phase_bytes"] < stop["blackout_phase_bytes"]
    target = document["targets"]["precopy_vs_stop_and_copy[held]"]
    assert target["ratio"] == stop["blackout_ticks"] / precopy["blackout_ticks"]


def test_storm_point_has_many_mappings_and_says_what_ended(quick):
    document, _, _ = quick
    for row in rows(document, sweep="storm"):
        assert row["mappings_at_request"] > 0.8 * scenarios.MANY_MAPPINGS
    for row in rows(document, sweep="storm", scenario=scenarios.STOP_AND_COPY):
        assert row["partitions_ended_by_blackout"] == 0 and row["mappings_at_blackout"] >= row["mappings_at_request"]
    target = document["targets"]["precopy_vs_stop_and_copy[storm]"]
    assert target["verdict"] in ("met", "missed", "not comparable")


def test_ram_targets_are_judged(quick):
    document, _, _ = quick
    for mode in HOT:
        target = document["targets"][f"flat_in_guest_ram[{mode}]"]
        assert target["verdict"] in ("met", "missed") and target["limit"] == 1.2 and target["ratio"] > 0


def test_files_and_machine_description_are_written(quick):
    document, directory, printed = quick
    out = directory / "out"
    assert set(document["machine"]) >= {"platform", "python", "cpu_count", "date"}
    assert document["quick"] is True and document["machine_seed"] == 0
    assert not (out / scenarios.JSON_NAME).exists()          # --json FILE took its place
    markdown = (out / scenarios.MARKDOWN_NAME).read_text()
    assert markdown.count("\n| ") >= len(document["results"]) and "| sweep | point | scenario |" in markdown
    for name in report.PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "VP blackout ticks" in printed and "targets:" in printed


def test_cold_progress_finds_the_moment_a_count_is_reached():
    progress = scenarios.GuestProgress(started=0.0)
    progress.stretches[0x1000] = [(100, 200, 1.0, 2.0), (500, 600, 3.0, 4.0)]
    assert progress.retired(0x1000) == 200
    assert progress.reached(0x1000, 50) == (150, 1.5)
    assert progress.reached(0x1000, 150) == (550, 3.5)
    assert progress.reached(0x1000, 201) is None


def test_dma_log_counts_each_device_s_entries_around_the_blackout():
    log = device_load.DmaLog()
    log.entries += [(0, 100, 150), (0, 900, 1_100), (0, 2_500, 2_600), (1, 800, 900), (3, 3_000, 3_100)]
    rows = {row["device"]: row for row in log.across([0, 1, 3], blackout_start=1_000, resumed_at=2_000)}
    assert rows[0] == {"device": 0, "entries_before": 2, "in_flight_at_blackout": 1, "entries_after": 1}
    assert rows[1] == {"device": 1, "entries_before": 1, "in_flight_at_blackout": 0, "entries_after": 0}
    assert rows[3] == {"device": 3, "entries_before": 0, "in_flight_at_blackout": 0, "entries_after": 1}


def test_request_counts_only_lps_with_a_vp():
    point = scenarios.Point("vps", "1", 1, ("counter",), 4, 1_000_000)
    assert point.busy_lps == 1 and point.request_at == 1_000_000
    assert scenarios.Point("lps", "2", 2, ("counter",) * 4, 2, 1_000_000).request_at == 2_000_000


def test_machine_and_hypervisor_benches_are_still_reached(monkeypatch):
    monkeypatch.setattr(machine_speed, "main", lambda json_path: ("machine", json_path))
    monkeypatch.setattr(hypervisor_speed, "main", lambda json_path, hv: ("hypervisor", json_path, hv))
    assert cli.main(["bench", "--machine", "--json", "m.json"]) == ("machine", "m.json")
    assert cli.main(["bench", "--hypervisor", "--hv", "hv2"]) == ("hypervisor", None, "hv2")


def test_a_run_without_output_leaves_the_reference_results_alone(tmp_path, monkeypatch):
    from bench import restart_scenarios
    monkeypatch.chdir(tmp_path)
    default = restart_scenarios.DEFAULT_OUTPUT.resolve()
    assert not default.is_relative_to(restart_scenarios.REFERENCE_OUTPUT.resolve())
    assert default.is_relative_to(tmp_path)          # the caller's directory, wherever hhr is installed
