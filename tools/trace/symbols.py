"""Symbol+offset from the images' symbol tables, at the addresses the images run at: each hypervisor where it was loaded (the new one in the service region: images are position-independent), and the built-in guests."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

from asm import Image
from guests import catalog

SCOPE_SEPARATOR = "."                   # `function.local` labels belong to `function`


@dataclass(frozen=True)
class Placement:
    """An image running at `load_address` (its symbols are assembled for `image.base`)."""

    label: str                          # printed before the symbol: `hv1`, `hv2`, a guest's name
    image: Image
    load_address: int

    @property
    def end(self) -> int:
        return self.load_address + len(self.image.code)

    def contains(self, address: int) -> bool:
        return self.load_address <= address < self.end

    def symbolize(self, address: int) -> str:
        return f"{self.label}:{self.image.symbolize(address - self.load_address + self.image.base)}"

    def as_header(self) -> dict:
        return {"label": self.label, "load_address": self.load_address, "size": len(self.image.code),
                "assembled_at": self.image.base, "symbols": len(self.image.symbols)}


@lru_cache(maxsize=None)
def builtin_guest_image(name: str) -> Image | None:
    """A built-in guest's image with its symbols (None for a guest from a file)."""
    if name not in catalog.builtin_names():
        return None
    return catalog.builtin_assembly(name)


class Symbolizer:
    """`hv2:receive_records+0x1c` for an address in a hypervisor image, `hashchain:loop+0x4` for a
    built-in guest's address in its own partition; None elsewhere. Answers are cached per address."""

    def __init__(self, hypervisors: list[Placement], guests: dict[int, Placement]):
        self.hypervisors = sorted(hypervisors, key=lambda placement: placement.load_address)
        self._starts = [placement.load_address for placement in self.hypervisors]
        self.guests = guests                # partition number: its image at GUEST_LOAD_ADDRESS
        self._cache: dict[tuple[int | None, int], str | None] = {}

    def hypervisor_placement(self, address: int) -> Placement | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and self.hypervisors[index].contains(address):
            return self.hypervisors[index]
        return None

    def symbolize(self, address: int, partition: int | None = None) -> str | None:
        """In root mode and in the service partition (partition None) the hypervisors' images; in a
        guest partition, that guest's image."""
        key = (partition, address)
        if key in self._cache:
            return self._cache[key]
        if partition is None:
            placement = self.hypervisor_placement(address)
        else:
            placement = self.guests.get(partition)
            placement = placement if placement is not None and placement.contains(address) else None
        result = placement.symbolize(address) if placement is not None else None
        self._cache[key] = result
        return result


def matches(symbol: str | None, wanted: str) -> bool:
    """Whether `hv1:rendezvous.wait+0x3` is inside `wanted`: `rendezvous`, `rendezvous.wait`, or
    with the image's label, `hv1:rendezvous`."""
    if symbol is None:
        return False
    label, _, name = symbol.partition(":")
    name = name.split("+", 1)[0]
    if ":" in wanted:
        wanted_label, _, wanted = wanted.partition(":")
        if wanted_label != label:
            return False
    return name == wanted or name.startswith(wanted + SCOPE_SEPARATOR)
