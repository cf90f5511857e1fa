"""One case of tests/test_restart_oracle.py or tests/test_device_soak.py in a process of its own, so that a machine crash fails the case instead of ending pytest: argv[1] is the request (JSON), the answer (JSON) goes to standard output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guests import catalog  # noqa: E402  (after the repository root is on the path)
from hypervisors import boot, layouts  # noqa: E402
from tools import dma_audit  # noqa: E402
from tools import restart as restart_module  # noqa: E402
from tools import run as run_module  # noqa: E402


def reference(request: dict) -> dict:
    """The run without a restart (under hv1): its document, with the instructions retired (all LPs)
    when the first guest ended, found by looking every `step` instructions."""
    booted = boot.boot([catalog.parse(spec) for spec in request["specs"]], hypervisor="hv1", lps=request["lps"])
    first_end = None
    while True:
        result = booted.machine.run(max_instructions=booted.machine.retired + request["step"])
        if first_end is None and booted.partitions()[0]["state"] != layouts.PARTITION_RUNNING:
            first_end = booted.machine.retired
        if result.stop.reason != "instruction-limit" or booted.machine.retired > request["run_limit"]:
            break
    return run_module.document(booted, result, request["lps"]) | {"first_guest_end": first_end or booted.machine.retired}


def restart(request: dict) -> dict:
    """`hhr restart`'s document for one restart."""
    return restart_module.restart(request["source"], request["target"], request["specs"], lps=request["lps"],
                                  request_at=request["request_at"], mode=request["mode"],
                                  max_instructions=request["run_limit"])


def row(request: dict) -> dict:
    """Restarts back to back, alternating between hv1 and hv2 and cycling through `modes` (no
    guest-memory hashing: it would dominate), then the run to the end; says whether the first guest
    still ran after the last. With `audit`, the DMA audit (tools/dma_audit.py) watches the whole
    run, and the answer has what it saw and the block devices' counters."""
    booted = boot.boot([catalog.parse(spec) for spec in request["specs"]], hypervisor="hv1", lps=request["lps"])
    audit = dma_audit.DmaAudit(booted) if request.get("audit") else None
    booted.machine.run(max_instructions=request["request_at"])
    restarts = []
    modes = request["modes"]
    for number in range(request["restarts"]):
        target = "hv2" if booted.hypervisor == "hv1" else "hv1"
        mode = restart_module.MODES[modes[number % len(modes)]]
        recorder = restart_module.request(booted, target, check_memory=False, mode=mode)
        restarts.append({"to": target, "mode": mode.name.lower(), "finished": recorder.finished,
                         "hypervisor": booted.hypervisor,
                         "device_records": recorder.digest.records_by_type.get("device", 0),
                         "outcome": "committed" if recorder.finished and booted.hypervisor == target else "failed"})
        if restarts[-1]["outcome"] != "committed":
            break
    first_running = booted.partitions()[0]["state"] == layouts.PARTITION_RUNNING
    result = booted.machine.run(max_instructions=request["run_limit"])
    answer = run_module.document(booted, result, request["lps"]) | {"restarts": restarts,
                                                                      "first_guest_ran_to_the_last": first_running}
    if audit is not None:
        devices = booted.machine.io.block_devices.devices
        answer |= {"dma_audit": audit.summary(),
                   "block_devices": [{"device": device.number, "entries_done": device.entries_done,
                                      "bytes_moved": device.bytes_moved} for device in devices]}
    return answer


if __name__ == "__main__":
    question = json.loads(sys.argv[1])
    print(json.dumps({"reference": reference, "restart": restart, "row": row}[question["kind"]](question)))
