"""Output of the restart scenarios (bench/restart_scenarios.py): terminal table, JSON, Markdown, PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from bench import restart_scenarios as scenarios

_DEVICES_BESIDE = f"{len(scenarios.DEVICE_BESIDE)} counters beside, {scenarios.DEVICE_LPS} LPs"
SWEEP_TITLES = {"ram": "guest RAM (one guest, 1 LP)", "partitions": "partitions (2 LPs)",
                "vps": "VPs (one guest, 4 LPs)", "mappings": "map-window mappings held (holder guest, 1 LP)",
                "storm": "storm's mappings at the request (2 LPs)", "lps": "LPs (4 guests)",
                scenarios.DEVICES: f"block devices busy at the request ({_DEVICES_BESIDE})",
                scenarios.NO_DEVICES: f"counters in the device guests' place ({_DEVICES_BESIDE})"}
PLOTS = {"ram": "blackout_vs_ram.png", "vps": "blackout_vs_vps.png", "partitions": "blackout_vs_partitions.png",
         "mappings": "blackout_vs_mappings.png", "storm": "blackout_vs_storm.png", "lps": "blackout_vs_lps.png",
         scenarios.DEVICES: "blackout_vs_devices.png"}
# A sweep drawn with another's lines beside its own, dashed: the same points without what the sweep adds
# (the other sweep, and its lines' label).
CONTROL_SWEEPS = {scenarios.DEVICES: (scenarios.NO_DEVICES, "a counter for each device guest")}
LOG_X = {"ram": 2, "partitions": 2, "vps": 2}     # sweeps drawn on a log scale: the base
COLUMNS = ("sweep", "point", "scenario", "VP blackout ticks", "VP blackout host ms", "blackout phase ticks",
           "restart ticks", "restart host s", "mappings req/blackout", "outcome")
# A post-copy's cost after its commit (tools/postcopy_meter.py): a table of its own, one line per point.
POSTCOPY_COLUMNS = ("sweep", "point", "VP blackout ticks", "demand fetches per guest", "VP in again max / mean ticks",
                    "table there max / mean ticks", "drain ticks", "drain outcome", "mappings as held")
# The devices sweep: what the devices did at each restart, and the blackout against the point without one.
DEVICES_COLUMNS = ("point", "scenario", "busy at request", "DEVICE records", "DMA before and after",
                   "in flight at blackout", "VP blackout ticks", "device guests' VP blackout ticks",
                   "blackout phase ticks", "blackout phase bytes", "VP blackout / none", "blackout phase / none",
                   "VP blackout / counters in their place", "blackout phase ticks more than counters in their place")
SCENARIO_STYLE = {scenarios.PRECOPY: ("tab:blue", "o"), scenarios.POSTCOPY: ("tab:purple", "v"),
                  scenarios.STOP_AND_COPY: ("tab:orange", "s"), scenarios.COLD: ("tab:red", "^"),
                  scenarios.SUSPEND: ("tab:green", "D")}


def _number(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _cells(row: dict) -> list[str]:
    mappings = "-"
    if row.get("mappings_at_request"):
        mappings = f"{row['mappings_at_request']:,}"
        if row.get("mappings_at_blackout") is not None:
            mappings += f" / {row['mappings_at_blackout']:,}"
    return [row["sweep"], row["label"], row["scenario"], _number(row["blackout_ticks"]),
            _number(row["blackout_host_ms"], 1), _number(row["blackout_phase_ticks"]),
            _number(row["restart_ticks"]), _number(row["restart_host_s"], 2), mappings, row["outcome"]]


def _pair(figures: dict, largest: str, mean: str) -> str:
    if figures.get(largest) is None:
        return "-"
    return f"{_number(figures[largest])} / {_number(figures.get(mean))}"


def _drain_cells(row: dict) -> list[str]:
    """A post-copy row's cost after its commit (POSTCOPY_COLUMNS)."""
    drain = row.get("postcopy") or {}
    per_guest = drain.get("demand_fetches_per_guest")
    fetches = "-"
    if per_guest is not None:
        fetches = f"{sum(per_guest):,}" + (f" ({', '.join(f'{count:,}' for count in per_guest)})"
                                           if len(per_guest) > 1 and any(per_guest) else "")
    latency = drain.get("demand_latency_ticks", {})
    outcome = drain.get("outcome", row["outcome"])
    if drain.get("reason"):
        outcome += f": {drain['reason']}"
    as_held = drain.get("mappings_as_held")
    return [row["sweep"], row["label"], _number(row["blackout_ticks"]), fetches, _pair(latency, "max", "mean"),
            _pair(latency, "fetch_max", "fetch_mean"), _number(drain.get("drain_ticks")), outcome,
            "-" if as_held is None else "yes" if as_held else "no"]


def postcopy_rows(document: dict) -> list[dict]:
    return [row for row in document["results"] if row["scenario"] == scenarios.POSTCOPY]


def device_rows(document: dict) -> list[dict]:
    return [row for row in document["results"] if "devices" in row]


def _ratio(row: dict, none: dict | None, key: str) -> str:
    if none is None or row[key] is None or not none[key]:
        return "-"
    return f"{row[key] / none[key]:.3f}"


def _device_cells(row: dict, none: dict | None, counters: dict | None) -> list[str]:
    """A devices-sweep row (DEVICES_COLUMNS); `none` is the same scenario without a device, `counters`
    with a counter in each device guest's place."""
    devices = row["devices"]
    return [row["label"], row["scenario"], f"{devices['busy_at_request']} of {devices['assigned']}",
            _number(devices["device_records_sent"]), _number(devices["dma_both_sides"]),
            _number(devices["in_flight_at_blackout"]), _number(row["blackout_ticks"]),
            _number(devices["guest_vp_blackout_ticks"]), _number(row["blackout_phase_ticks"]),
            _number(row.get("blackout_phase_bytes")), _ratio(row, none, "blackout_ticks"),
            _ratio(row, none, "blackout_phase_ticks"), _ratio(row, counters, "blackout_ticks"),
            _number(row["blackout_phase_ticks"] - counters["blackout_phase_ticks"])
            if counters and row["blackout_phase_ticks"] is not None and counters["blackout_phase_ticks"] is not None
            else "-"]


def _devices_table(document: dict) -> list[list[str]]:
    rows = device_rows(document)
    none = {row["scenario"]: row for row in rows if row["devices"]["assigned"] == 0}
    counters = {(row["x"], row["scenario"]): row for row in document["results"]
                if row["sweep"] == scenarios.NO_DEVICES}
    return [_device_cells(row, none.get(row["scenario"]), counters.get((row["x"], row["scenario"]))) for row in rows]


def devices_left_out() -> str:
    return "; ".join(f"no {scenario} rows: {why}" for scenario, why in scenarios.DEVICES_LEFT_OUT.items())


def progress_line(row: dict) -> str:
    cells = _cells(row)
    line = (f"{row['sweep']:<10} {row['label']:>7}  {row['scenario']:<14} VP blackout {cells[3]:>11} ticks "
            f"{cells[4]:>8} ms  ({row.get('bench_host_s', 0):.1f} s)")
    if row["scenario"] == scenarios.POSTCOPY:
        drain = _drain_cells(row)
        line += f"  demand fetches {drain[3]}, VP in again after {drain[4]} ticks; drain {drain[6]} ticks, {drain[7]}"
    if "devices" in row:
        devices = row["devices"]
        line += (f"  devices busy {devices['busy_at_request']} of {devices['assigned']}, DEVICE records "
                 f"{devices['device_records_sent']}, device guests' VP blackout "
                 f"{_number(devices['guest_vp_blackout_ticks'])} ticks")
    return line


def _aligned(columns: tuple[str, ...], cells: list[list[str]], left: int) -> list[str]:
    """A terminal table: the first `left` columns aligned left, the others right."""
    rows = [list(columns)] + cells
    widths = [max(len(row[column]) for row in rows) for column in range(len(columns))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) if column < left else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def table(document: dict) -> str:
    """The terminal tables: one line per point and scenario, then a post-copy's cost after its commit."""
    lines = _aligned(COLUMNS, [_cells(row) for row in document["results"]], 3)
    drained = postcopy_rows(document)
    if drained:
        lines += ["", "post-copy after its commit:"]
        lines += _aligned(POSTCOPY_COLUMNS, [_drain_cells(row) for row in drained], 2)
    if device_rows(document):
        lines += ["", f"block devices busy at the request ({devices_left_out()}):"]
        lines += _aligned(DEVICES_COLUMNS, _devices_table(document), 2)
    return "\n".join(lines)


def targets_text(document: dict) -> str:
    lines = ["targets:"]
    for target in document["targets"].values():
        verdict = "MISSED" if target["verdict"] == "missed" else target["verdict"]
        lines.append(f"  {verdict:<14} {target['target']}: {target['by']}")
    return "\n".join(lines)


def markdown(document: dict) -> str:
    machine = document["machine"]
    lines = [f"Restart scenarios, {'quick set' if document['quick'] else 'full set'}, {machine['date']}: "
             f"{machine['platform']}, Python {machine['python']}, {machine['cpu_count']} CPUs, "
             f"{document['host_seconds']:.0f} s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 4) + "---|"]
    for row in document["results"]:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    drained = postcopy_rows(document)
    if drained:
        lines += ["", "Post-copy after its commit: demand fetches (a VP waited for a window page table), the "
                      "latency each VP saw (its VM exit to its next VM entry; and to the fetch's return, the table "
                      "there), the drain (RESUMED to DRAINED) and whether every mapping fetched is the one the old "
                      "hypervisor held at the blackout.", "",
                  "| " + " | ".join(POSTCOPY_COLUMNS) + " |",
                  "|" + "---|" * 2 + "---:|" * (len(POSTCOPY_COLUMNS) - 4) + "---|" * 2]
        lines += ["| " + " | ".join(_drain_cells(row)) + " |" for row in drained]
    if device_rows(document):
        lines += ["", "Block devices busy at the request: each device streaming for a guest of its own, with the "
                      f"same guests beside it at every point ({_DEVICES_BESIDE}); busy at the request (an entry under "
                      "way or a completion interrupt not yet raised), the DEVICE records that crossed, the devices "
                      "with DMA both before the blackout and after the take-over, those with an entry under way "
                      "when the blackout began, and the blackout against the same point without a device and against "
                      "a counter in each device guest's place (the `no-devices` rows: the partitions without "
                      "the devices). The device guests' VP blackout is of those running at the blackout (a VP "
                      "halted for its completion has none). The hot modes only: "
                      f"{devices_left_out()}.", "",
                  "| " + " | ".join(DEVICES_COLUMNS) + " |",
                  "|" + "---|" * 2 + "---:|" * (len(DEVICES_COLUMNS) - 2)]
        lines += ["| " + " | ".join(cells) + " |" for cells in _devices_table(document)]
    lines += ["", "| target | verdict | figure |", "|---|---|---|"]
    for target in document["targets"].values():
        lines.append(f"| {target['target']} | {target['verdict']} | {target['by']} |")
    return "\n".join(lines) + "\n"


def plot(document: dict, sweep: str, path: Path) -> bool:
    """Largest VP blackout against the sweep's value, one line per measured scenario: virtual ticks
    (left) and host ms (right), both on log scales. False if the sweep has no results."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    # minor ticks of a log axis: only 2 and 5 of each decade carry a label
    sparse = FuncFormatter(lambda value, _: plain(value) if f"{value:e}"[0] in "25" else "")

    rows = [row for row in document["results"] if row["sweep"] == sweep and row["blackout_ticks"] is not None]
    if not rows:
        return False
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    position = (lambda row: row["mappings_at_request"]) if sweep == "storm" else (lambda row: row["x"])
    for axis, key, unit in ((axes[0], "blackout_ticks", "virtual ticks"), (axes[1], "blackout_host_ms", "host ms")):
        for scenario, (colour, marker) in SCENARIO_STYLE.items():
            line = sorted((position(row), row[key]) for row in rows if row["scenario"] == scenario)
            if line:
                axis.plot([x for x, _ in line], [y for _, y in line], marker=marker, color=colour,
                          label=scenarios.SCENARIO_TITLES[scenario])
        control_sweep, control_label = CONTROL_SWEEPS.get(sweep, (None, None))
        control = [row for row in document["results"]
                   if row["sweep"] == control_sweep and row["blackout_ticks"] is not None]
        for scenario, (colour, marker) in SCENARIO_STYLE.items():
            line = sorted((row["x"], row[key]) for row in control if row["scenario"] == scenario)
            if line:
                axis.plot([x for x, _ in line], [y for _, y in line], marker=marker, color=colour, linestyle="--",
                          alpha=0.6, label=f"{scenarios.SCENARIO_TITLES[scenario]}, {control_label}")
        ended = [(position(row), row[key]) for row in rows if row.get("partitions_ended_by_blackout")]
        if ended:   # a guest ended before the blackout: less state crossed than at the request
            axis.scatter([x for x, _ in ended], [y for _, y in ended], s=160, facecolors="none",
                         edgecolors="black", label="a guest ended before the blackout", zorder=3)
        if sweep in LOG_X:
            axis.set_xscale("log", base=LOG_X[sweep])
            axis.minorticks_off()
        if sweep in ("mappings", "storm"):          # counts of pages: matplotlib's own ticks
            axis.xaxis.set_major_formatter(plain)
        else:
            ticks = sorted({(row["x"], row["label"]) for row in rows})
            axis.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(sparse)
        axis.set_xlabel(SWEEP_TITLES[sweep])
        axis.set_ylabel(f"largest VP blackout ({unit})")
        axis.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = document["machine"]
    figure.suptitle(f"Blackout against {SWEEP_TITLES[sweep]} ({'quick' if document['quick'] else 'full'} set, "
                    f"{machine['date'][:10]})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def write(document: dict, directory: Path, json_path: str | None = None) -> list[Path]:
    """JSON (to `json_path` if given, else into the directory), Markdown and the plots; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    json_file = Path(json_path) if json_path else directory / scenarios.JSON_NAME
    json_file.write_text(json.dumps(document, indent=2) + "\n")
    markdown_file = directory / scenarios.MARKDOWN_NAME
    markdown_file.write_text(markdown(document))
    written = [json_file, markdown_file]
    try:
        import matplotlib  # noqa: F401  (the plots need it; the figures do not)
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or the package's "
              "bench extra)")
        return written
    for sweep, name in PLOTS.items():
        if plot(document, sweep, directory / name):
            written.append(directory / name)
    return written
