"""The C guests of guests/examples, built with the system's gcc by the documented line and cached by what went into them."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

EXAMPLES_DIRECTORY = Path(__file__).resolve().parent / "examples"
# The freestanding build line of docs/guests.md: no runtime, no PIE, loaded at 0x100000, no red zone
# (the machine delivers interrupts on the guest's own stack). SSE is left on: gcc -O2 keeps doubles,
# vectors and block copies in XMM registers, as real guests do.
FLAGS = ("-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static", "-mno-red-zone",
         "-Wl,-Ttext-segment=0x100000", "-Wl,--build-id=none")
CACHE_DIRECTORY = Path(tempfile.gettempdir()) / "hhr-c-guests"
COMPILER = "gcc"


class BuildError(RuntimeError):
    """A C guest that cannot be built: no compiler, or the compiler's complaint."""


def names() -> list[str]:
    return sorted(path.stem for path in EXAMPLES_DIRECTORY.glob("*.c"))


def compiler() -> str | None:
    """The path of gcc, or None where there is none."""
    return shutil.which(COMPILER)


def source(name: str) -> Path:
    path = EXAMPLES_DIRECTORY / f"{name}.c"
    if not path.is_file():
        raise BuildError(f"no C guest {name!r} in {EXAMPLES_DIRECTORY} (there are: {', '.join(names())})")
    return path


def _fingerprint(gcc: str, name: str) -> str:
    """A hash of the compiler's version, the flags, the guest's source and the shared headers."""
    digest = hashlib.sha256()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode())
    digest.update("\0".join(FLAGS).encode())
    for path in [source(name), *sorted(EXAMPLES_DIRECTORY.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build(name: str) -> Path:
    """guests/examples/NAME.c built into the cache (once per distinct source, headers, flags and
    compiler); returns the ELF file's path."""
    gcc = compiler()
    if gcc is None:
        raise BuildError(f"{COMPILER} is not installed: the C guest {name!r} cannot be built")
    target = CACHE_DIRECTORY / _fingerprint(gcc, name) / f"{name}.elf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    result = subprocess.run([gcc, *FLAGS, "-o", str(partial), str(source(name))],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{COMPILER} could not build {name}.c:\n{result.stderr.strip()}")
    partial.replace(target)           # atomic: a concurrent build of the same source is harmless
    return target
