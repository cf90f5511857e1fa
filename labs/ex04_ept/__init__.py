"""Exercise 4: EPT: a 4-level EPT built in the table pool, its EPT pointer, and an EPT violation handled by mapping the page on demand."""
from __future__ import annotations

from emu.memory import MIB, PAGE_SIZE
from emu.vmx_defs import (
    EPT_ADDRESS_MASK, EPT_LEVEL_BITS, EPT_MEMORY_TYPE_SHIFT, EPT_PML4_SHIFT, EPT_RWX_MASK, EPTP_WALK_LENGTH_SHIFT,
    ExitReason, MemoryType,
)
from tools.lab import checks, material, monitor_run
from tools.lab.book import Exercise, Expected, Hole, Mistake, Test

NUMBER = 4
EAGER_SIZE = 2 * MIB                      # guest-physical [0, EAGER_SIZE) is mapped before the guest runs
LAZY_POINTER = 0x9000                     # guest-physical: the address of the page the guest reads
GUEST_RESULT = 0x9008                     # guest-physical: the guest's checksum of that page
QWORDS_PER_PAGE = PAGE_SIZE // 8
CHECKSUM_ROTATION = 7
WORD_MASK = (1 << 64) - 1
# SDM 29.3.2: bits 47:39, 38:30, 29:21 and 20:12 of a guest-physical address index the four levels.
WALK_LENGTH = 4
LEVEL_SHIFTS = tuple(EPT_PML4_SHIFT - level * EPT_LEVEL_BITS for level in range(WALK_LENGTH))
INDEX_MASK = (1 << EPT_LEVEL_BITS) - 1
ADDRESS_MASK = EPT_ADDRESS_MASK
EPTP_WANTED_FLAGS = int(MemoryType.WB) | ((WALK_LENGTH - 1) << EPTP_WALK_LENGTH_SHIFT)
LEAF_MEMORY_TYPE = int(MemoryType.WB) << EPT_MEMORY_TYPE_SHIFT
LEAF_FLAGS_MASK = EPT_RWX_MASK | (0x7 << EPT_MEMORY_TYPE_SHIFT)
GUEST = """
    mov rbx, LAB_GUEST_LAZY_POINTER
    mov rsi, [rbx]                    ; the page to read: above what the EPT maps at first
    xor eax, eax
    mov ecx, LAB_QWORDS_PER_PAGE
guest_sum:
    rol rax, LAB_CHECKSUM_ROTATION
    xor rax, [rsi]
    add rsi, 8
    dec ecx
    jnz guest_sum
    mov rbx, LAB_GUEST_RESULT
    mov [rbx], rax
    hlt
"""


def checksum(words: list[int]) -> int:
    value = 0
    for word in words:
        value = (((value << CHECKSUM_ROTATION) | (value >> (64 - CHECKSUM_ROTATION))) & WORD_MASK) ^ word
    return value


def _prepare(machine, rng, values):
    """A page of seeded words somewhere above EAGER_SIZE in the guest's RAM, and its address where
    the guest looks for it."""
    pages = (values["guest_ram_size"] - EAGER_SIZE) // PAGE_SIZE
    lazy = EAGER_SIZE + rng.randrange(pages) * PAGE_SIZE
    words = [rng.getrandbits(64) for _ in range(QWORDS_PER_PAGE)]
    base = values["guest_ram"]
    for index, word in enumerate(words):
        machine.ram.write_u64(base + lazy + 8 * index, word)
    machine.ram.write_u64(base + LAZY_POINTER, lazy)
    return {"lazy_page": lazy, "checksum": checksum(words)}


SETUP = monitor_run.MonitorSetup(guest=GUEST, harness_ept=False, prepare=_prepare, constants={
    "LAB_EAGER_SIZE": EAGER_SIZE, "LAB_GUEST_LAZY_POINTER": LAZY_POINTER, "LAB_GUEST_RESULT": GUEST_RESULT,
    "LAB_QWORDS_PER_PAGE": QWORDS_PER_PAGE, "LAB_CHECKSUM_ROTATION": CHECKSUM_ROTATION,
    "LAB_EPT_INDEX_MASK": INDEX_MASK, "LAB_EPT_PML4_SHIFT": LEVEL_SHIFTS[0],
    "LAB_EPT_PDPT_SHIFT": LEVEL_SHIFTS[1], "LAB_EPT_PD_SHIFT": LEVEL_SHIFTS[2],
    "LAB_EPT_PT_SHIFT": LEVEL_SHIFTS[3]})


def _walk(run, root: int, guest_physical: int) -> tuple[int | None, list[int]]:
    """The leaf entry mapping `guest_physical` in the EPT at `root` (None if a level is not
    present), and the tables walked."""
    table, tables = root, []
    for level, shift in enumerate(LEVEL_SHIFTS):
        tables.append(table)
        entry = checks.ram_u64(run, table + 8 * ((guest_physical >> shift) & INDEX_MASK))
        if entry & EPT_RWX_MASK == 0:
            return None, tables
        if level == len(LEVEL_SHIFTS) - 1:
            return entry, tables
        table = entry & ADDRESS_MASK
    return None, tables


def _eptp(run):
    return checks.vmcs_field(run, run.values["vmcs_region"], "EPT_POINTER")


def _in_pool(run, address: int) -> bool:
    first = run.values["table_pool"]
    return first <= address < first + run.values["table_pool_size"]


def _tables(run):
    root = _eptp(run) & ADDRESS_MASK
    guest_ram = run.values["guest_ram"]
    for guest_physical in range(0, EAGER_SIZE, PAGE_SIZE):
        leaf, tables = _walk(run, root, guest_physical)
        outside = [table for table in tables if not _in_pool(run, table)]
        if outside:
            raise Expected("every EPT table in the table pool", f"a table at {outside[0]:#x}")
        wanted = guest_ram + guest_physical | EPT_RWX_MASK | LEAF_MEMORY_TYPE
        if leaf is None or leaf & (ADDRESS_MASK | LEAF_FLAGS_MASK) != wanted:
            came = "not mapped" if leaf is None else f"the entry {leaf:#x}"
            raise Expected(f"guest-physical {guest_physical:#x} mapped to {guest_ram + guest_physical:#x}, read, "
                           f"write and execute, write-back (page-table entry {wanted:#x})", came)
    for guest_physical in range(EAGER_SIZE, run.values["guest_ram_size"], PAGE_SIZE):
        if guest_physical != run.values["lazy_page"] and _walk(run, root, guest_physical)[0] is not None:
            raise Expected(f"nothing above {EAGER_SIZE:#x} mapped but the page the guest touched",
                           f"guest-physical {guest_physical:#x} mapped")


def _entered(run):
    checks.guest_entered(run, run.values["vmcs_region"], run.values["guest_entry"])
    eptp = _eptp(run)
    if eptp & ~ADDRESS_MASK != EPTP_WANTED_FLAGS or not _in_pool(run, eptp & ADDRESS_MASK):
        raise Expected(f"an EPT pointer to a PML4 in the table pool, write-back, 4-level walk "
                       f"(low bits {EPTP_WANTED_FLAGS:#x})", f"EPT_POINTER = {eptp:#x}")


def _violation(run):
    lazy = run.values["lazy_page"]
    violations = checks.vm_exits(run, ExitReason.EPT_VIOLATION)
    if len(violations) != 1:
        raise Expected(f"one EPT violation, the guest's first read of page {lazy:#x}",
                       f"{len(violations)} EPT violations")
    leaf, _ = _walk(run, _eptp(run) & ADDRESS_MASK, lazy)
    wanted = run.values["guest_ram"] + lazy | EPT_RWX_MASK
    if leaf is None or leaf & (ADDRESS_MASK | EPT_RWX_MASK) != wanted:
        came = "not mapped" if leaf is None else f"the entry {leaf:#x}"
        raise Expected(f"page {lazy:#x} mapped on demand to {run.values['guest_ram'] + lazy:#x}, read, write and "
                       f"execute like the rest of the guest's RAM", came)


def _invept(run):
    eptp = _eptp(run)
    violation = checks.vm_exits(run, ExitReason.EPT_VIOLATION)
    after = [event for event in run.events_of("invept") if violation and event.seq > violation[0].seq]
    if not any(event.data["type"] == 1 and event.data["eptp"] == eptp for event in after):
        came = ", ".join(f"type {event.data['type']} EPTP {event.data['eptp']:#x}" for event in after) or "none"
        raise Expected(f"an INVEPT single-context (type 1) with the guest's EPTP {eptp:#x} after the mapping changed",
                       came)


def _checksum(run):
    wanted = run.values["checksum"]
    checks.console_matches(run, rf"^guest checksum: {wanted:#018x}, EPT violations: ",
                           f"'guest checksum: {wanted:#018x}': the guest read the seeded page through your mapping")


EXERCISE = Exercise(
    number=NUMBER, slug="ept", title="EPT, and an EPT violation handled",
    summary="a 4-level EPT in the table pool, the EPT pointer, a page mapped on demand at an EPT violation, INVEPT",
    files=(monitor_run.SOURCE_FILE,),
    holes=(
        Hole(1, "Follow an EPT entry to its table, creating it if needed", "SDM 29.3.2, Table 29-1 to 29-6", """
An EPT paging-structure entry that references a table holds its 4-KiB-aligned host-physical
address in bits 51:12 (EPT_ADDRESS_MASK) and the read, write and execute permissions in bits 2:0
(SDM Tables 29-1, 29-3, 29-5). An entry whose bits 2:0 are all 0 is not present (SDM 29.3.2). Read
the entry at [RBX]; if it is not present, take a table with alloc_table and write its address with
all three permissions (EPT_RWX_MASK: the permissions are ANDed over the levels, so the leaf
decides). Return the table's address in RBX."""),
        Hole(2, "Map one 4-KiB page", "SDM 29.3.2, Table 29-6, 29.3.7", """
A 4-level walk indexes a table with 9 bits of the guest-physical address at each level: bits 47:39
the PML4, 38:30 the PDPT, 29:21 the page directory, 20:12 the page table (SDM 29.3.2;
LAB_EPT_PML4_SHIFT ... LAB_EPT_PT_SHIFT and LAB_EPT_INDEX_MASK). Start at [rip + ept_root], call
ept_next_table three times, then write the page-table entry (SDM Table 29-6): the host-physical
page RSI, the permissions EDX in bits 2:0, and the memory type in bits 5:3 (LAB_EPT_MEMORY_TYPE,
write-back, shifted by EPT_MEMORY_TYPE_SHIFT; SDM 29.3.7)."""),
        Hole(3, "Write the EPT pointer", "SDM 25.6.11, Table 25-9", """
The EPT pointer (EPTP, SDM 25.6.11) is the PML4's host-physical address with, in its low bits: the
memory type used for the paging structures in bits 2:0 (LAB_EPT_MEMORY_TYPE, write-back), the
page-walk length minus one in bits 5:3 (a 4-level walk: (EPT_WALK_LENGTH_4 - 1) <<
EPTP_WALK_LENGTH_SHIFT), bit 6 = 0 (no accessed/dirty flags on this machine). VMWRITE it into
VMCS_FIELD_EPT_POINTER and keep it in [rip + eptp]: INVEPT needs it. A wrong EPTP fails the VM
entry's control checks (error 7) and the machine says which bits."""),
        Hole(4, "Handle an EPT violation: map the page, INVEPT", "SDM 29.3.3.2, Table 28-7, 31.3 INVEPT", """
An access the EPT does not allow causes an EPT violation (exit reason 48, SDM 29.3.3.2). The exit
qualification (SDM Table 28-7) says what the access was: bit 0 a data read, bit 1 a data write,
bit 2 an instruction fetch; GUEST_PHYSICAL_ADDRESS (VMCS_FIELD_GUEST_PHYSICAL_ADDRESS) says where.
For a data access inside the guest's RAM (below [r15 + LAB_INFO_GUEST_RAM_SIZE]) map its page to
[r15 + LAB_INFO_GUEST_RAM] + the page (ept_map_page, all permissions); anything else goes to
ept_violation_unexpected. The processor may cache translations derived from the EPT, so after
changing an entry invalidate them with INVEPT (SDM 29.4.3.3): single-context (RCX =
INVEPT_TYPE_SINGLE_CONTEXT) drops those of one EPTP, which the 16-byte descriptor holds
(invept_descriptor: write [rip + eptp] into its first 8 bytes), `invept rcx, [rip +
invept_descriptor]`. Do not move GUEST_RIP: the access did not happen, the guest must retry it."""),
    ),
    tests=(
        Test("tables", 15, "E#4-2", "the EPT maps the first 2 MiB, nothing more", _tables),
        Test("eptp", 10, "E#4-3", "the guest entered with your EPT pointer", _entered),
        Test("violation", 10, "E#4-4", "one EPT violation, its page mapped on demand", _violation),
        Test("invept", 5, "E#4-4", "INVEPT single-context after the change", _invept),
        Test("checksum", 10, "E#4-4", "the guest read the seeded page", _checksum),
    ),
    mistakes=(
        Mistake("E#4-2", "    or rax, LAB_EPT_MEMORY_TYPE << EPT_MEMORY_TYPE_SHIFT\n", "", ("tables",),
                "page-table entries without a memory type (uncacheable)"),
        Mistake("E#4-3", "(EPT_WALK_LENGTH_4 - 1) << EPTP_WALK_LENGTH_SHIFT",
                "EPT_WALK_LENGTH_4 << EPTP_WALK_LENGTH_SHIFT",
                ("eptp", "violation", "invept", "checksum"),
                "the walk length itself instead of the length minus one: VMLAUNCH fails with error 7"),
        Mistake("E#4-4", "    mov edx, EPT_RWX_MASK\n", "    mov edx, EPT_READ\n", ("violation",),
                "the page mapped read-only"),
        Mistake("E#4-4", "    invept rcx, [rip + invept_descriptor]\n", "", ("invept",),
                "no INVEPT after the mapping changed"),
        Mistake("E#4-4", "    mov rsi, [r15 + LAB_INFO_GUEST_RAM]\n    add rsi, rdi\n", "    mov rsi, rdi\n",
                ("violation", "checksum"),
                "the page mapped to the same host-physical address as its guest-physical one"),
    ),
    prepare=material.prepare_monitor,
    run=lambda exercise, directory, seed: monitor_run.run(exercise, directory, seed, SETUP),
    includes=("support.inc", "vmx_on.inc", "vmcs_setup.inc", "guest_registers.inc"),
)
