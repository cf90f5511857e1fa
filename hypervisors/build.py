"""Assembles the hypervisor images with every constant they use taken from its one Python definition."""
from __future__ import annotations

import contextlib
import enum
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from asm import Image, assemble_file, merge_constants
from emu import block_devices, disk, iommu, ports, vmcs_fields, vmentry_checks, vmx_defs
from emu.vmx_caps import MACHINE_VMX_CAPABILITIES
from hypervisors import guest_abi, invariants, layouts, memory_map, segments, transfer, vp_state

HERE = Path(__file__).resolve().parent
COMMON_SOURCES = HERE / "common"        # code every hypervisor includes, written against generic names
CONTRACT = COMMON_SOURCES / "contract.inc"   # the labels a top source provides to the shared code
# A directory laid out as hypervisors/ is (common/, hv1/hv1.s, hv2/hv2.s) whose sources every image
# is built from instead: a lab's working copy, or a test's build with a planted bug.
SOURCES_ENVIRONMENT = "HHR_HYPERVISOR_SOURCES"
_sources_in_use: list[Path] = []        # sources() blocks, innermost last
_PROVIDES = re.compile(r"^;\s*PROVIDES\s+([A-Za-z_]\w*)\s+(\w+\.inc)\s*$", re.MULTILINE)
_LABEL_DEFINITION = re.compile(r"^([A-Za-z_][\w.]*):", re.MULTILINE)


class ContractError(ValueError):
    """A hypervisor's top source lacks a label the shared code calls (hypervisors/common/contract.inc)."""


def sources_root() -> Path:
    """The tree the hypervisors are built from: the innermost sources() block's, else
    $HHR_HYPERVISOR_SOURCES, else the package's own hypervisors/."""
    if _sources_in_use:
        return _sources_in_use[-1]
    override = os.environ.get(SOURCES_ENVIRONMENT)
    return Path(override).resolve() if override else HERE


@contextlib.contextmanager
def sources(root: Path):
    """Builds every image inside the block from the tree at `root` (laid out as hypervisors/)."""
    root = Path(root).resolve()
    missing = [name for name in ("common", *HYPERVISORS) if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} is not a hypervisor source tree: it lacks {', '.join(name + '/' for name in missing)}")
    _sources_in_use.append(root)
    try:
        yield root
    finally:
        _sources_in_use.pop()


def provided_labels() -> dict[str, str]:
    """The labels a top source must define, each with the shared include that uses it."""
    return dict(_PROVIDES.findall(CONTRACT.read_text(encoding="utf-8")))


def check_contract(source: Path) -> None:
    """Refuses a top source that does not define every label of contract.inc."""
    defined = set(_LABEL_DEFINITION.findall(source.read_text(encoding="utf-8")))
    missing = [(label, include) for label, include in provided_labels().items() if label not in defined]
    if missing:
        named = ", ".join(f"{label} (called by common/{include})" for label, include in missing)
        raise ContractError(f"{source.name} does not define {named}: every hypervisor provides the labels "
                            f"of hypervisors/common/contract.inc")
FRAME_RECORD_BYTES = 16                 # common/memory.inc shifts by FRAME_RECORD_SHIFT, its log2


@dataclass(frozen=True)
class Hypervisor:
    """One hypervisor version: its top source, version number, time slice and record layouts."""

    name: str
    version: int                        # CPUID 0x40000001 EAX and the version hypercall: major << 16 | minor
    quantum: int                        # VMX-preemption-timer ticks a VP runs before the next one
    entry_symbol: str = "cold_entry"    # where the firmware starts every LP (docs/boot.md)

    @property
    def source(self) -> Path:
        return sources_root() / self.name / f"{self.name}.s"

    @property
    def records(self) -> layouts.Records:
        return layouts.RECORDS[self.name]

    def __post_init__(self) -> None:
        if self.records.frame.size != FRAME_RECORD_BYTES:   # common/memory.inc shifts by FRAME_RECORD_SHIFT
            raise ValueError(f"{self.name}: frame records must be {FRAME_RECORD_BYTES} bytes")
        vp = self.records.vp                                 # VP records lie one after the other from a page
        if vp.size % vp_state.FXSAVE_ALIGNMENT or vp.offset("fx_area") % vp_state.FXSAVE_ALIGNMENT:
            raise ValueError(f"{self.name}: VP records and their FXSAVE areas must be 16-byte aligned")
        msr_offsets = [vp.offset(name) for name, _ in vp_state.SHARED_MSRS]
        if msr_offsets != list(range(msr_offsets[0], msr_offsets[0] + 8 * len(msr_offsets), 8)):
            raise ValueError(f"{self.name}: the shared MSRs must follow each other in table order (vp_state.inc loops)")


HYPERVISORS = {
    "hv1": Hypervisor("hv1", version=0x0001_0000, quantum=20_000),
    "hv2": Hypervisor("hv2", version=0x0002_0000, quantum=30_000),
}
HV1_QUANTUM = HYPERVISORS["hv1"].quantum
# The slice of a VP no other VP of its LP waits for (schedule.inc vp_alone_on_lp): long, so that a
# lone compiled guest runs without preemption exits; within the preemption timer's 32 bits.
ALONE_QUANTUM = 1 << 30

# Enumerations of vmx_defs exported to assembly as PREFIX_MEMBER.
_ENUM_PREFIXES = {
    vmx_defs.PinBasedControls: "PIN", vmx_defs.PrimaryProcessorControls: "PROC",
    vmx_defs.SecondaryProcessorControls: "PROC2", vmx_defs.ExitControls: "EXIT_CTL",
    vmx_defs.EntryControls: "ENTRY_CTL", vmx_defs.ExitReason: "EXIT_REASON", vmx_defs.Cr0: "CR0",
    vmx_defs.Cr4: "CR4", vmx_defs.Efer: "EFER", vmx_defs.ExceptionVector: "VECTOR",
    vmx_defs.InterruptionType: "INTR_TYPE", vmx_defs.MemoryType: "MEMORY_TYPE", vmx_defs.Rflags: "RFLAGS",
    vmx_defs.InveptType: "INVEPT_TYPE", vmx_defs.ActivityState: "ACTIVITY",
    vmx_defs.Interruptibility: "INTERRUPTIBILITY", disk.DiskCommand: "DISK_COMMAND", disk.DiskStatus: "DISK_STATUS",
}
_DEVICE_PORTS = ("COM1_BASE", "DEBUG_EXIT_PORT", "CLOCK_LOW_PORT", "CLOCK_HIGH_PORT", "LP_ID_PORT",
                 "LP_COUNT_PORT", "CONSOLE_CHANNEL_PORT", "RESTART_PHASE_PORT", "DOORBELL_STATUS_PORT",
                 "DOORBELL_DATA_PORT", "DOORBELL_VECTOR_PORT", "IPI_PORT", "IPI_DESTINATION_SHIFT", "IPI_ALL_BUT_SELF",
                 "DISK_BLOCK_PORT", "DISK_ADDRESS_LOW_PORT", "DISK_ADDRESS_HIGH_PORT", "DISK_COUNT_PORT",
                 "DISK_COMMAND_PORT", "DISK_VECTOR_PORT", "DISK_CAPACITY_PORT",
                 "IOMMU_ROOT_LOW_PORT", "IOMMU_ROOT_HIGH_PORT", "IOMMU_CONTROL_PORT", "IOMMU_INVALIDATE_PORT",
                 "BLOCK_DEVICE_BASE", "BLOCK_DEVICE_STRIDE", "DEVICE_QUEUE_SIZE", "DEVICE_ROUTE")


# devices.inc's IDT entry stubs for the block devices' completion interrupts: one per device, this
# many bytes apart (cpu.inc points device n's gate at the n-th).
DEVICE_GATE_BYTES = 16


def _device_constants() -> dict[str, int]:
    """What devices.inc needs of the block devices and the IOMMU (docs/machine.md 6.11, 6.12)."""
    return {"BLOCK_DEVICE_COUNT": block_devices.DEVICE_COUNT,
            "BLOCK_DEVICE_STRIDE_SHIFT": ports.BLOCK_DEVICE_STRIDE.bit_length() - 1,
            "DEVICE_ROUTE_LP_SHIFT": block_devices.ROUTE_LP_SHIFT,
            "DEVICE_GATE_BYTES": DEVICE_GATE_BYTES,
            "IOMMU_ROOT_PRESENT": iommu.ROOT_PRESENT,
            "IOMMU_ROOT_ENTRY_SHIFT": iommu.ROOT_ENTRY_BYTES.bit_length() - 1,
            "IOMMU_CONTROL_TRANSLATE": iommu.CONTROL_TRANSLATE}


def _enum_constants() -> dict[str, int]:
    constants = {}
    for enumeration, prefix in _ENUM_PREFIXES.items():
        for member in enumeration:
            constants[f"{prefix}_{member.name}"] = int(member)
    return constants


def _guest_state_check_constants() -> dict[str, int]:
    """What the receiver's checks of a VP's guest state need of the machine (service.inc,
    guest_state.inc): the facts of emu/vmx_caps.py and the reserved bits of emu/vmentry_checks.py.
    CR0 and CR4 fixed bits are not here: the hypervisor reads them with RDMSR."""
    caps = MACHINE_VMX_CAPABILITIES
    return {
        "GUEST_LINEAR_ADDRESS_WIDTH": caps.linear_address_width,
        "GUEST_MAXPHYADDR": caps.maxphyaddr,
        "GUEST_EFER_SUPPORTED": caps.efer_supported,
        "GUEST_ACTIVITY_STATES": sum(1 << int(state) for state in caps.activity_states),
        "GUEST_CR0_UNCHECKED": vmentry_checks.GUEST_CR0_UNCHECKED,
        "GUEST_INTERRUPTIBILITY_RESERVED": vmentry_checks.INTERRUPTIBILITY_RESERVED_BITS,
        "GUEST_PENDING_DBG_RESERVED": vmentry_checks.PENDING_DBG_RESERVED_BITS | vmx_defs.PENDING_DBG_RTM,
    }


def hypervisor(name: str) -> Hypervisor:
    if name not in HYPERVISORS:
        raise ValueError(f"unknown hypervisor {name!r}; known: {', '.join(sorted(HYPERVISORS))}")
    return HYPERVISORS[name]


@lru_cache(maxsize=None)
def constants(name: str = "hv1") -> dict[str, int]:
    """Layouts (the hypervisor's own records under generic names too), states, VMCS encodings and
    offsets, VMX bits, device ports, the memory map, and the hypervisor's version and time slice."""
    spec = hypervisor(name)
    vmx_values = {name: value for name, value in vars(vmx_defs).items()
                  if name.isupper() and isinstance(value, int) and not isinstance(value, enum.Enum)}
    caps = MACHINE_VMX_CAPABILITIES
    return merge_constants(
        *(layout.constants() for layout in layouts.LAYOUTS),
        layouts.STATES,
        {"BOOT_MAGIC_VALUE": layouts.BOOT_INFO_MAGIC, "BOOT_PROTOCOL_VERSION": layouts.BOOT_PROTOCOL_VERSION},
        vmcs_fields.layout_constants(),
        _enum_constants(),
        vmx_values,
        {name: getattr(ports, name) for name in _DEVICE_PORTS},
        _device_constants(),
        {"DISK_BLOCK_SIZE": disk.DISK_BLOCK_SIZE, "DISK_BLOCK_SHIFT": disk.DISK_BLOCK_SIZE.bit_length() - 1},
        {"UART_LSR": ports.UART_LSR, "LSR_READY": ports.LSR_THR_EMPTY | ports.LSR_TRANSMITTER_EMPTY},
        memory_map.constants(),
        segments.constants(),
        invariants.constants(),
        guest_abi.constants(),
        transfer.constants(),
        vp_state.constants(),
        spec.records.constants(),
        {"QUANTUM": spec.quantum, "ALONE_QUANTUM": ALONE_QUANTUM, "HV_VERSION": spec.version,
         "FRAME_RECORD_SHIFT": FRAME_RECORD_BYTES.bit_length() - 1,
         "EPTP_VALUE_FLAGS": vmx_defs.make_eptp(0)},        # an EPTP's bits besides the PML4's address
        _guest_state_check_constants(),
        {"VMCS_REVISION": caps.vmcs_revision_id,
         "PIN_MUST_BE_ONE": caps.pin_based.must_be_one, "PROC_MUST_BE_ONE": caps.primary_processor.must_be_one,
         "PROC2_MUST_BE_ONE": caps.secondary_processor.must_be_one, "EXIT_MUST_BE_ONE": caps.exit.must_be_one,
         "ENTRY_MUST_BE_ONE": caps.entry.must_be_one},
    )


@lru_cache(maxsize=None)
def generated_sources() -> Path:
    """A directory with the include files generated from Python tables (transfer.generated_includes)."""
    directory = Path(tempfile.mkdtemp(prefix="hhr-generated-"))
    for name, text in {**transfer.generated_includes(), "msr_tables.inc": vp_state.msr_tables()}.items():
        (directory / name).write_text(text)
    return directory


def include_dirs() -> list[Path]:
    return [sources_root() / COMMON_SOURCES.name, generated_sources()]


def image(name: str) -> Image:
    """The assembled hypervisor `name`, at its load address, from the sources in use (sources_root)."""
    return _assembled(name, sources_root())


@lru_cache(maxsize=None)
def _assembled(name: str, root: Path) -> Image:
    spec = hypervisor(name)
    check_contract(spec.source)
    assembled = assemble_file(spec.source, memory_map.HYPERVISOR_BASE, constants=constants(name),
                              include_dirs=include_dirs())
    _check_device_gates(name, assembled)
    return assembled


def _check_device_gates(name: str, assembled: Image) -> None:
    """devices.inc has exactly one gate stub per block device (cpu.inc installs as many as there are)."""
    span = assembled.symbol("device_gates_end") - assembled.symbol("device_gates")
    if not (block_devices.DEVICE_COUNT - 1) * DEVICE_GATE_BYTES < span <= block_devices.DEVICE_COUNT * DEVICE_GATE_BYTES:
        raise ValueError(f"{name}: devices.inc must have one DEVICE_GATE per block device ({block_devices.DEVICE_COUNT})")
