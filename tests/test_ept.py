"""EPT: translation through 4 KiB, 2 MiB and 1 GiB entries, violations, misconfigurations, INVEPT, a scattered map.

Guests run real code; what they read comes back through VMCALL (guest RAX in the exit log) or guest
memory; exit information is what the root's exit handler read with VMREAD. See: SDM Vol. 3C 29.3.
"""
from __future__ import annotations

import random
import time

import pytest

from emu.machine import Machine
from emu.vmx_defs import (
    EPT_EXECUTE, EPT_QUAL_DATA_READ, EPT_QUAL_DATA_WRITE, EPT_QUAL_EXECUTABLE,
    EPT_QUAL_GUEST_LINEAR_ADDRESS_VALID, EPT_QUAL_INSTRUCTION_FETCH, EPT_QUAL_READABLE,
    EPT_QUAL_TRANSLATED_ACCESS, EPT_QUAL_WRITEABLE, EPT_READ, EPT_RWX_MASK, EPT_WRITE, ExitReason,
)
from tests.machine_programs import (
    EPT_WB, EXIT_STOPPED_ON_EXIT, GUEST_DATA, GUEST_PDPT, MIB, PAGE_1G, PAGE_2M, PAGE_SIZE, PTE_PRESENT_WRITABLE,
    QWORD, SCRATCH, U64, Ept, build_guest, exit_log, exit_logger, exit_status, lines, run_guest, run_root, vmx_program,
)

SMALL_PAGE_GPA = 0x60_0000
SMALL_PAGE_HPA = 0x234_5000
LARGE_PAGE_GPA = 0x80_0000
LARGE_PAGE_HPA = 0x280_0000
HUGE_PAGE_GPA = 0x4000_0000
HUGE_PAGE_HPA = 0
HUGE_PAGE_PROBE_OFFSET = 0xB_0040      # lands in free host RAM at 0xB0040
RESERVED_MEMORY_TYPE = 2 << 3          # EPT memory type 2 is reserved (SDM 29.3.7)
SECOND_PAGE_HPA = 0x234_6000
QUALIFICATION_ACCESS_BITS = EPT_QUAL_DATA_READ | EPT_QUAL_DATA_WRITE | EPT_QUAL_INSTRUCTION_FETCH
LINEAR_AND_TRANSLATED = EPT_QUAL_GUEST_LINEAR_ADDRESS_VALID | EPT_QUAL_TRANSLATED_ACCESS


def test_translation_through_each_page_size(machine):
    probes = [(SMALL_PAGE_GPA + 0x18, SMALL_PAGE_HPA + 0x18, 0x1111_2222_3333_4444),
              (LARGE_PAGE_GPA + 0x1F_0008, LARGE_PAGE_HPA + 0x1F_0008, 0x5555_6666_7777_8888),
              (HUGE_PAGE_GPA + HUGE_PAGE_PROBE_OFFSET, HUGE_PAGE_HPA + HUGE_PAGE_PROBE_OFFSET, 0x9999_AAAA_BBBB_CCCC)]
    for _gpa, hpa, value in probes:
        machine.ram.write_u64(hpa, value)
    # The guest copies each probe to GUEST_DATA and writes a marker into the word after it.
    code = lines(*(lines(f"mov rbx, {gpa:#x}", "mov rax, [rbx]", f"mov rcx, {GUEST_DATA + 8 * i:#x}", "mov [rcx], rax",
                         f"mov qword ptr [rbx + 8], {0x70 + i}")
                   for i, (gpa, _hpa, _value) in enumerate(probes)), "vmcall")
    ept = Ept(machine)
    ept.map(SMALL_PAGE_GPA, SMALL_PAGE_HPA, PAGE_SIZE)
    ept.map(LARGE_PAGE_GPA, LARGE_PAGE_HPA, PAGE_2M)
    ept.map(HUGE_PAGE_GPA, HUGE_PAGE_HPA, PAGE_1G)
    run, guest = run_guest(machine, code, ept=ept, stop_reasons=(ExitReason.VMCALL,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    assert [r.reason for r in exit_log(machine)] == [ExitReason.VMCALL]
    assert [guest.read_u64(GUEST_DATA + 8 * i) for i in range(len(probes))] == [value for *_, value in probes]
    assert [machine.ram.read_u64(hpa + 8) for _gpa, hpa, _value in probes] == [0x70, 0x71, 0x72]


# (case, EPT permissions of the leaf, of the PDE above it, the guest's access, expected access bit)
VIOLATIONS = [
    ("read-not-present", 0, EPT_RWX_MASK, "mov rax, [rbx]", EPT_QUAL_DATA_READ),
    ("write-read-only", EPT_READ, EPT_RWX_MASK, "mov [rbx], rax", EPT_QUAL_DATA_WRITE),
    ("execute-no-x", EPT_READ | EPT_WRITE, EPT_RWX_MASK, "jmp rbx", EPT_QUAL_INSTRUCTION_FETCH),
    ("write-parent-read-only", EPT_RWX_MASK, EPT_READ, "mov [rbx], rax", EPT_QUAL_DATA_WRITE),
]


@pytest.mark.parametrize("case, leaf, parent, access, access_bit", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_ept_violation_reports_address_and_qualification(machine, case, leaf, parent, access, access_bit):
    offset = 0 if access.startswith("jmp") else 0x238
    target = SMALL_PAGE_GPA + offset
    ept = Ept(machine)
    ept.map(SMALL_PAGE_GPA, SMALL_PAGE_HPA, PAGE_SIZE, permissions=leaf)
    parent_entry = ept.entry_address(SMALL_PAGE_GPA, 2)
    machine.ram.write_u64(parent_entry, machine.ram.read_u64(parent_entry) & ~EPT_RWX_MASK | parent)
    run, _ = run_guest(machine, lines(f"mov rbx, {target:#x}", access, "hlt"), ept=ept,
                       stop_reasons=(ExitReason.EPT_VIOLATION, ExitReason.HLT))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.EPT_VIOLATION
    assert record.guest_physical == target
    assert record.guest_linear == target
    allowed = leaf & parent
    expected = (access_bit | LINEAR_AND_TRANSLATED
                | (EPT_QUAL_READABLE if allowed & EPT_READ else 0)
                | (EPT_QUAL_WRITEABLE if allowed & EPT_WRITE else 0)
                | (EPT_QUAL_EXECUTABLE if allowed & EPT_EXECUTE else 0))
    assert record.qualification == expected
    if access_bit == EPT_QUAL_INSTRUCTION_FETCH:
        assert record.guest_rip == target


def test_ept_violation_on_a_guest_page_table_read(machine):
    """A guest paging-structure read that EPT forbids: linear-address valid, not the final translation."""
    second_gib = PAGE_1G
    guest = build_guest(machine, lines(f"mov rbx, {second_gib:#x}", "mov rax, [rbx]", "hlt"))
    # Point the guest's PDPT entry for its second GiB at a page directory in a GPA the EPT does not map.
    unmapped_table = 0x7000_0000
    guest.write_u64(GUEST_PDPT + QWORD, unmapped_table | PTE_PRESENT_WRITABLE)
    run = run_root(machine, vmx_program(guest, exit_logger((ExitReason.EPT_VIOLATION, ExitReason.HLT))))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.EPT_VIOLATION
    assert record.guest_physical == unmapped_table
    assert record.qualification == EPT_QUAL_DATA_READ | EPT_QUAL_GUEST_LINEAR_ADDRESS_VALID
    assert record.guest_linear == second_gib


MISCONFIGURATIONS = [("write-without-read", EPT_WRITE, EPT_WB),
                     ("reserved-memory-type", EPT_RWX_MASK, RESERVED_MEMORY_TYPE)]


@pytest.mark.parametrize("case, permissions, memory_type", MISCONFIGURATIONS, ids=[m[0] for m in MISCONFIGURATIONS])
def test_ept_misconfiguration(machine, case, permissions, memory_type):
    target = SMALL_PAGE_GPA + 0x40
    ept = Ept(machine)
    ept.map(SMALL_PAGE_GPA, SMALL_PAGE_HPA, PAGE_SIZE, permissions=permissions, memory_type_bits=memory_type)
    run, _ = run_guest(machine, lines(f"mov rbx, {target:#x}", "mov rax, [rbx]", "hlt"), ept=ept,
                       stop_reasons=(ExitReason.EPT_MISCONFIG, ExitReason.HLT))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.EPT_MISCONFIG
    assert record.guest_physical == target
    assert record.qualification == 0


@pytest.mark.parametrize("invalidation, sees_new_mapping", [("single-context", True), ("all-context", True),
                                                              ("other-eptp", False)])
def test_invept_makes_a_changed_entry_take_effect(machine, invalidation, sees_new_mapping):
    old_value, new_value = 0xAAAA, 0xBBBB
    machine.ram.write_u64(SMALL_PAGE_HPA, old_value)
    machine.ram.write_u64(SECOND_PAGE_HPA, new_value)
    ept = Ept(machine)
    leaf = ept.map(SMALL_PAGE_GPA, SMALL_PAGE_HPA, PAGE_SIZE)
    read_and_report = lines(f"mov rbx, {SMALL_PAGE_GPA:#x}", "mov rax, [rbx]", "vmcall")
    code = lines(read_and_report, read_and_report, read_and_report, "hlt")
    invept_type, descriptor_eptp = {"single-context": (1, ept.eptp), "all-context": (2, 0),
                                    "other-eptp": (1, ept.eptp ^ PAGE_SIZE)}[invalidation]
    on_exit = lines(
        "cmp rcx, 1", "jne second_exit",
        # After the first read: retarget the leaf at the second page, without INVEPT.
        f"mov rax, {leaf:#x}", f"mov rbx, {SECOND_PAGE_HPA | EPT_RWX_MASK | EPT_WB:#x}", "mov [rax], rbx",
        "jmp vm_exit_resume",
        "second_exit:", "cmp rcx, 2", "jne vm_exit_continue",
        f"mov rbx, {SCRATCH:#x}", f"mov rax, {descriptor_eptp:#x}", "mov [rbx], rax", "mov qword ptr [rbx + 8], 0",
        f"mov rax, {invept_type}", "invept rax, [rbx]",
        "jmp vm_exit_resume")
    run, _ = run_guest(machine, code, ept=ept, on_exit=on_exit, stop_reasons=(ExitReason.HLT,))
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    reads = [r.guest_rax for r in exit_log(machine) if r.reason == ExitReason.VMCALL]
    assert reads == [old_value, old_value, new_value if sees_new_mapping else old_value]


SCATTERED_PAGES = 10_000
SCATTERED_GPA = 16 * MIB
SCATTERED_HPA_POOL = 64 * MIB
SCATTERED_RAM = 128 * MIB
HASH_MULTIPLIER = 31


@pytest.mark.parametrize("order", ["reversed", "permuted"])
def test_scattered_map_of_ten_thousand_pages(order, report_timing):
    machine = Machine(ram_size=SCATTERED_RAM, record_events=False)
    rng = random.Random(0x5EED)
    host_pages = list(range(SCATTERED_PAGES))
    if order == "reversed":
        host_pages.reverse()
    else:
        rng.shuffle(host_pages)
    values = [rng.getrandbits(64) for _ in range(SCATTERED_PAGES)]
    ept = Ept(machine)
    for page, host_page in enumerate(host_pages):
        host_address = SCATTERED_HPA_POOL + host_page * PAGE_SIZE
        ept.map(SCATTERED_GPA + page * PAGE_SIZE, host_address, PAGE_SIZE)
        machine.ram.write_u64(host_address, values[page])
    expected = 0
    for value in values:
        expected = (expected * HASH_MULTIPLIER + value) & U64
    code = lines(f"mov rsi, {SCATTERED_GPA:#x}", f"mov rcx, {SCATTERED_PAGES}", "xor eax, eax",
                 "walk:", f"imul rax, rax, {HASH_MULTIPLIER}", "add rax, [rsi]", f"add rsi, {PAGE_SIZE:#x}",
                 "dec rcx", "jnz walk", "vmcall")
    started = time.perf_counter()
    run, _ = run_guest(machine, code, ept=ept, stop_reasons=(ExitReason.VMCALL,))
    elapsed = time.perf_counter() - started
    assert run.stop.exit_status == exit_status(EXIT_STOPPED_ON_EXIT), run.stop.report
    (record,) = exit_log(machine)
    assert record.reason == ExitReason.VMCALL
    assert record.guest_rax == expected
    report_timing(f"{SCATTERED_PAGES} scattered 4 KiB EPT pages ({order}) walked in {elapsed * 1000:.1f} ms, "
                  f"{run.instructions} instructions")
