"""How many inputs a second one `hhr fuzz` worker runs, per target, on a fixed seed, beside another source tree's build and afl-fuzz's engine, in one run (docs/fuzzing.md, "Figures")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
TARGETS = ("messages", "state", "vmcs", "all")
DEFAULT_RUNS = 1000
DEFAULT_SEED = 1
GOAL_PER_SECOND = 2000               # the messages target's goal, per worker (docs/fuzzing.md)
# One worker's campaign, timed from its first input (the setup left out). It uses only what every
# build of the fuzzer has (campaign.Options, Worker, Setup), so that it runs as well in a source tree
# of an earlier build (--against), and prints one JSON line.
WORKER = """
import json, sys, tempfile, time
from pathlib import Path
from tools.fuzz import campaign
from tools.fuzz.executor import Setup
target, runs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
scratch = Path(tempfile.mkdtemp())
options = campaign.Options(Setup(), target=target, corpus=scratch / "corpus", findings=scratch / "findings",
                           runs=runs, seed=seed, quiet=True)
worker = campaign.Worker(options, 0)
wall, cpu = time.perf_counter(), time.process_time()
stats = worker.fuzz()
print(json.dumps({"executions": stats.executions, "seconds": time.perf_counter() - wall,
                  "cpu_seconds": time.process_time() - cpu, "edges": stats.edges, "corpus": stats.corpus,
                  "outcomes": dict(stats.outcomes), "findings": dict(stats.findings)}))
"""


def one_worker(tree: Path, target: str, runs: int, seed: int) -> dict:
    """The figures of one worker of the build in source tree `tree`, in a process of its own."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", WORKER, target, str(runs), str(seed)], cwd=tree, env=environment,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def afl_figures(seconds: float) -> dict | None:
    """`hhr fuzz --engine afl --workers 1 --native-workers 1` for `seconds`: afl-fuzz's executions a
    second (counted by its target from its hello on) beside the native worker's, or None without afl-fuzz."""
    from tools.fuzz import afl_engine

    if not afl_engine.available():
        return None
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "tools.cli", "fuzz", "--engine", "afl", "--output", f"{scratch}/out",
                   "--findings", f"{scratch}/findings", "--workers", "1", "--native-workers", "1",
                   "--seconds", str(seconds)]
        done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
        return {"seconds": seconds, "summary": done.stdout.strip(), "status": done.returncode}


def rate(figures: dict, clock: str) -> float:
    return figures["executions"] / figures[clock] if figures[clock] else 0.0


def table(results: dict[str, dict[str, list[dict]]], trees: list[str]) -> list[str]:
    """Per target, each tree's executions a second (wall clock, and per CPU second of the worker), the
    best of the rounds, and the outcomes (the same in every tree when the builds fuzz alike)."""
    lines = ["| target | " + " | ".join(f"{name}: per s (per CPU s)" for name in trees) + " | outcomes |",
             "|---|" + "---|" * len(trees) + "---|"]
    for target, by_tree in results.items():
        cells = []
        for name in trees:
            rounds = by_tree[name]
            cells.append(f"{max(rate(f, 'seconds') for f in rounds):,.0f} "
                         f"({max(rate(f, 'cpu_seconds') for f in rounds):,.0f})")
        outcomes = {name: json.dumps(by_tree[name][0]["outcomes"], sort_keys=True) for name in trees}
        same = len(set(outcomes.values())) == 1
        lines.append(f"| {target} | " + " | ".join(cells) + " | " +
                     (outcomes[trees[0]] if same else "differ: " + "; ".join(f"{n} {o}" for n, o in outcomes.items()))
                     + " |")
    return lines


def main(json_path: str | None = None, runs: int = DEFAULT_RUNS, seed: int = DEFAULT_SEED,
         against: list[str] = (), rounds: int = 2, afl_seconds: float = 0.0,
         targets: tuple[str, ...] = TARGETS) -> int:
    """Runs each target `rounds` times, alternating with the builds of the source trees `against`
    (their rounds back to back with this one's: the machine's load changes from minute to minute)."""
    trees = {"this build": REPOSITORY}
    for tree in against:
        trees[Path(tree).name] = Path(tree).resolve()
    results: dict[str, dict[str, list[dict]]] = {target: {name: [] for name in trees} for target in targets}
    started = time.perf_counter()
    for round_number in range(rounds):
        for target in targets:
            for name, tree in trees.items():
                figures = one_worker(tree, target, runs, seed)
                results[target][name].append(figures)
                print(f"round {round_number + 1} {target:8s} {name}: {figures['executions']} executions, "
                      f"{rate(figures, 'seconds'):,.0f}/s ({rate(figures, 'cpu_seconds'):,.0f} per CPU s), "
                      f"{figures['edges']} edges, corpus {figures['corpus']}", file=sys.stderr)
    print(f"hhr fuzz, one worker, hv1 -> hv2, storm + hashchain, seed {seed}, {runs} inputs per target, "
          f"best of {rounds} (load average {os.getloadavg()[0]:.1f}):")
    for line in table(results, list(trees)):
        print(line)
    if "messages" in results:
        best = max(rate(f, "cpu_seconds") for f in results["messages"]["this build"])
        print(f"messages, this build, per CPU second: {best:,.0f} (goal {GOAL_PER_SECOND:,})")
    afl = afl_figures(afl_seconds) if afl_seconds > 0 else None
    if afl is not None:
        print(f"--engine afl, {afl_seconds:g} s, one afl-fuzz instance beside one native worker:")
        print("  " + afl["summary"].replace("\n", "\n  "))
    if json_path:
        Path(json_path).write_text(json.dumps({"runs": runs, "seed": seed, "results": results, "afl": afl,
                                               "host_seconds": time.perf_counter() - started}, indent=1))
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", metavar="TREE", action="append", default=[],
                        help="another source tree (an earlier build) run beside this one (repeatable)")
    parser.add_argument("--afl-seconds", type=float, default=0.0)
    parser.add_argument("--target", action="append", choices=TARGETS)
    parser.add_argument("--json", metavar="FILE")
    arguments = parser.parse_args()
    sys.exit(main(arguments.json, arguments.runs, arguments.seed, arguments.against, arguments.rounds,
                  arguments.afl_seconds, tuple(arguments.target or TARGETS)))
