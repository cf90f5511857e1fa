"""Which software an instruction belongs to: the old hypervisor in root mode, the new one in the service partition or in root mode, or partition p's VP v."""
from __future__ import annotations

from dataclasses import dataclass

from hypervisors import build
from hypervisors.memory_map import MAX_VPS
from tools.trace.symbols import Placement

OLD, NEW = "old", "new"
ROOT, SERVICE, GUEST = "root", "service", "guest"


@dataclass(frozen=True)
class ContextInfo:
    """A context as traces print it (`hv1@root`, `hv2@service`, `hv2@root`, `p0.vp1`)."""

    name: str
    kind: str                           # ROOT, SERVICE or GUEST
    hypervisor: str | None              # OLD or NEW: whose code (root, service) or whose VMCS (guest)
    partition: int | None = None
    vp: int | None = None


@dataclass(frozen=True)
class HypervisorAt:
    """A hypervisor's image where it runs, with its data read from RAM through its own symbols."""

    name: str
    placement: Placement

    def address(self, symbol: str) -> int:
        image = self.placement.image
        return image.symbol(symbol) - image.base + self.placement.load_address

    def qword(self, ram, symbol: str) -> int:
        return int.from_bytes(ram.read(self.address(symbol), 8), "little")

    def vp_table(self, ram) -> dict[int, tuple[int, int]]:
        """VMCS address: (partition, VP index), from the hypervisor's VP records."""
        records = build.hypervisor(self.name).records
        base, partitions = self.qword(ram, "vps"), self.address("partitions")
        table = {}
        count = min(self.qword(ram, "vp_total"), MAX_VPS)
        if count == 0 or not ram.holds(base, count * records.vp.size):
            return table
        for number in range(count):
            vp = records.vp.unpack(ram.read(base + number * records.vp.size, records.vp.size))
            if vp["vmcs"]:
                table[vp["vmcs"]] = ((vp["partition"] - partitions) // records.partition.size, vp["index"])
        return table

    def service_vmcs(self, ram) -> int:
        records = build.hypervisor(self.name).records
        return int.from_bytes(ram.read(self.address("service_vp") + records.vp.offset("vmcs"), 8), "little")


class RootClassifier:
    """Root code, named by the image its RIP is in; outside both images, the hypervisor that ran last
    on that LP (cached per address)."""

    def __init__(self, old: Placement, new: Placement):
        self.old, self.new = old, new
        self.infos = {OLD: ContextInfo(f"{old.label}@root", ROOT, OLD), NEW: ContextInfo(f"{new.label}@root", ROOT, NEW)}
        self._last_root: dict[int, ContextInfo] = {}
        self._root_by_address: dict[int, ContextInfo] = {}

    def root(self, lp: int, address: int) -> ContextInfo:
        info = self._root_by_address.get(address)
        if info is not None:
            self._last_root[lp] = info
            return info
        if self.new.contains(address):
            info = self.infos[NEW]
        elif self.old.contains(address):
            info = self.infos[OLD]
        else:   # outside both images: the hypervisor that ran last on this LP
            return self._last_root.get(lp, self.infos[OLD])
        self._root_by_address[address] = info
        self._last_root[lp] = info
        return info


class Classifier:
    """Names guests by their VMCS, from the hypervisors' VP tables in RAM (root code: RootClassifier).
    Cached: a VMCS not found yet is looked up again after the next protocol phase change
    (forget_unknown)."""

    def __init__(self, ram, old: HypervisorAt, new: HypervisorAt):
        self.ram = ram
        self.old, self.new = old, new
        self.roots = RootClassifier(old.placement, new.placement)
        self.service = ContextInfo(f"{new.placement.label}@service", SERVICE, NEW)
        self._service_vmcs = old.service_vmcs(ram)
        self._guests: dict[int, ContextInfo] = {}
        self._unknown: dict[int, ContextInfo] = {}

    @property
    def names(self) -> list[str]:
        """The names of the hypervisor contexts (guests add `p<partition>.vp<index>`)."""
        return [self.roots.infos[OLD].name, self.service.name, self.roots.infos[NEW].name]

    def guest(self, vmcs: int) -> ContextInfo:
        info = self._guests.get(vmcs) or self._unknown.get(vmcs)
        if info is not None:
            return info
        if vmcs == self._service_vmcs:
            info = self.service
        else:
            for role, hypervisor in ((OLD, self.old), (NEW, self.new)):
                where = hypervisor.vp_table(self.ram).get(vmcs)
                if where is not None:
                    info = ContextInfo(f"p{where[0]}.vp{where[1]}", GUEST, role, *where)
                    break
        if info is None:
            self._unknown[vmcs] = ContextInfo(f"vmcs@{vmcs:#x}", GUEST, None)
            return self._unknown[vmcs]
        self._guests[vmcs] = info
        return info

    def forget_unknown(self) -> None:
        self._unknown.clear()
