"""The program afl-fuzz runs as its target: a fork server on AFL++'s descriptors that runs each input on one recorded restart, counts the new hypervisor's edges into AFL's map and reports the oracles' findings as crashes."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from emu import fast
from tools.fuzz import campaign
from tools.fuzz import corpus as corpus_module
from tools.fuzz import oracles
from tools.fuzz.decoding import decode_any, runnable
from tools.fuzz.executor import Result, Setup, TransferMachine
from tools.fuzz.inputs import FuzzInput

# AFL++'s fork server protocol (include/config.h, include/types.h; utils/afl_proxy/afl-proxy.c speaks it
# the same way): afl-fuzz writes four bytes on the control descriptor for each run, the server answers
# with the child's pid and then its wait status on the status descriptor.
CONTROL_FD = 198                    # FORKSRV_FD: afl-fuzz -> server
STATUS_FD = CONTROL_FD + 1          # server -> afl-fuzz
WORD = 4                            # every message is one 32-bit word, host byte order (little-endian here)
FS_OPT_ENABLED = 0x80000001         # the hello carries options
FS_OPT_MAPSIZE = 0x40000000         # ... among them the map size, as (size - 1) << 1
FS_OPT_MAPSIZE_SHIFT = 1
NO_CHILD_PID = 0xFFFFFF             # no child is forked (afl-proxy's value): above Linux's largest pid_max
                                    # (2^22), so afl-fuzz's kill of it on a timeout reaches no process
STATUS_OK = 0                       # the wait status of a child that exited with 0
STATUS_FINDING = signal.SIGABRT     # the wait status of a child killed by SIGABRT: afl-fuzz files the input under crashes/
SHM_ENVIRONMENT = "__AFL_SHM_ID"    # afl-fuzz's coverage map: a System V shared-memory segment
MAP_SIZE_ENVIRONMENT = "AFL_MAP_SIZE"
INPUT_BYTES_MAX = 1 << 20           # AFL++'s MAX_FILE: no input afl-fuzz writes is longer
HANG_MARGIN_SECONDS = 0.2           # a hang's status waits this long past afl-fuzz's timeout, so that it times out


class TargetError(RuntimeError):
    """The target cannot serve afl-fuzz (no map, a map too small)."""


def attach_map() -> object:
    """AFL's coverage map (`__AFL_SHM_ID`) attached in this process, as a cffi `uint8_t *`."""
    identifier = os.environ.get(SHM_ENVIRONMENT)
    if identifier is None:
        raise TargetError(f"{SHM_ENVIRONMENT} is not set: not run by afl-fuzz")
    size = int(os.environ.get(MAP_SIZE_ENVIRONMENT, fast.lib.HHR_EDGE_MAP_SIZE))
    if size < fast.lib.HHR_EDGE_MAP_SIZE:
        raise TargetError(f"{MAP_SIZE_ENVIRONMENT}={size}: the new hypervisor's edges need {fast.lib.HHR_EDGE_MAP_SIZE}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    address = libc.shmat(int(identifier), None, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        error = ctypes.get_errno()
        raise TargetError(f"shmat({identifier}): {os.strerror(error)}")
    return fast.ffi.cast("uint8_t *", address)


def hello() -> int:
    """The fork server's first word: options enabled, the map as large as the edge map."""
    return FS_OPT_ENABLED | FS_OPT_MAPSIZE | ((fast.lib.HHR_EDGE_MAP_SIZE - 1) << FS_OPT_MAPSIZE_SHIFT)


class Target:
    """One recorded restart that runs inputs as `hhr fuzz` does (the same oracles, the same sampled
    guest checks) and keeps a finding file for each new finding."""

    def __init__(self, setup: Setup, findings: Path | None, seed: int = 0):
        started = time.perf_counter()
        self.setup = setup
        self.machine = TransferMachine(setup)
        self.findings = findings
        self.rng = random.Random(seed)
        self.seen = fast.ffi.new("uint8_t[]", fast.lib.HHR_EDGE_MAP_SIZE)
        self.signatures: set[tuple] = set()
        self.setup_seconds = time.perf_counter() - started
        self.executions = 0
        self.outcomes: dict[str, int] = {}
        self.found: dict[str, int] = {}

    def run(self, data: bytes) -> Result:
        """Any bytes, decoded as a peer's queue entry is (`decoding.decode_any`), run and judged."""
        entry = runnable(decode_any(data), len(self.machine.messages))
        result = self.machine.execute(entry)
        self.executions += 1
        self.outcomes[result.outcome] = self.outcomes.get(result.outcome, 0) + 1
        fresh = fast.lib.hhr_edge_map_merge(self.machine.edge_map, self.seen, fast.lib.HHR_EDGE_MAP_SIZE)
        if campaign.guest_check_wanted(result, fresh, self.rng):
            result.finding = self.machine.check_guests_after_commit(entry)
        if result.finding is not None:
            self.found[result.finding.kind] = self.found.get(result.finding.kind, 0) + 1
            self._save(entry, result)
        return result

    def _save(self, entry: FuzzInput, result: Result) -> None:
        """The first finding of each signature as a finding file (with its setup, for `--replay`)."""
        signature = (result.finding.kind, entry.target, entry.message, tuple(result.replies[:1]))
        if self.findings is None or signature in self.signatures:
            return
        self.signatures.add(signature)
        corpus_module.save_finding(self.findings, result.finding.kind, result.finding.description,
                                   self.setup.as_json(), entry)

    def figures(self, seconds: float) -> dict:
        return {"executions": self.executions, "seconds": seconds, "setup_seconds": self.setup_seconds,
                "outcomes": self.outcomes, "findings": self.found}


def read_input(path: Path | None) -> bytes:
    """The input afl-fuzz wrote: the file named on the command line (`@@`), or standard input (a
    file afl-fuzz rewrites for each run: read from its start)."""
    if path is not None:
        with open(path, "rb") as handle:
            return handle.read(INPUT_BYTES_MAX)
    return os.pread(0, INPUT_BYTES_MAX, 0)


def status_of(result: Result) -> int:
    return STATUS_OK if result.finding is None or result.finding.kind == oracles.HANG else STATUS_FINDING


def serve(target: Target, path: Path | None, timeout: float, stats: Path | None) -> None:
    """The fork server: hello, then one run for each word afl-fuzz writes, until it closes the
    control descriptor (or ends this process with SIGTERM). A hang (the transfer did not end within
    its instruction budget) answers only after afl-fuzz's timeout (`timeout` seconds) has passed, so
    that afl-fuzz files it under hangs/."""
    edge_map = attach_map()
    target.machine.count_edges_into(edge_map)

    def write_figures(*_) -> None:
        if stats is not None:
            corpus_module.write_whole(stats.parent, stats.name,
                                      json.dumps(target.figures(time.perf_counter() - started)).encode())

    def on_term(*_) -> None:
        write_figures()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    os.write(STATUS_FD, hello().to_bytes(WORD, "little"))
    started = time.perf_counter()
    while True:
        if len(os.read(CONTROL_FD, WORD)) != WORD:
            break
        os.write(STATUS_FD, NO_CHILD_PID.to_bytes(WORD, "little"))
        run_started = time.monotonic()
        result = target.run(read_input(path))
        if result.outcome == "hang":
            time.sleep(max(0.0, run_started + timeout + HANG_MARGIN_SECONDS - time.monotonic()))
        os.write(STATUS_FD, status_of(result).to_bytes(WORD, "little"))
    write_figures()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz.afl_target",
                                     description="afl-fuzz's target for `hhr fuzz --engine afl` (docs/fuzzing.md); "
                                                 "run by hand (no __AFL_SHM_ID), it runs INPUT once and prints the verdict")
    parser.add_argument("--setup", default=json.dumps(Setup().as_json()), help="the setup, as JSON (Setup.as_json)")
    parser.add_argument("--timeout-ms", type=int, default=0, help="afl-fuzz's -t, for the answer to a hang")
    parser.add_argument("--findings", help="where finding files go")
    parser.add_argument("--stats", help="a file the figures (executions, seconds) are written to at the end")
    parser.add_argument("input", nargs="?", help="the input file (afl-fuzz's @@); standard input without it")
    args = parser.parse_args(argv)
    target = Target(Setup.from_json(json.loads(args.setup)), Path(args.findings) if args.findings else None)
    path = Path(args.input) if args.input else None
    if SHM_ENVIRONMENT not in os.environ:
        result = target.run(read_input(path))
        finding = result.finding
        print(f"{result.outcome}: " + (f"finding {finding.kind}: {finding.description}" if finding else "no finding"))
        return 1 if finding else 0
    serve(target, path, args.timeout_ms / 1000, Path(args.stats) if args.stats else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
