"""Guest FS and GS selectors at VM entry: a hot restart carries a guest that loaded them, and a selector
whose descriptor the machine cannot load fails the entry (guest.fs_gs.*) instead of crashing the process.

Runs that could crash the emulator run in a subprocess, so that a crash fails the test, not pytest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asm import assemble
from hypervisors.memory_map import GUEST_LOAD_ADDRESS

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_SECONDS = 300
DATA_SELECTOR = 0x10            # the guest ABI's GDT: 0x10 is the data segment (docs/guests.md)
SPIN_ITERATIONS = 3_000_000     # long enough for a restart requested early to happen in the loop
RESTART_AT = 200_000            # instructions: the guest has loaded its selectors and spins


def selector_guest(segment: str) -> bytes:
    """Loads `segment` with the data selector, spins, checks that the selector is still there, prints
    the verdict and exits with 0 (kept) or 1 (changed)."""
    source = f"""
    mov ax, {DATA_SELECTOR:#x}
    mov {segment}, ax
    mov rcx, {SPIN_ITERATIONS}
spin:
    dec rcx
    jnz spin
    mov ax, {segment}
    cmp ax, {DATA_SELECTOR:#x}
    jne changed
    lea rsi, [rip + kept_text]
    xor ebx, ebx
    jmp report
changed:
    lea rsi, [rip + changed_text]
    mov ebx, 1
report:
    mov dx, 0x3F8
print:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp print
done:
    mov eax, ebx
    out 0xF4, al
halt:
    hlt
    jmp halt
kept_text:
    .asciz "{segment} kept\\n"
changed_text:
    .asciz "{segment} changed\\n"
"""
    return assemble(source, GUEST_LOAD_ADDRESS).code


def hhr(*arguments: str) -> subprocess.CompletedProcess:
    """The hhr command in a subprocess, with Python's fault handler on: a crash shows where it happened."""
    return subprocess.run([sys.executable, "-X", "faulthandler", "-m", "tools.cli", *arguments],
                          cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_SECONDS)


@pytest.mark.parametrize("segment", ["fs", "gs"])
@pytest.mark.parametrize("source, target", [("hv1", "hv2"), ("hv2", "hv1")])
def test_a_guest_that_loaded_fs_or_gs_survives_a_hot_restart(tmp_path, segment, source, target):
    guest = tmp_path / f"{segment}-selector.bin"
    guest.write_bytes(selector_guest(segment))
    restarted = hhr("restart", "--from", source, "--to", target, "--lps", "1", "--guest", str(guest),
                    "--at", str(RESTART_AT))
    assert restarted.returncode == 0, f"hhr restart died ({restarted.returncode}):\n{restarted.stderr[-3000:]}"
    assert "Traceback" not in restarted.stderr, restarted.stderr
    assert f"{segment} kept" in restarted.stdout, restarted.stdout
    assert "exited with code 0" in restarted.stdout, restarted.stdout
    assert "committed" in restarted.stdout.lower(), restarted.stdout


def test_several_vps_on_two_lps_that_loaded_gs_survive_a_hot_restart(tmp_path):
    """Three VPs on two LPs: the new hypervisor's guest instances come from a pool that served other
    VMCSs (the service partition's among them) before."""
    guest = tmp_path / "gs-selector.bin"
    guest.write_bytes(selector_guest("gs"))
    restarted = hhr("restart", "--lps", "2", "--guest", f"{guest},vps=3", "--guest", "counter",
                    "--at", str(RESTART_AT))
    assert restarted.returncode == 0, f"hhr restart died ({restarted.returncode}):\n{restarted.stderr[-3000:]}"
    assert "gs kept" in restarted.stdout and "gs changed" not in restarted.stdout, restarted.stdout
    assert "committed" in restarted.stdout, restarted.stdout


@pytest.mark.parametrize("mode, verdict", [("stop-and-copy", "committed"), ("suspend", "resumed")])
def test_a_guest_that_loaded_fs_survives_the_other_hand_off_modes(tmp_path, mode, verdict):
    guest = tmp_path / "fs-selector.bin"
    guest.write_bytes(selector_guest("fs"))
    restarted = hhr("restart", "--mode", mode, "--lps", "1", "--guest", str(guest), "--at", str(RESTART_AT))
    assert restarted.returncode == 0, f"hhr restart died ({restarted.returncode}):\n{restarted.stderr[-3000:]}"
    assert "fs kept" in restarted.stdout and "exited with code 0" in restarted.stdout, restarted.stdout
    assert f"({mode}): {verdict}" in restarted.stdout, restarted.stdout
