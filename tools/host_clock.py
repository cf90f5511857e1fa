"""Host time of the machine alone: what measuring parts spend on their own work (hashing, digests) is taken out."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class HostClock:
    """perf_counter, less the time spent inside `excluded()`: the restart's host figures are the
    machine's, not those of the parts that measure it."""

    def __init__(self) -> None:
        self.own_seconds = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.own_seconds

    @contextmanager
    def excluded(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.own_seconds += time.perf_counter() - started
