"""A digest of hhr's observable behaviour, for checking that a refactor changed nothing.

Runs a fixed set of `hhr` commands in child processes and prints, for each, the SHA-256 of what it
produced with host-time figures taken out: guest output, virtual ticks, exit counts, restart phases
and blackouts, trace bytes, the Chrome timeline, fuzz results on a fixed seed and the restart
bench's virtual figures. Only the command line is used, so the digests stay comparable across any
change of the code's insides:

    python -m tools.fingerprint > before.json      # on the old commit
    python -m tools.fingerprint | diff before.json - # on the new one: no output, nothing changed

`tests/data/fingerprint.json` holds the digests of the committed code; tests/test_fingerprint.py
compares against it. A change that means to alter behaviour rewrites it with `--write` and says so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
COMMITTED = REPOSITORY / "tests" / "data" / "fingerprint.json"
HOST_TIME_KEY = re.compile(r"host_(ms|s|seconds|time)(_|$)")   # JSON keys of host-clock figures
HOST_DESCRIPTION_KEYS = {"machine", "date"}   # the bench's record of the host it ran on and when
HOST_RATIO_PHRASE = re.compile(r"host [0-9.,]+ times")   # the bench's summaries quote host-time ratios
STDOUT_NOT_HASHED = {"fuzz-seeded", "bench-quick"}   # their printed lines carry host-time rates
FUZZ_SEED = 3
FUZZ_RUNS = 12

# name: the hhr arguments; {tmp} is a fresh directory for files a command writes.
SCENARIOS: dict[str, list[str]] = {
    "run-mixed": ["run", "--lps", "2", "--guest", "hello,vps=3", "--guest", "sieve", "--guest", "hostile",
                  "--json"],
    "restart-demo": ["restart", "--json"],
    "restart-hv2-hv1-stop-and-copy": ["restart", "--from", "hv2", "--to", "hv1", "--mode", "stop-and-copy",
                                      "--json"],
    "restart-suspend": ["restart", "--mode", "suspend", "--json"],
    "restart-postcopy-hv2-hv1": ["restart", "--from", "hv2", "--to", "hv1", "--mode", "postcopy", "--json"],
    "restart-postcopy-failed": ["restart", "--mode", "postcopy", "--inject", "postcopy:crash", "--json"],
    "restart-abort-corrupt": ["restart", "--inject", "blackout:corrupt", "--json"],
    "trace-handoff-text": ["trace", "--from-event", "vmxoff", "--quiet"],
    "trace-first-vmcallr-jsonl": ["trace", "--from-event", "vmcallr", "--to-event", "vmcallr-return",
                                  "--format", "jsonl", "--quiet"],
    "trace-chrome": ["trace", "--format", "chrome", "--events-only", "--quiet"],
    "fuzz-seeded": ["fuzz", "--runs", str(FUZZ_RUNS), "--seed", str(FUZZ_SEED), "--workers", "1",
                    "--corpus", "{tmp}/corpus", "--findings", "{tmp}/findings"],
    "bench-quick": ["bench", "--quick", "--output", "{tmp}/bench"],
}


def without_host_time(value):
    """The JSON value with every host-clock figure removed (they differ run to run)."""
    if isinstance(value, dict):
        return {key: without_host_time(item) for key, item in value.items()
                if not HOST_TIME_KEY.search(key) and key not in HOST_DESCRIPTION_KEYS}
    if isinstance(value, list):
        return [without_host_time(item) for item in value]
    if isinstance(value, str):
        return HOST_RATIO_PHRASE.sub("host N times", value)
    return value


def canonical_bytes(text: str) -> bytes:
    """Stdout as bytes to hash: JSON (one document or one per line) loses host times, other text stays."""
    stripped = text.strip()
    try:
        return json.dumps(without_host_time(json.loads(stripped)), sort_keys=True).encode()
    except json.JSONDecodeError:
        pass
    lines = stripped.splitlines()
    try:
        documents = [without_host_time(json.loads(line)) for line in lines]
    except json.JSONDecodeError:
        return text.encode()
    return "\n".join(json.dumps(document, sort_keys=True) for document in documents).encode()


def directory_digest(directory: Path, json_files_without_host_time: bool = True) -> dict[str, str]:
    """Each file under a directory, by relative path: its digest (JSON files without host times)."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.suffix in (".png", ".svg", ".md"):
            continue                      # plots and tables print host figures too; their JSON is hashed
        data = path.read_bytes()
        if path.suffix == ".json" and json_files_without_host_time:
            data = canonical_bytes(data.decode())
        digests[str(path.relative_to(directory))] = hashlib.sha256(data).hexdigest()
    return digests


def run_scenario(name: str, arguments: list[str]) -> dict:
    """One command's digest: its exit status, its output's and its written files' digests."""
    with tempfile.TemporaryDirectory(prefix=f"hhr-fingerprint-{name}-") as scratch:
        argv = [argument.replace("{tmp}", scratch) for argument in arguments]
        completed = subprocess.run([sys.executable, "-m", "tools.cli", *argv], cwd=REPOSITORY,
                                   capture_output=True, text=True, env=os.environ | {"PYTHONHASHSEED": "0"})
        result = {"status": completed.returncode,
                  "stdout": hashlib.sha256(canonical_bytes(completed.stdout)).hexdigest()}
        if name in STDOUT_NOT_HASHED:
            result["stdout"] = None       # what they wrote to files is hashed instead
        written = directory_digest(Path(scratch))
        if written:
            result["files"] = written
        if completed.returncode != 0 and not completed.stdout:
            result["stderr_tail"] = completed.stderr.strip().splitlines()[-1:]
        return result


def fingerprint(names: list[str]) -> dict:
    return {name: run_scenario(name, SCENARIOS[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"only these (default all: {', '.join(SCENARIOS)})")
    parser.add_argument("--write", action="store_true", help=f"also write the result to {COMMITTED}")
    arguments = parser.parse_args(argv)
    unknown = [name for name in arguments.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}")
    result = fingerprint(arguments.scenarios or list(SCENARIOS))
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    sys.stdout.write(text)
    if arguments.write:
        COMMITTED.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
