"""The machine's pseudo-random source for RDRAND and RDSEED: a 64-bit linear congruential generator seeded at power-on."""
from __future__ import annotations

from emu.vmx_defs import U64_MASK as U64

# Knuth's MMIX constants: a full-period generator modulo 2^64.
PRNG_MULTIPLIER = 6364136223846793005
PRNG_INCREMENT = 1442695040888963407


class Prng:
    """The same seed gives the same sequence: the machine stays deterministic."""

    def __init__(self, seed: int):
        self._state = seed & U64

    def next(self) -> int:
        """The next 64-bit value."""
        self._state = (self._state * PRNG_MULTIPLIER + PRNG_INCREMENT) & U64
        return self._state

    def save_state(self) -> int:
        return self._state

    def restore_state(self, state: int) -> None:
        self._state = state
