"""Fifty hot restarts back to back with block devices busy throughout: blksoak (blkirq's interrupt-driven
stream with a long life) on blk0, blkstream on blk3 and counter, on 2 LPs, alternating hv1 and hv2 and
cycling pre-copy, post-copy and stop-and-copy, under the DMA audit (tools/dma_audit.py). Every restart
commits and carries the devices across, blksoak still runs after the last, every byte of DMA lands in
the RAM of its device's partition, and every guest ends as in a run without restarts."""
from __future__ import annotations

import collections
import re
import time

from emu.block_devices import STATUS_BYTES
from emu.disk import DISK_BLOCK_SIZE
from tests.worker_process import in_own_process

SPECS = ["blksoak,device=blk0", "blkstream,device=blk3", "counter"]
LPS = 2
RESTARTS = 50
MODES = ["precopy", "postcopy", "stop-and-copy"]
REQUEST_AT = 300_000            # instructions (all LPs) before the first request: both devices streaming
RUN_LIMIT = 2_000_000_000
LIFE_STEP = 250_000             # instructions between looks at the partition table (the reference run)
STREAMS = {0: "blksoak", 3: "blkstream"}                    # each device's guest
ENTRIES_PER_ROUND = 2           # blkstream.inc: a write to the device, the same blocks read back
STREAM_LINE = re.compile(r"\w+: rounds (\d+), blocks moved (\d+), checksum \d+")
INTERRUPTS = re.compile(r", interrupts (\d+)")


def test_fifty_restarts_with_a_device_busy_change_nothing_a_guest_sees_and_dma_stays_in_its_partition(report_timing):
    reference = in_own_process(kind="reference", specs=SPECS, lps=LPS, step=LIFE_STEP, run_limit=RUN_LIMIT)
    assert [guest["exit_code"] for guest in reference["guests"]] == [0, 0, 0], reference["guests"]
    started = time.monotonic()
    soak = in_own_process(kind="row", specs=SPECS, lps=LPS, restarts=RESTARTS, modes=MODES,
                          request_at=REQUEST_AT, run_limit=RUN_LIMIT, audit=True)
    wall = time.monotonic() - started
    restarts = soak["restarts"]
    assert [restart["outcome"] for restart in restarts] == ["committed"] * RESTARTS, restarts[-1]
    per_mode = collections.Counter(restart["mode"] for restart in restarts)
    assert set(per_mode) == {mode.replace("-", "_") for mode in MODES}
    assert all(restart["device_records"] >= 1 for restart in restarts), "a restart carried no device across"
    assert soak["first_guest_ran_to_the_last"], "blksoak ended before the last restart: the soak did not test it"
    assert soak["machine_stop"]["reason"] == "debug-exit", soak["machine_stop"]
    for guest, without in zip(soak["guests"], reference["guests"]):
        assert (guest["name"], guest["exit_code"], guest["console"]) == \
            (without["name"], without["exit_code"], without["console"]), guest["name"]
    # The devices did all the guests asked, and the audit saw each write into memory: every entry's
    # status and every read's blocks, none outside the device's partition.
    devices = {device["device"]: device for device in soak["block_devices"]}
    consoles = {guest["name"]: guest["console"] for guest in soak["guests"]}
    for number, name in STREAMS.items():
        rounds, blocks = map(int, STREAM_LINE.match(consoles[name]).groups())
        assert devices[number]["entries_done"] == rounds * ENTRIES_PER_ROUND, name
        assert devices[number]["bytes_moved"] == blocks * DISK_BLOCK_SIZE, name
    entries = sum(device["entries_done"] for device in devices.values())
    # Each round's read brings back what its write took: half the bytes moved went into memory.
    bytes_read = sum(device["bytes_moved"] for device in devices.values()) // ENTRIES_PER_ROUND
    audit = soak["dma_audit"]
    assert audit["violations"] == 0, audit["first_violations"]
    assert audit["bytes"] == entries * STATUS_BYTES + bytes_read
    report_timing(figures(soak, wall))


def figures(soak: dict, wall: float) -> str:
    """The soak in numbers: restarts by mode, DEVICE records, blocks and entries by device,
    blksoak's interrupts and line, DMA writes audited, wall time."""
    restarts, audit = soak["restarts"], soak["dma_audit"]
    per_mode = dict(collections.Counter(restart["mode"] for restart in restarts))
    busy = [device for device in soak["block_devices"] if device["entries_done"]]
    blocks = ", ".join(f"blk{device['device']} {device['bytes_moved'] // DISK_BLOCK_SIZE} blocks in "
                       f"{device['entries_done']} entries" for device in busy)
    console = soak["guests"][0]["console"]
    return (f"{len(restarts)} restarts {per_mode} in {wall:.1f} s; DEVICE records "
            f"{sum(restart['device_records'] for restart in restarts)}; {blocks}; blksoak interrupts "
            f"{INTERRUPTS.search(console).group(1)}; DMA writes audited {audit['writes']} ({audit['bytes']} bytes), "
            f"violations {audit['violations']}; {console.strip()}")
