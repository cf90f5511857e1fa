"""Builds and runs machines one after another in this process and prints what stayed alive.

Run by tests/test_machine_lifetime.py in a child process so the resident memory it reads belongs
to nothing else. Prints one JSON object: resident MiB after the warm-up and at the end, and how many
machines are still alive after a collection.
"""
from __future__ import annotations

import gc
import json
import sys
import weakref

from emu.machine import Machine
from tools import run as run_module

PAGE_BYTES = 4096
MIB = 1 << 20


def resident_mib() -> float:
    """This process's resident set now (/proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES / MIB


def main(machines: int, warm_up: int, guest: str) -> None:
    alive: list[weakref.ref] = []
    original_init = Machine.__init__

    def remembering_init(self, *arguments, **keywords):
        original_init(self, *arguments, **keywords)
        alive.append(weakref.ref(self))

    Machine.__init__ = remembering_init
    after_warm_up = 0.0
    for number in range(machines):
        report = run_module.run("hv1", [guest])
        assert report.document["guests"][0]["exit_code"] == 0, report.document
        if number + 1 == warm_up:
            gc.collect()
            after_warm_up = resident_mib()
    at_end = resident_mib()
    uncollected = sum(reference() is not None for reference in alive)
    gc.collect()
    print(json.dumps({"after_warm_up_mib": after_warm_up, "at_end_mib": at_end,
                      "machines_built": len(alive), "machines_alive_before_collection": uncollected,
                      "machines_alive": sum(reference() is not None for reference in alive)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
