"""Guests by name or path: the built-in guests (assembly in guests/builtin), flat binaries and static ELF64 files, with `,vps=N,mem=SIZE`."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from asm import AsmError, Image, assemble_file
from guests import cpustate_layout, device_abi, elf
from hypervisors import guest_abi
from hypervisors.boot import GuestImage
from hypervisors.memory_map import DEFAULT_GUEST_MEMORY, GUEST_LOAD_ADDRESS

BUILTIN_DIRECTORY = Path(__file__).resolve().parent / "builtin"
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?\Z", re.IGNORECASE)
_DEVICE = re.compile(r"blk(\d+)\Z")                   # an assignable block device (docs/machine.md 6.11)


class GuestSpecError(ValueError):
    """A --guest argument that names no guest or has a bad option; the message says which."""


def builtin_names() -> list[str]:
    return sorted(path.stem for path in BUILTIN_DIRECTORY.glob("*.s"))


# Built-in guests with a layout of their own in Python: its constants join the guest ABI's.
GUEST_LAYOUTS = {"cpustate": cpustate_layout.constants, "cpustate_long": cpustate_layout.constants,
                 "blkstream": device_abi.constants, "blkirq": device_abi.constants,
                 "blkwindow": device_abi.constants, "dmahostile": device_abi.constants}


def builtin_constants(name: str) -> dict[str, int]:
    """The constants a built-in guest is assembled with."""
    constants = guest_abi.constants()
    if name in GUEST_LAYOUTS:
        constants |= GUEST_LAYOUTS[name]()
    return constants


@lru_cache(maxsize=None)
def builtin_assembly(name: str) -> Image:
    """A built-in guest assembled at its load address, with its symbols."""
    try:
        return assemble_file(BUILTIN_DIRECTORY / f"{name}.s", GUEST_LOAD_ADDRESS, constants=builtin_constants(name))
    except AsmError as error:   # a broken built-in guest is a bug of ours; say where
        raise GuestSpecError(f"built-in guest {name!r} does not assemble: {error}") from None


def builtin_image(name: str) -> bytes:
    return builtin_assembly(name).code


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise GuestSpecError(f"bad size {text!r}: use a number with an optional K, M or G (64M)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def parse(spec: str) -> GuestImage:
    """`NAME-or-PATH[,vps=N][,mem=SIZE][,device=blkN]` to a guest image."""
    target, *options = [part.strip() for part in spec.split(",")]
    vps, memory, device = 1, DEFAULT_GUEST_MEMORY, None
    for option in options:
        key, _, value = option.partition("=")
        if key == "vps" and value.isdigit() and int(value) >= 1:
            vps = int(value)
        elif key == "mem" and value:
            memory = parse_size(value)
        elif key == "device" and _DEVICE.match(value):
            device = int(_DEVICE.match(value).group(1))
        else:
            raise GuestSpecError(f"bad guest option {option!r} in {spec!r}: use vps=N, mem=SIZE or device=blkN")
    if target in builtin_names():
        return GuestImage(target, builtin_image(target), memory, vps, device=device)
    path = Path(target)
    if not path.is_file():
        raise GuestSpecError(f"no built-in guest or file named {target!r} "
                             f"(built-in: {', '.join(builtin_names())})")
    image = path.read_bytes()
    if not image:
        raise GuestSpecError(f"guest file {target!r} is empty")
    if elf.is_elf(image):
        try:
            flat = elf.flatten(image)
        except elf.ElfError as error:
            raise GuestSpecError(f"guest file {target!r}: {error}") from None
        return GuestImage(path.stem, flat.image, memory, vps, flat.entry, device=device,
                          zero_fill=flat.extent - len(flat.image))
    return GuestImage(path.stem, image, memory, vps, device=device)
