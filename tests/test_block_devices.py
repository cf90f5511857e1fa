"""The assignable block devices and the IOMMU (docs/machine.md 6.11, 6.12), driven by root-mode programs:
queues in memory, DMA with and without translation, completions in ticks and their interrupt, faults
that move nothing, the IOTLB and its invalidation, a guest reaching its device, snapshots."""
from __future__ import annotations

from emu import ports
from emu.block_devices import QUEUE_ENTRY, DeviceStatus, EntryStatus
from emu.disk import DISK_BLOCK_SIZE, DiskCommand, transfer_ticks
from emu.iommu import CONTROL_TRANSLATE, ENTRY_READ, ENTRY_WRITE, ROOT_ENTRY_BYTES, ROOT_PRESENT, FaultReason
from emu.machine import Machine
from tests.machine_programs import (
    MIB, PAGE_SIZE, RESULTS, debug_exit, exit_status, lines, run_root, save, set_interrupt_gate, ROOT_IDT,
)

QUEUE = 0x400000                  # host-physical (or DMA) address of device 0's queue
BUFFER = 0x410000                 # a buffer the device writes or reads
SECOND_BUFFER = 0x420000
TABLES = 0x500000                 # the IOMMU's root table, then second-level tables
REMAPPED = 0x800000               # where the IOMMU sends DMA address BUFFER
DONE = 0x5
VECTOR = 0x40
DEVICE = 0


def port(register: int, device: int = DEVICE) -> int:
    return ports.BLOCK_DEVICE_BASE + device * ports.BLOCK_DEVICE_STRIDE + register


def out(port_number: int, value: int) -> str:
    return lines(f"mov dx, {port_number:#x}", f"mov eax, {value:#x}", "out dx, eax")


def read_into_slot(port_number: int, slot: int) -> str:
    return lines(f"mov dx, {port_number:#x}", "in eax, dx", save(slot))


def entry(command: int, block: int, buffer: int, count: int) -> bytes:
    return QUEUE_ENTRY.pack(command=command, status=0, block=block, buffer=buffer, count=count)


def program_queue(entries: int, route: int = 0) -> str:
    return lines(out(port(ports.DEVICE_QUEUE_LOW), QUEUE), out(port(ports.DEVICE_QUEUE_HIGH), 0),
                 out(port(ports.DEVICE_QUEUE_SIZE), entries), out(port(ports.DEVICE_ROUTE), route))


def wait_idle(label: str = "wait_idle") -> str:
    """Polls the status until the device is no longer busy (`label`: a name of its own for each use)."""
    return lines(f"{label}:", f"mov dx, {port(ports.DEVICE_STATUS):#x}", "in eax, dx",
                 f"cmp eax, {int(DeviceStatus.BUSY)}", f"je {label}")


def load_into_slot(address: int, slot_number: int) -> str:
    return lines(f"mov rax, [{address:#x}]", save(slot_number))


def new_machine() -> Machine:
    return Machine(ram_size=64 * MIB, lps=1, record_events=True)


def slot(machine: Machine, number: int) -> int:
    return machine.ram.read_u64(RESULTS + 8 * number)


def test_a_write_then_a_read_through_the_queue_without_translation():
    machine = new_machine()
    pattern = bytes(range(256)) * (2 * DISK_BLOCK_SIZE // 256)
    machine.ram.write(BUFFER, pattern)
    machine.ram.write(QUEUE, entry(DiskCommand.WRITE, 7, BUFFER, 2) + entry(DiskCommand.READ, 7, SECOND_BUFFER, 2))
    result = run_root(machine, lines(
        program_queue(4), out(port(ports.DEVICE_TAIL), 1), read_into_slot(port(ports.DEVICE_HEAD), 0),
        wait_idle("first"), read_into_slot(port(ports.DEVICE_HEAD), 1),
        out(port(ports.DEVICE_TAIL), 2), wait_idle("second"), read_into_slot(port(ports.DEVICE_HEAD), 2),
        read_into_slot(port(ports.DEVICE_CAPACITY), 3), debug_exit(DONE)))
    assert result.stop.exit_status == exit_status(DONE)
    assert (slot(machine, 0), slot(machine, 1), slot(machine, 2)) == (0, 1, 2)   # HEAD moves at completion
    device = machine.io.block_devices.devices[DEVICE]
    assert device.contents.read(7 * DISK_BLOCK_SIZE, len(pattern)) == pattern
    assert machine.ram.read(SECOND_BUFFER, len(pattern)) == pattern
    statuses = [machine.ram.read_u32(QUEUE + n * QUEUE_ENTRY.size + QUEUE_ENTRY.offset("status")) for n in range(2)]
    assert statuses == [EntryStatus.DONE, EntryStatus.DONE]
    first, second = [event for event in machine.events.events if event.kind == "dma"]
    assert first.data["completion"] - first.time == transfer_ticks(DiskCommand.WRITE, len(pattern))
    assert second.data["status"] == EntryStatus.DONE and slot(machine, 3) == device.blocks


FAR_TAIL = 0xFFFF_FFFF            # a TAIL 2^32 - 1 entries past HEAD: a guest's bogus doorbell


def test_a_doorbell_past_the_queue_s_size_takes_nothing_and_stops_the_device_until_it_is_reset():
    """A TAIL more than the queue's size past HEAD (or behind it) gives more than the queue holds: the
    device takes none of it, says DOORBELL_FAULT, and ignores doorbells until its size is written."""
    machine = new_machine()
    machine.ram.write(QUEUE, entry(DiskCommand.READ, 7, BUFFER, 1) * 4)
    result = run_root(machine, lines(
        program_queue(4), out(port(ports.DEVICE_TAIL), FAR_TAIL), read_into_slot(port(ports.DEVICE_STATUS), 0),
        out(port(ports.DEVICE_TAIL), 1), read_into_slot(port(ports.DEVICE_STATUS), 1),
        read_into_slot(port(ports.DEVICE_HEAD), 2),
        program_queue(4), out(port(ports.DEVICE_TAIL), 5), read_into_slot(port(ports.DEVICE_STATUS), 3),
        program_queue(4), out(port(ports.DEVICE_TAIL), 4), wait_idle(), read_into_slot(port(ports.DEVICE_HEAD), 4),
        debug_exit(DONE)))
    assert result.stop.exit_status == exit_status(DONE)
    assert [slot(machine, n) for n in range(4)] == [DeviceStatus.DOORBELL_FAULT, DeviceStatus.DOORBELL_FAULT, 0,
                                                     DeviceStatus.DOORBELL_FAULT]
    assert slot(machine, 4) == 4, "after the reset a full queue's worth is taken"
    dma = [event for event in machine.events.events if event.kind == "dma"]
    assert len(dma) == 4


def test_the_completion_interrupt_wakes_the_routed_lp_at_the_last_entry_s_tick():
    machine = new_machine()
    machine.ram.write(QUEUE, entry(DiskCommand.WRITE, 0, BUFFER, 1) + entry(DiskCommand.WRITE, 1, BUFFER, 3))
    result = run_root(machine, lines(
        set_interrupt_gate(ROOT_IDT, VECTOR, "completed"),
        program_queue(2, route=VECTOR), out(port(ports.DEVICE_TAIL), 2),
        "sti", "idle:", "hlt", "jmp idle",
        "completed:", read_into_slot(port(ports.DEVICE_HEAD), 0), debug_exit(DONE)))
    assert result.stop.exit_status == exit_status(DONE)
    assert slot(machine, 0) == 2                                # both done when the interrupt came
    last = [event for event in machine.events.events if event.kind == "dma"][-1]
    assert machine.lps[0].now >= last.data["completion"]


def test_one_completion_interrupt_per_doorbell_and_a_doorbell_that_overlaps_moves_it_to_its_own_end():
    machine = new_machine()
    machine.ram.write(QUEUE, entry(DiskCommand.WRITE, 0, BUFFER, 1) + entry(DiskCommand.WRITE, 1, BUFFER, 3)
                      + entry(DiskCommand.WRITE, 4, BUFFER, 1))
    result = run_root(machine, lines(
        set_interrupt_gate(ROOT_IDT, VECTOR, "completed"),
        program_queue(4, route=VECTOR),
        out(port(ports.DEVICE_TAIL), 1), out(port(ports.DEVICE_TAIL), 2),   # the second before the first is done
        "sti", wait_idle("overlapping"), out(port(ports.DEVICE_TAIL), 3), wait_idle("alone"),
        "mov ecx, 100000", "linger:", "dec ecx", "jnz linger",          # long past both completions
        debug_exit(DONE),
        "completed:", "push rax", "push rbx", "push rdx",              # slot 0 counts, slot n: HEAD at the nth
        f"mov rbx, {RESULTS:#x}", "inc qword ptr [rbx]", f"mov dx, {port(ports.DEVICE_HEAD):#x}", "in eax, dx",
        "mov rdx, [rbx]", "mov [rbx + rdx * 8], rax", "pop rdx", "pop rbx", "pop rax", "iretq"))
    assert result.stop.exit_status == exit_status(DONE)
    assert slot(machine, 0) == 2                                # two interrupts for three doorbells
    assert (slot(machine, 1), slot(machine, 2)) == (2, 3)      # HEAD at each: the end of its doorbells
    taken = [event for event in machine.events.events if event.kind == "interrupt"]
    completions = [event.data["completion"] for event in machine.events.events if event.kind == "dma"]
    assert [event.time >= completion for event, completion in zip(taken, completions[1:])] == [True, True]


def map_dma_page(machine: Machine, dma_page: int, host_page: int, permissions: int, device: int = DEVICE) -> None:
    """The IOMMU's tables for `device`, built in RAM as a hypervisor would: a root entry and a 4-level
    second-level walk (EPT format) to one 4 KiB page."""
    pml4, pdpt, directory, table = (TABLES + PAGE_SIZE * (1 + level + 4 * device) for level in range(4))
    machine.ram.write_u64(TABLES + device * ROOT_ENTRY_BYTES, pml4 | ROOT_PRESENT)
    for upper, lower, shift in ((pml4, pdpt, 39), (pdpt, directory, 30), (directory, table, 21)):
        machine.ram.write_u64(upper + ((dma_page >> shift) & 0x1FF) * 8, lower | ENTRY_READ | ENTRY_WRITE)
    machine.ram.write_u64(table + ((dma_page >> 12) & 0x1FF) * 8, host_page | permissions)


def iommu_on() -> str:
    return lines(out(ports.IOMMU_ROOT_LOW_PORT, TABLES), out(ports.IOMMU_ROOT_HIGH_PORT, 0),
                 out(ports.IOMMU_CONTROL_PORT, CONTROL_TRANSLATE))


def test_translated_dma_lands_where_the_tables_say_and_an_unmapped_buffer_moves_nothing():
    machine = new_machine()
    map_dma_page(machine, QUEUE, QUEUE, ENTRY_READ | ENTRY_WRITE)
    map_dma_page(machine, BUFFER, REMAPPED, ENTRY_READ | ENTRY_WRITE)
    machine.io.block_devices.devices[DEVICE].contents.write(0, b"\xab" * DISK_BLOCK_SIZE)
    machine.ram.write(QUEUE, entry(DiskCommand.READ, 0, BUFFER, 1) + entry(DiskCommand.READ, 0, SECOND_BUFFER, 1))
    result = run_root(machine, lines(
        iommu_on(), program_queue(2), out(port(ports.DEVICE_TAIL), 2), wait_idle(),
        read_into_slot(ports.IOMMU_FAULT_COUNT_PORT, 0), read_into_slot(ports.IOMMU_FAULT_DEVICE_PORT, 1),
        read_into_slot(ports.IOMMU_FAULT_ADDRESS_LOW_PORT, 2), read_into_slot(ports.IOMMU_FAULT_REASON_PORT, 3),
        out(ports.IOMMU_FAULT_COUNT_PORT, 0), read_into_slot(ports.IOMMU_FAULT_COUNT_PORT, 4), debug_exit(DONE)))
    assert result.stop.exit_status == exit_status(DONE)
    assert machine.ram.read(REMAPPED, DISK_BLOCK_SIZE) == b"\xab" * DISK_BLOCK_SIZE
    assert machine.ram.read(BUFFER, DISK_BLOCK_SIZE) == bytes(DISK_BLOCK_SIZE)       # the DMA address itself untouched
    assert machine.ram.read(SECOND_BUFFER, DISK_BLOCK_SIZE) == bytes(DISK_BLOCK_SIZE)  # unmapped: nothing written
    status = machine.ram.read_u32(QUEUE + QUEUE_ENTRY.size + QUEUE_ENTRY.offset("status"))
    assert status == EntryStatus.FAULT
    assert [slot(machine, n) for n in range(5)] == [1, DEVICE, SECOND_BUFFER, FaultReason.NOT_MAPPED | 1 << 8, 0]
    faults = [event for event in machine.events.events if event.kind == "iommu-fault"]
    assert [(event.data["address"], event.data["write"]) for event in faults] == [(SECOND_BUFFER, True)]


def test_a_read_only_mapping_refuses_the_device_s_write_into_memory():
    machine = new_machine()
    map_dma_page(machine, QUEUE, QUEUE, ENTRY_READ | ENTRY_WRITE)
    map_dma_page(machine, BUFFER, REMAPPED, ENTRY_READ)
    machine.ram.write(QUEUE, entry(DiskCommand.READ, 0, BUFFER, 1) + entry(DiskCommand.WRITE, 0, BUFFER, 1))
    machine.ram.write(REMAPPED, b"\x5a" * DISK_BLOCK_SIZE)
    run_root(machine, lines(iommu_on(), program_queue(2), out(port(ports.DEVICE_TAIL), 2), wait_idle(),
                            debug_exit(DONE)))
    statuses = [machine.ram.read_u32(QUEUE + n * QUEUE_ENTRY.size + QUEUE_ENTRY.offset("status")) for n in range(2)]
    assert statuses == [EntryStatus.FAULT, EntryStatus.DONE]   # memory-to-device only reads: allowed
    assert machine.io.iommu.faults[0].reason == FaultReason.WRITE_DENIED
    assert machine.io.block_devices.devices[DEVICE].contents.read(0, DISK_BLOCK_SIZE) == b"\x5a" * DISK_BLOCK_SIZE


def test_a_changed_mapping_is_used_only_after_the_invalidation():
    machine = new_machine()
    map_dma_page(machine, QUEUE, QUEUE, ENTRY_READ | ENTRY_WRITE)
    map_dma_page(machine, BUFFER, REMAPPED, ENTRY_READ | ENTRY_WRITE)
    other = REMAPPED + PAGE_SIZE
    machine.io.block_devices.devices[DEVICE].contents.write(0, b"\x11" * DISK_BLOCK_SIZE)
    machine.ram.write(QUEUE, entry(DiskCommand.READ, 0, BUFFER, 1) * 3)
    table = TABLES + PAGE_SIZE * 4
    remap = lines(f"mov rax, {table + ((BUFFER >> 12) & 0x1FF) * 8:#x}",
                  f"mov rbx, {other | ENTRY_READ | ENTRY_WRITE:#x}", "mov [rax], rbx")
    clear = lines(f"mov rdi, {REMAPPED:#x}", f"mov ecx, {2 * DISK_BLOCK_SIZE}", "xor eax, eax", "rep stosb")
    run_root(machine, lines(
        iommu_on(), program_queue(4), out(port(ports.DEVICE_TAIL), 1), wait_idle("first"),
        clear, remap, out(port(ports.DEVICE_TAIL), 2), wait_idle("second"),
        load_into_slot(REMAPPED, 0), load_into_slot(other, 1),
        out(ports.IOMMU_INVALIDATE_PORT, DEVICE), out(port(ports.DEVICE_TAIL), 3), wait_idle("third"),
        load_into_slot(other, 2), debug_exit(DONE)))
    stale, fresh_before, fresh_after = slot(machine, 0), slot(machine, 1), slot(machine, 2)
    assert stale == 0x1111111111111111 and fresh_before == 0       # the IOTLB still held the old page
    assert fresh_after == 0x1111111111111111                        # after INVALIDATE the new one is used


def test_a_guest_programs_its_device_but_not_the_interrupt_route_and_a_snapshot_holds_the_device():
    from hypervisors import bare_monitor
    from emu.vmx_defs import PrimaryProcessorControls

    guest_queue, guest_buffer = 0x40000, 0x50000          # guest-physical, IOMMU maps them to the guest's RAM
    guest = lines(out(port(ports.DEVICE_QUEUE_LOW), guest_queue), out(port(ports.DEVICE_QUEUE_HIGH), 0),
                  out(port(ports.DEVICE_QUEUE_SIZE), 1), out(port(ports.DEVICE_ROUTE), VECTOR),
                  out(port(ports.DEVICE_TAIL), 1), "spin:", f"mov dx, {port(ports.DEVICE_STATUS):#x}", "in eax, dx",
                  f"cmp eax, {int(DeviceStatus.BUSY)}", "je spin", "xor eax, eax", "hlt")

    def prepare(machine):
        host = bare_monitor.GUEST_HOST_BASE
        for page in (guest_queue, guest_buffer):
            map_dma_page(machine, page, host + page, ENTRY_READ | ENTRY_WRITE)
        machine.io.iommu.root, machine.io.iommu.control = TABLES, CONTROL_TRANSLATE
        machine.ram.write(host + guest_queue, entry(DiskCommand.WRITE, 3, guest_buffer, 1))
        machine.ram.write(host + guest_buffer, b"guest data".ljust(DISK_BLOCK_SIZE, b"."))
        machine.io.block_devices.devices[DEVICE].route = 0       # root's choice: the guest may not change it

    # "Use I/O bitmaps" with bitmaps of zeros (at host-physical 0): no port exits, the guest reaches the bus.
    run = bare_monitor.run_guest(guest, primary=PrimaryProcessorControls.USE_IO_BITMAPS, prepare=prepare,
                                 record_events=True)
    device = run.machine.io.block_devices.devices[DEVICE]
    assert device.contents.read(3 * DISK_BLOCK_SIZE, 10) == b"guest data"
    assert device.route == 0 and device.head == 1
    snapshot = run.machine.snapshot()
    device.contents.write(0, b"changed")
    device.head = 0
    run.machine.restore(snapshot)
    assert device.head == 1 and device.contents.read(0, 7) == bytes(7)


def test_the_dma_write_observers_are_told_where_each_write_into_memory_landed():
    """A read's data at the host address the IOMMU gave, each entry's status write-back; a write to
    the device and a refused buffer put nothing into memory but the status."""
    machine = new_machine()
    map_dma_page(machine, QUEUE, QUEUE, ENTRY_READ | ENTRY_WRITE)
    map_dma_page(machine, BUFFER, REMAPPED, ENTRY_READ | ENTRY_WRITE)
    machine.ram.write(QUEUE, entry(DiskCommand.READ, 0, BUFFER, 1) + entry(DiskCommand.WRITE, 0, BUFFER, 1)
                      + entry(DiskCommand.READ, 0, SECOND_BUFFER, 1))
    told = []
    machine.io.block_devices.observe_dma_writes(lambda *write: told.append(write))
    result = run_root(machine, lines(iommu_on(), program_queue(4), out(port(ports.DEVICE_TAIL), 3), wait_idle(),
                                     debug_exit(DONE)))
    assert result.stop.exit_status == exit_status(DONE)
    status = [QUEUE + n * QUEUE_ENTRY.size + QUEUE_ENTRY.offset("status") for n in range(3)]
    status_bytes = QUEUE_ENTRY.field_size("status")
    assert told == [(DEVICE, REMAPPED, DISK_BLOCK_SIZE), (DEVICE, status[0], status_bytes),
                    (DEVICE, status[1], status_bytes), (DEVICE, status[2], status_bytes)]
