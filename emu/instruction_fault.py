"""The exception an instruction the machine carries out raises when it faults instead of completing."""
from __future__ import annotations


class RaiseException(Exception):
    """The instruction faults instead of completing: deliver `vector` to the executing context."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(vector)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2
