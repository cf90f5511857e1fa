"""Python side of the C hot path: loads emu._fastpath, wires it to Unicorn, and owns its per-context state."""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import weakref
from dataclasses import dataclass
from typing import Callable

from unicorn import unicorn_const as uc_const
from unicorn import x86_const
from unicorn.unicorn_py3 import unicorn as uc_binding

from emu import fastpath_digest, msrs
from emu.vmx_defs import MSR_IA32_EFER


def _built_from_current_sources(marker: bytes) -> bool:
    """Whether a compiled emu._fastpath exists and carries `marker`, the digest of today's
    fastpath.c and .h (a checkout that moved on since its last build must not load the old module)."""
    spec = importlib.util.find_spec("emu._fastpath")
    if spec is None or spec.origin is None:
        return False
    try:
        with open(spec.origin, "rb") as module_file:
            return marker in module_file.read()
    except OSError:
        return False


def _load_fastpath():
    """Imports the compiled module, building it in place first when running from a source tree
    that has none, or one built from other sources."""
    if not _built_from_current_sources(fastpath_digest.marker()):
        import warnings

        from emu import fastpath_build

        try:
            with warnings.catch_warnings():   # setuptools comments on pyproject.toml while it builds
                warnings.simplefilter("ignore")
                fastpath_build.ffi.compile(tmpdir=str(fastpath_build.HERE.parent), verbose=False)
        except Exception as exc:  # an installed package without a compiler: the installed module
            warnings.warn(f"emu._fastpath could not be rebuilt from its sources ({exc})")
        importlib.invalidate_caches()
    return importlib.import_module("emu._fastpath")


_fastpath = _load_fastpath()
ffi = _fastpath.ffi
lib = _fastpath.lib

MODE_ROOT = lib.HHR_MODE_ROOT
MODE_GUEST = lib.HHR_MODE_GUEST
ACCESS_READ = lib.HHR_ACCESS_READ
ACCESS_WRITE = lib.HHR_ACCESS_WRITE
ACCESS_FETCH = lib.HHR_ACCESS_FETCH

FAULT_NONE = lib.HHR_FAULT_NONE
FAULT_PAGE_FAULT = lib.HHR_FAULT_PAGE_FAULT
FAULT_EPT_VIOLATION = lib.HHR_FAULT_EPT_VIOLATION
FAULT_EPT_MISCONFIG = lib.HHR_FAULT_EPT_MISCONFIG
FAULT_NONEXISTENT_MEMORY = lib.HHR_FAULT_NONEXISTENT_MEMORY

STOP_NONE = lib.HHR_STOP_NONE
STOP_BUDGET = lib.HHR_STOP_BUDGET
STOP_FAULT = lib.HHR_STOP_FAULT
STOP_NEW_TRAPS = lib.HHR_STOP_NEW_TRAPS
STOP_INTERRUPT_WINDOW = lib.HHR_STOP_INTERRUPT_WINDOW
STOP_NONCANONICAL = lib.HHR_STOP_NONCANONICAL

ICOUNT_CACHE_ENTRIES = 1 << 16
NEW_BLOCK_STOP = -1  # hhr_on_new_block's answer: stop before the block, it holds new trap points

# Registers a VM exit hands from the guest to the host and a VM entry hands back (SDM Vol. 3C 28.5:
# the processor does not save or load general-purpose registers other than RSP on VM transitions).
GENERAL_PURPOSE_REGISTERS = (
    x86_const.UC_X86_REG_RAX, x86_const.UC_X86_REG_RBX, x86_const.UC_X86_REG_RCX,
    x86_const.UC_X86_REG_RDX, x86_const.UC_X86_REG_RSI, x86_const.UC_X86_REG_RDI,
    x86_const.UC_X86_REG_RBP, x86_const.UC_X86_REG_R8, x86_const.UC_X86_REG_R9,
    x86_const.UC_X86_REG_R10, x86_const.UC_X86_REG_R11, x86_const.UC_X86_REG_R12,
    x86_const.UC_X86_REG_R13, x86_const.UC_X86_REG_R14, x86_const.UC_X86_REG_R15,
)
_GPR_IDS = ffi.new("int[]", GENERAL_PURPOSE_REGISTERS)
HANDOVER_REGISTERS = _GPR_IDS
HANDOVER_REGISTER_COUNT = len(GENERAL_PURPOSE_REGISTERS)
# Register numbers 0-15 of ModRM/REX (SDM Vol. 2A Table 2-2 and 2.2.1.2).
MODRM_REGISTER_ORDER = (
    x86_const.UC_X86_REG_RAX, x86_const.UC_X86_REG_RCX, x86_const.UC_X86_REG_RDX, x86_const.UC_X86_REG_RBX,
    x86_const.UC_X86_REG_RSP, x86_const.UC_X86_REG_RBP, x86_const.UC_X86_REG_RSI, x86_const.UC_X86_REG_RDI,
    x86_const.UC_X86_REG_R8, x86_const.UC_X86_REG_R9, x86_const.UC_X86_REG_R10, x86_const.UC_X86_REG_R11,
    x86_const.UC_X86_REG_R12, x86_const.UC_X86_REG_R13, x86_const.UC_X86_REG_R14, x86_const.UC_X86_REG_R15,
)


# Shared state (emu/fastpath.h, hhr_shared): the classes, and the registers each copies between
# instances, in an order whose writes do not disturb each other (FSW, which holds TOP, before the
# physical x87 registers; the MSRs by index through UC_X86_REG_MSR).
USES_X87_SSE = lib.HHR_USES_X87_SSE
USES_SCALARS = lib.HHR_USES_SCALARS
USES_ALL = lib.HHR_USES_ALL
BLOCK_USES_SHIFT = lib.HHR_BLOCK_USES_SHIFT
XMM_REGISTER_COUNT = 16          # XMM0-XMM15 in 64-bit mode (SDM Vol. 1 10.2.2)
X87_REGISTER_COUNT = 8
X87_SSE_REGISTERS = (
    (x86_const.UC_X86_REG_FPSW, x86_const.UC_X86_REG_FPCW, x86_const.UC_X86_REG_FPTAG,
     x86_const.UC_X86_REG_FIP, x86_const.UC_X86_REG_FCS, x86_const.UC_X86_REG_FDP,
     x86_const.UC_X86_REG_FDS, x86_const.UC_X86_REG_FOP)
    + tuple(x86_const.UC_X86_REG_FP0 + n for n in range(X87_REGISTER_COUNT))
    + (x86_const.UC_X86_REG_MXCSR,)
    + tuple(getattr(x86_const, f"UC_X86_REG_XMM{n}") for n in range(XMM_REGISTER_COUNT)))
SCALAR_REGISTERS = (x86_const.UC_X86_REG_CR2, x86_const.UC_X86_REG_DR0, x86_const.UC_X86_REG_DR1,
                    x86_const.UC_X86_REG_DR2, x86_const.UC_X86_REG_DR3, x86_const.UC_X86_REG_DR6)


def _shared_register_table(registers: tuple[int, ...], msr_indices: tuple[int, ...] = ()):
    entries = [(register, 0) for register in registers] + \
        [(x86_const.UC_X86_REG_MSR, index) for index in msr_indices]
    table = ffi.new("hhr_shared_register[]", len(entries))
    for slot, (register, index) in zip(table, entries):
        slot.regid = register
        slot.msr = index
    return table


SHARED_REGISTER_TABLES = {
    lib.HHR_SHARED_X87_SSE: _shared_register_table(X87_SSE_REGISTERS),
    lib.HHR_SHARED_SCALARS: _shared_register_table(SCALAR_REGISTERS, tuple(sorted(msrs.SHARED_MSRS))),
}


def new_shared_state(root_ctx):
    """One LP's hhr_shared, its root instance holding the current values of every class."""
    shared = ffi.new("hhr_shared *")
    shared.root = root_ctx
    for cls, table in SHARED_REGISTER_TABLES.items():
        shared.registers[cls] = table
        shared.register_count[cls] = len(table)
        shared.holder[cls] = root_ctx
        shared.generation[cls] = 1
        root_ctx.held[cls] = 1
        root_ctx.holds |= 1 << cls
    root_ctx.shared = shared
    return shared


def _function_pointer(cfunction) -> int:
    return ctypes.cast(cfunction, ctypes.c_void_p).value


def _make_api():
    api = ffi.new("hhr_api *")
    api.emu_stop = ffi.cast("void *", _function_pointer(uc_binding.uclib.uc_emu_stop))
    api.reg_read = ffi.cast("void *", _function_pointer(uc_binding.uclib.uc_reg_read))
    api.reg_write = ffi.cast("void *", _function_pointer(uc_binding.uclib.uc_reg_write))
    api.emu_start = ffi.cast("void *", _function_pointer(uc_binding.uclib.uc_emu_start))
    for member, register in (("reg_cr0", x86_const.UC_X86_REG_CR0), ("reg_cr3", x86_const.UC_X86_REG_CR3),
                             ("reg_cr4", x86_const.UC_X86_REG_CR4), ("reg_rflags", x86_const.UC_X86_REG_RFLAGS),
                             ("reg_msr", x86_const.UC_X86_REG_MSR), ("reg_rip", x86_const.UC_X86_REG_RIP),
                             ("reg_rsp", x86_const.UC_X86_REG_RSP), ("reg_fs_base", x86_const.UC_X86_REG_FS_BASE),
                             ("reg_gs_base", x86_const.UC_X86_REG_GS_BASE), ("reg_gdtr", x86_const.UC_X86_REG_GDTR),
                             ("reg_idtr", x86_const.UC_X86_REG_IDTR)):
        setattr(api, member, register)
    for number, register in enumerate(MODRM_REGISTER_ORDER):
        api.gpr[number] = register
    api.msr_efer = MSR_IA32_EFER
    api.mem_read = uc_const.UC_MEM_READ
    api.mem_write = uc_const.UC_MEM_WRITE
    api.mem_fetch = uc_const.UC_MEM_FETCH
    return api


API = _make_api()

# hhr_on_new_block dispatches by python_id to the handler of the context that saw the block. The
# table holds each handler weakly: a bound method of its context, which must stay free to be
# collected with its machine (a strong entry here kept every machine ever built alive).
_new_block_handlers: dict[int, weakref.WeakMethod] = {}
_next_python_id = [1]


@ffi.def_extern()
def hhr_on_new_block(python_id, pc, size):
    return _new_block_handlers[python_id]()(pc, size)


@dataclass
class Fault:
    """A translation failure recorded by the C walker (SDM Vol. 3A 4.7, Vol. 3C 28.3.3.2)."""

    kind: int
    access: int
    linear: int
    guest_physical: int
    page_fault_error_code: int
    in_paging_structure: bool
    ept_qualification: int


def add_c_hook(uc, hook_type: int, cfunction_name: str, user_data) -> int:
    """Installs the C function `cfunction_name` of this module as a Unicorn hook of `hook_type` with
    `user_data` (a cffi pointer the caller keeps alive); returns the handle delete_hook takes."""
    return _register_hook(uc, hook_type, cfunction_name, user_data)


def add_io_hooks(uc, on_in: Callable[[int, int], int], on_out: Callable[[int, int, int], None],
                 console_queue=None) -> tuple:
    """Installs IN and OUT hooks that call `on_in(port, size)` for the value read and `on_out(port,
    size, value)` through cffi callbacks: the binding's hook_add wraps each call in a ctypes callback
    and two Python frames, several microseconds of every port access. As the binding does, an
    exception is kept in `uc._hook_exception` (emu_start raises it) and the run stops. With
    `console_queue` (an `hhr_port_out *`: a root instance), OUTs go to the C hook hhr_port_out_hook,
    which queues the console's in the transition loop and hands the others to `on_out`. Returns the
    callbacks, which the caller keeps alive as long as `uc`."""

    def failed(error: BaseException) -> None:
        if uc._hook_exception is None:   # the binding's rule: the first hook's exception is kept
            uc._hook_exception = error
        uc.emu_stop()

    def port_in(_uc, port, size, _user_data):
        try:
            return on_in(port, size)
        except BaseException as error:
            failed(error)
            return 0

    def port_out(_uc, port, size, value, _user_data):
        try:
            on_out(port, size, value)
        except BaseException as error:
            failed(error)

    callbacks = (ffi.callback("uint32_t(void *, uint32_t, int, void *)", port_in),
                 ffi.callback("void(void *, uint32_t, int, uint32_t, void *)", port_out))
    hooks = [(callbacks[0], ffi.NULL, x86_const.UC_X86_INS_IN), (callbacks[1], ffi.NULL, x86_const.UC_X86_INS_OUT)]
    if console_queue is not None:
        console_queue.forward = callbacks[1]
        hooks[1] = (ffi.addressof(lib, "hhr_port_out_hook"), console_queue, x86_const.UC_X86_INS_OUT)
    for function, user_data, instruction in hooks:
        handle = ctypes.c_size_t()
        err = uc_binding.uclib.uc_hook_add(uc._uch, ctypes.byref(handle), uc_const.UC_HOOK_INSN,
                                           ctypes.c_void_p(int(ffi.cast("uintptr_t", function))),
                                           ctypes.c_void_p(int(ffi.cast("uintptr_t", user_data))),
                                           ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(instruction))
        if err != uc_const.UC_ERR_OK:
            raise RuntimeError(f"uc_hook_add(port access) failed with Unicorn error {err}")
    return callbacks


def delete_hook(uc, handle: int) -> None:
    err = uc_binding.uclib.uc_hook_del(uc._uch, ctypes.c_size_t(handle))
    if err != uc_const.UC_ERR_OK:
        raise RuntimeError(f"uc_hook_del failed with Unicorn error {err}")


def _register_hook(uc, hook_type: int, cfunction_name: str, user_data, *extra) -> int:
    handle = ctypes.c_size_t()
    address = int(ffi.cast("uintptr_t", ffi.addressof(lib, cfunction_name)))
    err = uc_binding.uclib.uc_hook_add(
        uc._uch, ctypes.byref(handle), hook_type, ctypes.c_void_p(address),
        ctypes.c_void_p(int(ffi.cast("uintptr_t", user_data))), ctypes.c_uint64(1), ctypes.c_uint64(0), *extra)
    if err != uc_const.UC_ERR_OK:
        raise RuntimeError(f"uc_hook_add({cfunction_name}) failed with Unicorn error {err}")
    return handle.value


class FastState:
    """The C state of one Unicorn instance: counters, budget, translation mode and fault record."""

    def __init__(self, uc, ram_pointer: int, ram_size: int, maxphyaddr: int,
                 on_new_block: Callable[[int, int], int]):
        self.ctx = ffi.new("hhr_ctx *")
        self._icount_cache = ffi.new("hhr_icount_entry[]", ICOUNT_CACHE_ENTRIES)
        c = self.ctx
        c.api = API
        c.uc = uc_handle(uc)
        c.ram = ffi.cast("uint8_t *", ram_pointer)
        c.ram_size = ram_size
        c.maxphyaddr = maxphyaddr
        c.mode = MODE_ROOT
        c.icount_cache = self._icount_cache
        c.icount_cache_mask = ICOUNT_CACHE_ENTRIES - 1
        c.stop_at = 0
        self.python_id = _next_python_id[0]
        _next_python_id[0] += 1
        c.python_id = self.python_id
        _new_block_handlers[self.python_id] = weakref.WeakMethod(on_new_block)
        weakref.finalize(self, _new_block_handlers.pop, self.python_id, None)
        self._uc = uc
        _register_hook(uc, uc_const.UC_HOOK_TLB_FILL, "hhr_tlb_fill", c)
        _register_hook(uc, uc_const.UC_HOOK_BLOCK, "hhr_block_hook", c)

    def release(self) -> None:
        _new_block_handlers.pop(self.python_id, None)

    def acquire_shared(self, uses: int = USES_ALL) -> None:
        """Before the machine reads or writes shared state in this instance (docs/machine.md 7.4)."""
        lib.hhr_shared_acquire(self.ctx, uses)

    def attach_shared(self, shared) -> None:
        """This instance runs on the LP of `shared` from now on."""
        lib.hhr_shared_attach(self.ctx, shared)

    def detach_shared(self) -> None:
        """This instance leaves its LP; the values it holds go to the LP's root instance."""
        lib.hhr_shared_detach(self.ctx)

    @property
    def retired(self) -> int:
        return self.ctx.retired

    def set_mode(self, mode: int, eptp: int = 0) -> None:
        self.ctx.mode = mode
        self.ctx.eptp = eptp

    def forget_blocks(self) -> None:
        lib.hhr_forget_blocks(self.ctx)

    def fault(self) -> Fault:
        f = self.ctx.fault
        return Fault(f.kind, f.access, f.linear, f.guest_physical, f.page_fault_error_code,
                     bool(f.in_paging_structure), f.ept_qualification)

    def translate(self, linear: int, access: int) -> tuple[int | None, Fault | None]:
        """Translates a linear address with the instance's current CR0/CR3/CR4/EFER (and EPT)."""
        physical = ffi.new("uint64_t *")
        fault = ffi.new("hhr_fault *")
        if lib.hhr_translate_current(self.ctx, linear & 0xFFFF_FFFF_FFFF_FFFF, access, physical, fault):
            return physical[0], None
        f = fault[0]
        return None, Fault(f.kind, f.access, f.linear, f.guest_physical, f.page_fault_error_code,
                           bool(f.in_paging_structure), f.ept_qualification)

    def ept_translate(self, guest_physical: int, access: int) -> tuple[int | None, Fault | None]:
        host = ffi.new("uint64_t *")
        perms = ffi.new("uint32_t *")
        fault = ffi.new("hhr_fault *")
        if lib.hhr_ept_translate(self.ctx, guest_physical, access, host, perms, fault):
            return host[0], None
        f = fault[0]
        return None, Fault(f.kind, access, 0, f.guest_physical, 0, False, f.ept_qualification)


class RegisterWriteRefused(RuntimeError):
    """Unicorn refused a register write the machine relied on: a bug of the machine's (a write
    that can be refused for a guest's reasons is checked first, or made with Registers.try_write)."""

    def __init__(self, register: int, value, error: int):
        super().__init__(f"Unicorn refused to write register {register} = {value!r} (error {error})")
        self.register = register
        self.error = error


class Registers:
    """Scalar register access through Unicorn's C API (the binding's reg_read costs several
    microseconds; this costs well under one)."""

    def __init__(self, uc):
        self._handle = uc_handle(uc)
        self._value = ffi.new("uint64_t *")
        self._table = ffi.new("hhr_descriptor_table *")
        # Unicorn's uc_x86_msr: the MSR's index (32 bits, padded to 8 bytes), then its value.
        self._msr = ffi.new("uint64_t[2]")

    def read(self, register: int) -> int:
        API.reg_read(self._handle, register, self._value)
        return self._value[0]

    def write(self, register: int, value: int) -> None:
        error = self.try_write(register, value)
        if error != uc_const.UC_ERR_OK:
            raise RegisterWriteRefused(register, value, error)

    def try_write(self, register: int, value: int) -> int:
        """Writes a register; returns Unicorn's error code (UC_ERR_OK, or why it refused the value)."""
        self._value[0] = value & 0xFFFF_FFFF_FFFF_FFFF
        return API.reg_write(self._handle, register, self._value)

    def read_table(self, register: int) -> tuple[int, int]:
        """Base and limit of GDTR, IDTR, LDTR or TR."""
        API.reg_read(self._handle, register, self._table)
        return self._table.base, self._table.limit

    def read_descriptor(self, register: int) -> tuple[int, int, int]:
        """Selector, base and limit of GDTR, IDTR, LDTR or TR (the selector is 0 for GDTR and IDTR)."""
        API.reg_read(self._handle, register, self._table)
        return self._table.selector, self._table.base, self._table.limit

    def read_msr(self, index: int) -> int:
        """An MSR as the instance holds it (the binding's msr_read, without its Python wrappers)."""
        self._msr[0] = index
        API.reg_read(self._handle, API.reg_msr, self._msr)
        return self._msr[1]

    def write_table(self, register: int, base: int, limit: int) -> None:
        """Loads base and limit of a descriptor-table register, selector and attributes zero."""
        self._table.selector = 0
        self._table.base = base
        self._table.limit = limit
        self._table.flags = 0
        error = API.reg_write(self._handle, register, self._table)
        if error != uc_const.UC_ERR_OK:
            raise RegisterWriteRefused(register, (base, limit), error)


def uc_handle(uc):
    """The `uc_engine *` of a binding instance, for C code."""
    return ffi.cast("void *", ctypes.cast(uc._uch, ctypes.c_void_p).value)


def register_invalid_instruction_hook(uc, vmx_state) -> None:
    """Installs the C VMREAD/VMWRITE fast path; register it before any Python hook of that type."""
    _register_hook(uc, uc_const.UC_HOOK_INSN_INVALID, "hhr_invalid_instruction", vmx_state)


def register_guest_invalid_instruction_hook(uc, state) -> None:
    """Installs the C VMCALL recogniser of the transition loop; register it before Python's."""
    _register_hook(uc, uc_const.UC_HOOK_INSN_INVALID, "hhr_guest_invalid_instruction", state)


def copy_general_purpose_registers(source: FastState, destination: FastState) -> None:
    """Copies RAX..R15 except RSP from one instance to another in C (about a microsecond)."""
    lib.hhr_copy_registers(API, source.ctx.uc, destination.ctx.uc, _GPR_IDS, len(GENERAL_PURPOSE_REGISTERS))
