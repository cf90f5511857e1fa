"""The hypercall ABI every hhr hypervisor gives its guests (docs/guests.md): numbers, error codes and the map window."""
from __future__ import annotations

import enum

from emu import ports
from hypervisors.memory_map import GIB


class Hypercall(enum.IntEnum):
    """VMCALL with RAX = the number, arguments in RDI and RSI, the result in RAX."""

    VERSION = 0
    YIELD = 1
    CLOCK = 2
    CONSOLE_WRITE = 3
    SET_TIMER = 4
    MAP_PAGE = 5
    UNMAP_PAGE = 6
    SET_DEVICE_INTERRUPT = 7


class HypercallError(enum.IntEnum):
    """Negative results in RAX, with Linux's errno numbers so that they read familiarly."""

    ENOENT = -2        # unmap of a page that is not mapped
    ENOMEM = -12       # the partition's map quota or the host's free memory is used up
    EEXIST = -17       # map of a page that is already mapped
    ENODEV = -19       # set-device-interrupt by a guest that has no block device
    EINVAL = -22       # an argument outside what the hypercall accepts
    ENOSYS = -38       # no such hypercall


EXIT_PORT = ports.DEBUG_EXIT_PORT      # OUT a byte: the guest ends with that exit code
CONSOLE_WRITE_MAX = 4096              # bytes one console write may carry
TIMER_MIN_PERIOD = 1000               # shorter periods would leave a guest nothing but ticks
FIRST_INTERRUPT_VECTOR = 32           # vectors 0-31 are the processor's exceptions
LAST_INTERRUPT_VECTOR = 255

# Pages mapped by hypercall appear only in this guest-physical window, above any guest's RAM; the
# page tables a hypervisor builds for its guest map it as identity, like RAM (docs/guests.md).
MAP_WINDOW_BASE = 64 * GIB
MAP_WINDOW_SIZE = 1 * GIB
MAP_QUOTA_PAGES = 16384               # 4 KiB pages a partition may have mapped at once (64 MiB)


def constants() -> dict[str, int]:
    """HC_<NAME> for each hypercall, the error names, and the limits, for assembly sources."""
    values = {f"HC_{call.name}": int(call) for call in Hypercall}
    values.update({error.name: int(error) for error in HypercallError})
    values.update({name: value for name, value in globals().items()
                   if name.isupper() and isinstance(value, int) and name != "GIB"})
    return values
