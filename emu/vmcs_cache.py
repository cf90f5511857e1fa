"""The machine's active VMCSs by address, shared by every LP, and the pool of guest instances they run in (docs/machine.md 7.3)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from emu.vmcs import ActiveVmcs, VmcsState

if TYPE_CHECKING:
    from emu.context import ExecutionContext


class VmcsCache:
    """Which VMCSs are active and the guest instances no VMCS holds. `new_guest_context` makes a
    guest instance when the pool is empty."""

    def __init__(self, new_guest_context: Callable[[], "ExecutionContext"]):
        self.active: dict[int, ActiveVmcs] = {}
        self._new_guest_context = new_guest_context
        self._pool: list["ExecutionContext"] = []

    def acquire_guest_context(self, vmcs: ActiveVmcs) -> "ExecutionContext":
        """A guest instance for a VMCS's first entry: from the pool, with no code or TLB left over."""
        if self._pool:
            context = self._pool.pop()
            context.uc.context_restore(context.initial_state)  # nothing of the previous guest stays
            context.flush_code()
            context.flush_translations()
        else:
            context = self._new_guest_context()
            context.initial_state = context.uc.context_save()
        context.name = f"vmcs@{vmcs.address:#x}"
        return context

    def release_guest_context(self, vmcs: ActiveVmcs) -> None:
        context = vmcs.unbind()
        if context is not None:
            context.fast.detach_shared()   # what it holds of its LP's shared state stays on the LP
            self._pool.append(context)

    def invalidate_ept(self, eptp: int | None) -> None:
        """INVEPT: drop translations derived from one EPTP (single-context) or all (SDM Vol. 3C 31.3 INVEPT)."""
        for vmcs in self.active.values():
            if vmcs.context is not None and (eptp is None or vmcs.context.fast.ctx.eptp == eptp):
                vmcs.context.flush_translations()

    def save_state(self) -> tuple[list[int], list[VmcsState]]:
        """The pool (python ids of its instances) and every active VMCS."""
        return ([context.fast.python_id for context in self._pool],
                [vmcs.save_state() for vmcs in self.active.values()])

    def restore_state(self, state: tuple[list[int], list[VmcsState]], context_by_id: dict[int, "ExecutionContext"],
                      born_after: list["ExecutionContext"]) -> None:
        """Back to a saved state; `born_after`, the guest instances made since, join the pool."""
        pool, vmcs_states = state
        self._pool = [context_by_id[python_id] for python_id in pool] + list(born_after)
        self.active = {}
        for vmcs_state in vmcs_states:
            self.active[vmcs_state.address] = ActiveVmcs.from_state(vmcs_state, context_by_id)
