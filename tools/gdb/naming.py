"""What each LP runs now, named as traces name it (`lp1 hv2@root`, `lp0 p1.vp0`, `lp0 hv2@service`): tools/trace/contexts.py's Classifier over the hypervisors where they are in RAM."""
from __future__ import annotations

from unicorn import x86_const as x86

from hypervisors import build
from tools.trace.contexts import Classifier, HypervisorAt
from tools.trace.symbols import Placement

IMAGE_PROBE_BYTES = 4096                 # enough of an image to tell hv1's from hv2's


def image_at(ram, address: int) -> str | None:
    """The hypervisor whose image is in RAM at `address` (images run where they are copied), if any."""
    if not address or not ram.holds(address, IMAGE_PROBE_BYTES):
        return None
    found = ram.read(address, IMAGE_PROBE_BYTES)
    for name in build.HYPERVISORS:
        code = build.image(name).code
        if code[:IMAGE_PROBE_BYTES] == found[:len(code[:IMAGE_PROBE_BYTES])]:
            return name
    return None


class ContextNamer:
    """Names a context of `booted`'s machine; the classifier is made again when the hypervisor in
    charge or the one in its service region changes (a hot restart)."""

    def __init__(self, booted):
        self.booted = booted   # its hypervisor and image base follow a restart (tools/restart.py)
        self._key = None
        self._classifier: Classifier | None = None
        self._earlier: dict[tuple[str, int], Placement] = {}   # each hypervisor in charge so far, where it ran
        self._current()

    def _current(self) -> Classifier | None:
        booted, ram = self.booted, self.booted.machine.ram
        old = HypervisorAt(booted.hypervisor, Placement(booted.hypervisor, build.image(booted.hypervisor),
                                                        booted.image_base))
        try:
            service_region = old.qword(ram, "service_region")
        except (KeyError, ValueError):
            service_region = 0
        new_name = image_at(ram, service_region) or booted.hypervisor
        key = (booted.hypervisor, booted.image_base, service_region, new_name)
        self._earlier.setdefault((old.placement.label, old.placement.load_address), old.placement)
        if key != self._key:
            label = new_name if new_name != booted.hypervisor else f"{new_name}-new"
            new = HypervisorAt(new_name, Placement(label, build.image(new_name), service_region))
            self._classifier, self._key = Classifier(ram, old, new), key
        return self._classifier

    def vmcs_name(self, address: int) -> str:
        return self._current().guest(address).name

    def service_image(self) -> tuple[str, int] | None:
        self._current()
        _, _, service_region, new_name = self._key
        return (new_name, service_region) if image_at(self.booted.machine.ram, service_region) else None

    def name(self, lp, context) -> str:
        classifier = self._current()
        if context is lp.root:
            rip = context.reg(x86.UC_X86_REG_RIP)
            for placement in self._earlier.values():   # an LP that has not yet left the old hypervisor
                if placement.contains(rip) and not classifier.roots.new.contains(rip) and \
                        not classifier.roots.old.contains(rip) and \
                        image_at(self.booted.machine.ram, placement.load_address) == placement.label:
                    return f"{placement.label}@root"
            return classifier.roots.root(lp.index, rip).name
        for address, vmcs in self.booted.machine.active_vmcs.items():
            if vmcs.context is context:
                return classifier.guest(address).name
        return context.name


class BareNamer:
    """Names the contexts of a machine no hypervisor of hhr's runs (a lab's monitor on the bare
    machine): root is `<label>@root`, a guest is named by its VMCS (`vmcs@0x201000`)."""

    def __init__(self, machine, label: str):
        self.machine = machine
        self.label = label

    def vmcs_name(self, address: int) -> str:
        return f"vmcs@{address:#x}"

    def service_image(self) -> None:
        return None

    def name(self, lp, context) -> str:
        if context is lp.root:
            return f"{self.label}@root"
        for address, vmcs in self.machine.active_vmcs.items():
            if vmcs.context is context:
                return self.vmcs_name(address)
        return context.name


def namer_for(booted):
    """The namer of what the stub attached to: a machine hhr's hypervisors run, or a bare one (its
    `hypervisor` is None and its `label` names the program in root mode)."""
    if booted.hypervisor is None:
        return BareNamer(booted.machine, booted.label)
    return ContextNamer(booted)
