"""The firmware step of docs/boot.md: a machine with a hypervisor image, guest images and a boot info, started on every LP."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from emu import ports
from emu.block_devices import DEVICE_COUNT as BLOCK_DEVICE_COUNT
from emu.machine import Machine
from hypervisors import build, guest_abi, layouts, transfer
from hypervisors.globals_view import HypervisorGlobals
from hypervisors.memory_map import (
    BOOT_INFO_ADDRESS, DEFAULT_GUEST_MEMORY, FREE_BASE, GUEST_LOAD_ADDRESS, GUEST_STAGING_BASE,
    GUEST_STAGING_END, GUEST_VP_STACK_SIZE, HEAP_BASE, HEAP_SIZE, HYPERVISOR_BASE, HYPERVISOR_MAX_SIZE,
    LARGE_PAGE_SIZE, MAX_LPS, MAX_PARTITIONS, MAX_VPS, MIB, PAGE_SIZE,
)

FIRMWARE_STACK_TOP = 0x8000            # below the boot info; the hypervisor sets up its own at once
FIRMWARE_STACK_SIZE = 0x100
MIN_RAM = 64 * MIB
KIB = 1 << 10
# What one partition's full map quota takes from free memory: its pages, the EPT page directory and
# page tables of its window, and the page records of the frames they come from (one page in 512).
_MAP_WINDOW_TABLE_PAGES = 1 + guest_abi.MAP_WINDOW_SIZE // LARGE_PAGE_SIZE
_QUOTA_POOL_PAGES = guest_abi.MAP_QUOTA_PAGES + _MAP_WINDOW_TABLE_PAGES
RESTART_RESERVE = 2 * (transfer.SERVICE_REGION_SIZE + transfer.TRANSFER_AREA_SIZE)
MAP_POOL_PER_GUEST = (_QUOTA_POOL_PAGES + -(-_QUOTA_POOL_PAGES // (LARGE_PAGE_SIZE // PAGE_SIZE - 1))) * PAGE_SIZE


# Called with every Booted that boot() and resume() make, and every BareBooted announced, before its
# machine runs: a debugger attaches here (tools/gdb). Empty unless someone listens.
BOOT_OBSERVERS: list[Callable[["Booted | BareBooted"], None]] = []


class BootError(ValueError):
    """A machine that cannot be built as asked (sizes, counts); the message says what to change."""


@dataclass(frozen=True)
class GuestImage:
    """A guest to create: a flat image loaded at GUEST_LOAD_ADDRESS, its RAM and its VP count."""

    name: str
    image: bytes                        # what is staged and copied into guest RAM
    memory_size: int = DEFAULT_GUEST_MEMORY
    vp_count: int = 1
    entry: int = GUEST_LOAD_ADDRESS
    zero_fill: int = 0                  # bytes after the image that the guest uses and finds zero (an ELF's bss)
    device: int | None = None           # the block device assigned to it (docs/machine.md 6.11), if any

    @property
    def extent(self) -> int:
        """The bytes from GUEST_LOAD_ADDRESS on that the guest's image takes in its RAM, zero fill included."""
        return len(self.image) + self.zero_fill


@dataclass
class Booted(HypervisorGlobals):
    """A started machine, the hypervisor running on it and its guests; its globals read through
    HypervisorGlobals (hypervisors/globals_view.py)."""

    machine: Machine
    hypervisor: str                     # the hypervisor running now (a hot restart changes it)
    guests: tuple[GuestImage, ...]
    image_base: int = HYPERVISOR_BASE   # where its image is (a hot restart loads it elsewhere)

    def partitions(self) -> list[dict]:
        """The hypervisor's partition records, one per guest, in boot order."""
        return self.partition_records(len(self.guests))

    def device_owners(self) -> dict[int, int]:
        """The hypervisor's own record of the block devices it has assigned: device to partition number."""
        return self.device_owner_table(len(self.guests))


def _check(guests: tuple[GuestImage, ...], lps: int) -> None:
    assigned = [guest.device for guest in guests if guest.device is not None]
    if len(assigned) != len(set(assigned)):
        raise BootError("a block device can be assigned to one guest only")
    if not 1 <= lps <= MAX_LPS:
        raise BootError(f"--lps must be 1 to {MAX_LPS}, not {lps}")
    if not 1 <= len(guests) <= MAX_PARTITIONS:
        raise BootError(f"between 1 and {MAX_PARTITIONS} guests, not {len(guests)}")
    if sum(guest.vp_count for guest in guests) > MAX_VPS:
        raise BootError(f"at most {MAX_VPS} VPs in all")
    for guest in guests:
        if guest.memory_size % LARGE_PAGE_SIZE or guest.memory_size < 4 * MIB:
            raise BootError(f"guest {guest.name}: memory must be a multiple of 2 MiB, at least 4 MiB")
        if guest.memory_size > guest_abi.MAP_WINDOW_BASE:
            raise BootError(f"guest {guest.name}: at most {guest_abi.MAP_WINDOW_BASE // MIB} MiB "
                            "(the map window lies above guest RAM)")
        if not 1 <= guest.vp_count:
            raise BootError(f"guest {guest.name}: at least one VP")
        if guest.device is not None and not 0 <= guest.device < BLOCK_DEVICE_COUNT:
            raise BootError(f"guest {guest.name}: the machine has block devices blk0 to blk{BLOCK_DEVICE_COUNT - 1}")
        stacks = guest.vp_count * GUEST_VP_STACK_SIZE
        if not GUEST_LOAD_ADDRESS <= guest.entry < GUEST_LOAD_ADDRESS + guest.extent:
            raise BootError(f"guest {guest.name}: entry {guest.entry:#x} is not inside its image")
        if GUEST_LOAD_ADDRESS + guest.extent > guest.memory_size - stacks:
            needed = -(-(GUEST_LOAD_ADDRESS + guest.extent + stacks) // LARGE_PAGE_SIZE) * LARGE_PAGE_SIZE
            raise BootError(f"guest {guest.name}: its image ({_size(len(guest.image))}"
                            + (f" from the file, then {_size(guest.zero_fill)} of zero fill" if guest.zero_fill else "")
                            + f") does not fit below its stacks in {guest.memory_size // MIB} MiB: "
                            f"give it mem={needed // MIB}M or more")


def _size(count: int) -> str:
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count / KIB:.1f} KiB"


def boot(guests: list[GuestImage] | tuple[GuestImage, ...], *, hypervisor: str = "hv1", lps: int = 1,
         ram_size: int | None = None, record_events: bool = False, fast_transitions: bool = True) -> Booted:
    """Builds the machine, loads the hypervisor and the guests, writes the boot info, starts it."""
    guests = tuple(guests)
    _check(guests, lps)
    image = build.image(hypervisor)
    needed = FREE_BASE + sum(guest.memory_size for guest in guests)
    # By default every guest has room for its whole map quota, and there is room for two service
    # regions and transfer areas (the hypervisor's, and one for the restart after next; RAM is only
    # committed where written).
    with_pool = needed + len(guests) * MAP_POOL_PER_GUEST + RESTART_RESERVE
    ram = ram_size if ram_size is not None else max(MIN_RAM, -(-with_pool // LARGE_PAGE_SIZE) * LARGE_PAGE_SIZE)
    if ram < needed:
        raise BootError(f"--ram {ram // MIB} MiB is too small: the guests need {needed // MIB} MiB in all")
    machine = Machine(ram_size=ram, lps=lps, record_events=record_events, fast_transitions=fast_transitions)
    _load_hypervisor(machine, image, hypervisor)
    descriptors = bytearray()
    staging = GUEST_STAGING_BASE
    for guest in guests:
        if staging + len(guest.image) > GUEST_STAGING_END:   # zero fill is not staged: guest RAM starts zero
            raise BootError("the guest images together are larger than the staging area "
                            f"({(GUEST_STAGING_END - GUEST_STAGING_BASE) // MIB} MiB; an ELF's bss takes none of it)")
        machine.load(staging, guest.image)
        descriptors += layouts.GUEST_DESCRIPTOR.pack(
            image=staging, image_size=len(guest.image), memory_size=guest.memory_size, entry=guest.entry,
            vp_count=guest.vp_count, device=0 if guest.device is None else guest.device + 1,
            name=guest.name.encode()[:layouts.GUEST_NAME_BYTES].ljust(
                layouts.GUEST_NAME_BYTES, b"\0"))
        staging += -(-len(guest.image) // PAGE_SIZE) * PAGE_SIZE
    descriptors_address = BOOT_INFO_ADDRESS + layouts.BOOT_INFO.size
    machine.load(descriptors_address, bytes(descriptors))
    _start(machine, hypervisor, image, guest_count=len(guests), guests=descriptors_address)
    return _observed(Booted(machine, hypervisor, guests))


def _observed(booted: Booted) -> Booted:
    for observer in BOOT_OBSERVERS:
        observer(booted)
    return booted


@dataclass
class BareBooted:
    """A machine started without one of hhr's hypervisors (a lab's monitor on the bare machine), as
    the boot observers see it: the program in root mode is `label`, loaded at `image_base`."""

    machine: Machine
    label: str
    image_base: int
    symbols_hint: str = ""              # how to load the program's symbols into gdb
    hypervisor: None = None
    guests: tuple = ()


def announce(bare: BareBooted) -> BareBooted:
    """Tells the boot observers of a machine started by other means than boot()."""
    for observer in BOOT_OBSERVERS:
        observer(bare)
    return bare


def observed() -> bool:
    """Whether anybody listens (a debugger): then a program's symbols are worth writing out."""
    return bool(BOOT_OBSERVERS)


def _load_hypervisor(machine: Machine, image, name: str) -> None:
    if len(image.code) > HYPERVISOR_MAX_SIZE:
        raise BootError(f"{name} image of {len(image.code)} bytes is larger than {HYPERVISOR_MAX_SIZE}")
    machine.load(HYPERVISOR_BASE, image.code)


def _start(machine: Machine, hypervisor: str, image, **fields) -> None:
    """The boot info (docs/boot.md) and every LP at the hypervisor's entry."""
    lps, ram = len(machine.lps), machine.ram.size
    machine.load(BOOT_INFO_ADDRESS, layouts.BOOT_INFO.pack(
        magic=layouts.BOOT_INFO_MAGIC, version=layouts.BOOT_PROTOCOL_VERSION, lp_count=lps, ram_size=ram,
        heap_base=HEAP_BASE, heap_size=HEAP_SIZE, free_base=FREE_BASE, free_size=ram - FREE_BASE,
        doorbell_port=ports.DOORBELL_STATUS_PORT, **fields))
    stacks = [FIRMWARE_STACK_TOP - lp * FIRMWARE_STACK_SIZE for lp in range(lps)]
    machine.start(image.symbol(build.hypervisor(hypervisor).entry_symbol), stacks, argument=BOOT_INFO_ADDRESS)


def resume(suspended: Booted, hypervisor: str) -> Booted:
    """The firmware after a suspend: the machine reset (RAM zero, the disk kept, virtual time going
    on), `hypervisor` loaded and started with BOOT_MODE_RESUME and no guests to create; it reads
    them back from the disk (docs/protocol.md, Suspend and resume)."""
    image = build.image(hypervisor)
    machine = suspended.machine.reset()
    _load_hypervisor(machine, image, hypervisor)
    _start(machine, hypervisor, image, mode=layouts.BOOT_MODE_RESUME, protocol=transfer.PROTOCOL_VERSION,
           resume_block=transfer.SUSPEND_HEADER_BLOCK)
    return _observed(Booted(machine, hypervisor, suspended.guests))
