"""Reads a hypervisor's page-ownership database and map-window EPT out of RAM, and checks that they agree (tests, tools)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from emu.vmx_defs import EPT_ADDRESS_MASK, EPT_LEVEL_BITS, EPT_PML4_SHIFT, EPT_RWX_MASK, PAGE_SIZE
from hypervisors import build, guest_abi, layouts, transfer
from hypervisors.memory_map import (
    ENTRIES_PER_TABLE, LARGE_PAGE_SIZE, PAGE_SHIFT, PAGES_PER_FRAME, TABLE_ENTRY_BYTES as ENTRY_BYTES,
)


def owner_name(owner: int) -> str:
    """`free`, `hypervisor`, `firmware`, `service`, `split` ... or `partition N` for an OWNER_* value."""
    names = {layouts.OWNER_FREE: "free", layouts.OWNER_HYPERVISOR: "hypervisor", layouts.OWNER_SPLIT: "split",
             layouts.OWNER_FIRMWARE: "firmware", layouts.OWNER_SERVICE: "service",
             layouts.OWNER_PREVIOUS: "previous hypervisor", layouts.OWNER_PENDING: "pending"}
    return names.get(owner, f"partition {owner - layouts.OWNER_PARTITION_BASE}")


@dataclass
class MemoryState:
    """Who owns each host page, and what each partition's map window maps."""

    frame_owners: list[int]                                     # per 2 MiB frame (OWNER_SPLIT if split)
    page_owners: dict[int, tuple[int, int]]                     # host page of a split frame: (owner, guest frame)
    split_free_counts: dict[int, tuple[int, int]]               # split frame: (free_pages, first_free) as recorded
    records_inside: set[int]                                    # split frames whose records fill their own first page
    windows: dict[int, dict[int, int]] = field(default_factory=dict)        # partition: {gpa: host page}
    window_tables: dict[int, list[int]] = field(default_factory=dict)       # partition: host pages of its tables
    mapped_counts: dict[int, int] = field(default_factory=dict)             # partition: mapped_pages field
    window_sums: dict[int, int] = field(default_factory=dict)               # partition: window_sum field

    def owned_pages(self) -> Counter:
        """4 KiB pages by owner name over all of RAM (a whole frame counts 512)."""
        counts: Counter = Counter()
        for owner in self.frame_owners:
            if owner != layouts.OWNER_SPLIT:
                counts[owner_name(owner)] += PAGES_PER_FRAME
        for owner, _ in self.page_owners.values():
            counts[owner_name(owner)] += 1
        return counts


def _qword(ram, address: int) -> int:
    return int.from_bytes(ram.read(address, ENTRY_BYTES), "little")


def _present(entry: int) -> bool:
    return bool(entry & EPT_RWX_MASK)


def _window(ram, eptp: int) -> tuple[dict[int, int], list[int]]:
    """The map window's leaves {gpa: host page} and the tables under its PDPT entry."""
    leaves: dict[int, int] = {}
    tables: list[int] = []
    table = eptp & EPT_ADDRESS_MASK
    shift = EPT_PML4_SHIFT
    base = guest_abi.MAP_WINDOW_BASE
    for _ in range(2):   # PML4, then PDPT: down to the window's page directory
        entry = _qword(ram, table + ((base >> shift) & (ENTRIES_PER_TABLE - 1)) * ENTRY_BYTES)
        if not _present(entry):
            return leaves, tables
        table = entry & EPT_ADDRESS_MASK
        shift -= EPT_LEVEL_BITS
    directory = table
    tables.append(directory)
    directory_entries = ram.read(directory, PAGE_SIZE)
    for pd_index in range(ENTRIES_PER_TABLE):
        pd_entry = int.from_bytes(directory_entries[pd_index * ENTRY_BYTES:(pd_index + 1) * ENTRY_BYTES], "little")
        if not _present(pd_entry):
            continue
        page_table = pd_entry & EPT_ADDRESS_MASK
        tables.append(page_table)
        entries = ram.read(page_table, PAGE_SIZE)
        for pt_index in range(ENTRIES_PER_TABLE):
            leaf = int.from_bytes(entries[pt_index * ENTRY_BYTES:(pt_index + 1) * ENTRY_BYTES], "little")
            if _present(leaf):
                gpa = base + ((pd_index * ENTRIES_PER_TABLE + pt_index) << PAGE_SHIFT)
                leaves[gpa] = leaf & EPT_ADDRESS_MASK
    return leaves, tables


def page_owner(booted, host_page: int) -> int:
    """The OWNER_* value the hypervisor's page-ownership database gives one host page: its frame's,
    or, in a split frame, the page's own record's (OWNER_FREE above the frames it keeps)."""
    records = booted.records
    frame_layout, page_layout = records.frame, records.page
    ram = booted.machine.ram
    number = host_page // LARGE_PAGE_SIZE
    if number >= booted.frame_count:
        return layouts.OWNER_FREE
    frame = frame_layout.unpack(ram.read(booted.frame_table + number * frame_layout.size, frame_layout.size))
    if frame["owner"] != layouts.OWNER_SPLIT:
        return frame["owner"]
    index = host_page % LARGE_PAGE_SIZE // PAGE_SIZE
    return page_layout.unpack(ram.read(frame["pages"] + index * page_layout.size, page_layout.size))["owner"]


def window_pages(booted, partition: int) -> set[int]:
    """The host pages one partition's map window maps, by the partition's EPT."""
    leaves, _ = _window(booted.machine.ram, booted.partitions()[partition]["eptp"])
    return set(leaves.values())


def lock_held(booted) -> bool:
    """The hypervisor's memory_lock: while an LP holds it, the database and the windows may disagree for a moment."""
    return bool(booted.memory_lock)


def read(booted) -> MemoryState:
    """The hypervisor's memory state in a booted machine (hypervisors.boot.Booted), read from RAM."""
    records = build.hypervisor(booted.hypervisor).records
    frame_layout, page_layout = records.frame, records.page
    ram = booted.machine.ram
    frame_table = booted.frame_table
    frame_count = booted.frame_count
    frame_bytes = ram.read(frame_table, frame_count * frame_layout.size)
    frame_owners, page_owners, free_counts, records_inside = [], {}, {}, set()
    for number in range(frame_count):
        frame = frame_layout.unpack(frame_bytes[number * frame_layout.size:(number + 1) * frame_layout.size])
        frame_owners.append(frame["owner"])
        if frame["owner"] != layouts.OWNER_SPLIT:
            continue
        free_counts[number] = (frame["free_pages"], frame["first_free"])
        if frame["pages"] == number * LARGE_PAGE_SIZE:
            records_inside.add(number)
        data = ram.read(frame["pages"], PAGES_PER_FRAME * page_layout.size)
        for index in range(PAGES_PER_FRAME):
            record = page_layout.unpack(data[index * page_layout.size:(index + 1) * page_layout.size])
            page_owners[number * LARGE_PAGE_SIZE + index * PAGE_SIZE] = (record["owner"], record["guest_frame"])
    state = MemoryState(frame_owners, page_owners, free_counts, records_inside)
    for number, partition in enumerate(booted.partitions()):
        state.windows[number], state.window_tables[number] = _window(ram, partition["eptp"])
        state.mapped_counts[number] = partition["mapped_pages"]
        state.window_sums[number] = partition["window_sum"]
    return state


def problems(state: MemoryState) -> list[str]:
    """Every disagreement between the database, the map windows and the partition records ([] if none)."""
    found = []
    referenced: Counter = Counter()
    for partition, window in state.windows.items():
        owner = partition + layouts.OWNER_PARTITION_BASE
        if len(window) != state.mapped_counts[partition]:
            found.append(f"partition {partition}: {len(window)} pages in its window, "
                         f"record says {state.mapped_counts[partition]}")
        window_sum = transfer.window_sum(window)
        if partition in state.window_sums and window_sum != state.window_sums[partition]:
            found.append(f"partition {partition}: its window sums to {window_sum:#x}, record says "
                         f"{state.window_sums[partition]:#x}")
        for gpa, page in window.items():
            referenced[page] += 1
            record = state.page_owners.get(page)
            if record is None:
                found.append(f"partition {partition}: {gpa:#x} maps {page:#x}, which is not a pool page")
            elif record != (owner, gpa >> PAGE_SHIFT):
                found.append(f"partition {partition}: {gpa:#x} maps {page:#x}, recorded as "
                             f"{owner_name(record[0])} at guest frame {record[1]:#x}")
        for table in state.window_tables[partition]:
            referenced[table] += 1
            in_pool = state.page_owners.get(table, (None,))[0] == layouts.OWNER_HYPERVISOR
            in_heap = state.frame_owners[table // LARGE_PAGE_SIZE] == layouts.OWNER_HYPERVISOR  # built by a restart
            if not (in_pool or in_heap):
                found.append(f"partition {partition}: EPT table {table:#x} is neither a hypervisor page of the "
                             "pool nor in the hypervisor's own memory")
    found += [f"host page {page:#x} is referenced {count} times" for page, count in referenced.items() if count > 1]
    for page, (owner, _) in state.page_owners.items():
        is_records_page = page % LARGE_PAGE_SIZE == 0 and page // LARGE_PAGE_SIZE in state.records_inside
        if owner not in (layouts.OWNER_FREE,) and not is_records_page and page not in referenced:
            found.append(f"host page {page:#x} is owned by {owner_name(owner)} but nothing maps it")
        if is_records_page and owner != layouts.OWNER_HYPERVISOR:
            found.append(f"records page {page:#x} is owned by {owner_name(owner)}")
    for frame, (free_pages, first_free) in state.split_free_counts.items():
        owners = [state.page_owners[frame * LARGE_PAGE_SIZE + index * PAGE_SIZE][0] for index in range(PAGES_PER_FRAME)]
        if owners.count(layouts.OWNER_FREE) != free_pages:
            found.append(f"frame {frame}: {owners.count(layouts.OWNER_FREE)} free pages, record says {free_pages}")
        if layouts.OWNER_FREE in owners[:first_free]:
            found.append(f"frame {frame}: a page below first_free {first_free} is free")
    return found
