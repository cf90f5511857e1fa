"""When a dropped machine's memory goes back: collecting the reference cycles every machine is made of.

A machine cannot be freed by reference counting alone: each Unicorn instance holds the hooks of
the context that owns it, the LPs and devices hold their machine, and so on. Python's cyclic
collector frees such a machine, RAM buffer, Unicorn instances and C state together, but it runs
when enough small objects have been allocated, which says nothing about the megabytes a machine
holds; a process that builds machine after machine (the tests, a grader, a notebook, the bench)
would keep several dead ones resident. So building a machine collects first whenever the machines
alive have grown by MACHINES_BETWEEN_COLLECTIONS since the last collection: a process that keeps
its machines pays nothing more, one that drops them never holds more than that many dead ones.
"""
from __future__ import annotations

import gc
import weakref

MACHINES_BETWEEN_COLLECTIONS = 2

_alive: weakref.WeakSet = weakref.WeakSet()
_alive_after_last_collection = [0]


def note_new_machine(machine) -> None:
    """Called as a machine is built: collect the dropped ones first if they may have piled up."""
    _alive_after_last_collection[0] = min(_alive_after_last_collection[0], len(_alive))
    if len(_alive) >= _alive_after_last_collection[0] + MACHINES_BETWEEN_COLLECTIONS:
        gc.collect()
        _alive_after_last_collection[0] = len(_alive)
    _alive.add(machine)
