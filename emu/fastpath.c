/*
 * The machine's hot path, in C: counting retired instructions per translated block with
 * deterministic preemption, and address translation (IA-32e paging and EPT) for Unicorn's
 * virtual TLB. Python sets up each context and handles every event that stops a run.
 *
 * Nothing here calls into Unicorn except through the function pointers in hhr_api, which the
 * Python side takes from the binding's own library handle: this file links against nothing.
 */
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

#include "fastpath.h"

/* See: SDM Vol. 3A 4.5.4 (IA-32e paging), one level indexes nine bits of the linear address. */
#define PAGE_SHIFT 12
#define PAGE_SIZE (1ULL << PAGE_SHIFT)
#define PAGE_OFFSET_MASK (PAGE_SIZE - 1)
#define LEVEL_INDEX_BITS 9
#define LEVEL_INDEX_MASK ((1ULL << LEVEL_INDEX_BITS) - 1)
#define ENTRY_SIZE 8
#define PAGING_LEVELS 4
#define ADDRESS_FIELD_MASK 0x000FFFFFFFFFF000ULL /* bits 51:12 */

/* Paging-structure entry bits, SDM Vol. 3A Table 4-15..4-20. */
#define PTE_PRESENT (1ULL << 0)
#define PTE_WRITABLE (1ULL << 1)
#define PTE_PAGE_SIZE (1ULL << 7)
#define PTE_EXECUTE_DISABLE (1ULL << 63)

/* Page-fault error code bits, SDM Vol. 3A 4.7. */
#define PFEC_PRESENT (1U << 0)
#define PFEC_WRITE (1U << 1)
#define PFEC_RESERVED (1U << 3)
#define PFEC_FETCH (1U << 4)

#define CR0_PG (1ULL << 31)
#define CR0_WP (1ULL << 16)
#define EFER_NXE (1ULL << 11)
#define RFLAGS_IF (1ULL << 9)
#define CANONICAL_SIGN_BIT 47

/* EPT entry bits, SDM Vol. 3C 29.3.2 (Tables 29-1..29-6). */
#define EPT_READ (1ULL << 0)
#define EPT_WRITE (1ULL << 1)
#define EPT_EXECUTE (1ULL << 2)
#define EPT_PERMISSION_MASK (EPT_READ | EPT_WRITE | EPT_EXECUTE)
#define EPT_MEMORY_TYPE_SHIFT 3
#define EPT_MEMORY_TYPE_MASK 7ULL
#define EPT_LARGE_PAGE (1ULL << 7)
#define EPT_NONLEAF_RESERVED (0xF8ULL)       /* bits 7:3 of a PML4E or non-leaf entry */
#define EPT_1G_RESERVED (0x3FFFF000ULL)       /* bits 29:12 of a 1 GiB leaf */
#define EPT_2M_RESERVED (0x1FF000ULL)         /* bits 20:12 of a 2 MiB leaf */
/* EPT memory types that are not reserved: UC 0, WC 1, WT 4, WP 5, WB 6. */
#define EPT_MEMORY_TYPE_VALID_SET ((1U << 0) | (1U << 1) | (1U << 4) | (1U << 5) | (1U << 6))

/* EPT-violation exit qualification, SDM Vol. 3C Table 28-7. */
#define EPTQ_READ (1ULL << 0)
#define EPTQ_WRITE (1ULL << 1)
#define EPTQ_FETCH (1ULL << 2)
#define EPTQ_READABLE (1ULL << 3)
#define EPTQ_WRITABLE (1ULL << 4)
#define EPTQ_EXECUTABLE (1ULL << 5)
#define EPTQ_LINEAR_VALID (1ULL << 7)
#define EPTQ_FINAL_TRANSLATION (1ULL << 8)

#define LARGE_1G_LEVEL 3 /* PDPTE, counting the PTE as level 1 */
#define LARGE_2M_LEVEL 2

static uint64_t level_shift(int level) { return PAGE_SHIFT + LEVEL_INDEX_BITS * (level - 1); }

static uint64_t read_u64(const hhr_ctx *c, uint64_t physical) {
    uint64_t value;
    memcpy(&value, c->ram + physical, sizeof value);
    return value;
}

static bool ram_holds(const hhr_ctx *c, uint64_t physical) {
    return physical <= c->ram_size - ENTRY_SIZE;
}

static uint64_t reserved_address_bits(const hhr_ctx *c) {
    /* Bits 51:MAXPHYADDR of an address field are reserved. */
    return ADDRESS_FIELD_MASK & ~((1ULL << c->maxphyaddr) - 1);
}

static uint32_t access_permission(uint32_t access) {
    switch (access) {
    case HHR_ACCESS_WRITE: return HHR_PERM_WRITE;
    case HHR_ACCESS_FETCH: return HHR_PERM_EXEC;
    default: return HHR_PERM_READ;
    }
}

/* See: SDM Vol. 3C 29.3.2 and 29.3.3: EPT translation of a guest-physical address. */
int hhr_ept_translate(hhr_ctx *c, uint64_t guest_physical, uint32_t access,
                      uint64_t *host_physical, uint32_t *permissions, hhr_fault *fault) {
    uint64_t table = c->eptp & ADDRESS_FIELD_MASK;
    uint64_t allowed = EPT_PERMISSION_MASK;
    uint64_t reserved = reserved_address_bits(c);
    for (int level = PAGING_LEVELS; level >= 1; level--) {
        uint64_t index = (guest_physical >> level_shift(level)) & LEVEL_INDEX_MASK;
        uint64_t slot = table + index * ENTRY_SIZE;
        if (!ram_holds(c, slot)) goto misconfigured;
        uint64_t entry = read_u64(c, slot);
        uint64_t rwx = entry & EPT_PERMISSION_MASK;
        /* A not-present entry is one of the entries used: bits 5:3 of the qualification AND it in. */
        allowed &= rwx;
        if (rwx == 0) goto violation;
        /* Write without read, and execute-only (not supported by this machine), misconfigure. */
        if ((rwx & EPT_READ) == 0) goto misconfigured;
        if (entry & reserved) goto misconfigured;
        bool leaf = level == 1 || ((level == LARGE_1G_LEVEL || level == LARGE_2M_LEVEL) &&
                                   (entry & EPT_LARGE_PAGE));
        if (level == PAGING_LEVELS && (entry & EPT_NONLEAF_RESERVED)) goto misconfigured;
        if (!leaf) {
            if (level != PAGING_LEVELS && (entry & EPT_NONLEAF_RESERVED)) goto misconfigured;
            table = entry & ADDRESS_FIELD_MASK;
            continue;
        }
        uint32_t memory_type = (entry >> EPT_MEMORY_TYPE_SHIFT) & EPT_MEMORY_TYPE_MASK;
        if (!((EPT_MEMORY_TYPE_VALID_SET >> memory_type) & 1)) goto misconfigured;
        if (level == LARGE_1G_LEVEL && (entry & EPT_1G_RESERVED)) goto misconfigured;
        if (level == LARGE_2M_LEVEL && (entry & EPT_2M_RESERVED)) goto misconfigured;
        uint64_t page_mask = (1ULL << level_shift(level)) - 1;
        uint64_t physical = (entry & ADDRESS_FIELD_MASK & ~page_mask) | (guest_physical & page_mask);
        /* This machine: host-physical addresses at or above installed RAM are reserved. */
        if (physical >= c->ram_size) goto misconfigured;
        uint32_t perms = (uint32_t)allowed; /* EPT R/W/X bits line up with HHR_PERM_* */
        if ((perms & access_permission(access)) == 0) goto violation;
        *host_physical = physical;
        *permissions = perms;
        return 1;
    }
violation:
    fault->kind = HHR_FAULT_EPT_VIOLATION;
    fault->guest_physical = guest_physical;
    fault->ept_qualification =
        (access == HHR_ACCESS_READ ? EPTQ_READ : 0) | (access == HHR_ACCESS_WRITE ? EPTQ_WRITE : 0) |
        (access == HHR_ACCESS_FETCH ? EPTQ_FETCH : 0) |
        ((allowed & EPT_READ) ? EPTQ_READABLE : 0) | ((allowed & EPT_WRITE) ? EPTQ_WRITABLE : 0) |
        ((allowed & EPT_EXECUTE) ? EPTQ_EXECUTABLE : 0);
    return 0;
misconfigured:
    fault->kind = HHR_FAULT_EPT_MISCONFIG;
    fault->guest_physical = guest_physical;
    fault->ept_qualification = 0;
    return 0;
}

/* Reads one paging-structure entry: host-physical in root mode, through EPT for a guest. */
static int read_paging_entry(hhr_ctx *c, uint64_t address, uint64_t *entry, hhr_fault *fault) {
    uint64_t physical = address;
    if (c->mode == HHR_MODE_GUEST) {
        uint32_t perms;
        if (!hhr_ept_translate(c, address, HHR_ACCESS_READ, &physical, &perms, fault)) {
            fault->in_paging_structure = 1;
            fault->ept_qualification |= EPTQ_LINEAR_VALID;
            return 0;
        }
    } else if (!ram_holds(c, physical)) {
        fault->kind = HHR_FAULT_PAGE_FAULT;
        fault->page_fault_error_code = PFEC_RESERVED | PFEC_PRESENT;
        return 0;
    }
    *entry = read_u64(c, physical);
    return 1;
}

static int page_fault(hhr_fault *fault, uint32_t access, bool present, bool reserved, bool nxe) {
    fault->kind = HHR_FAULT_PAGE_FAULT;
    fault->page_fault_error_code = (present ? PFEC_PRESENT : 0) | (reserved ? PFEC_RESERVED : 0) |
                                   (access == HHR_ACCESS_WRITE ? PFEC_WRITE : 0) |
                                   ((access == HHR_ACCESS_FETCH && nxe) ? PFEC_FETCH : 0);
    return 0;
}

/*
 * See: SDM Vol. 3A 4.5 (4-level paging) and 4.6 (access rights, supervisor mode only: this machine
 * runs all code at CPL 0 and does not model SMEP/SMAP; accessed and dirty bits are not written).
 */
int hhr_translate(hhr_ctx *c, uint64_t linear, uint32_t access, const hhr_paging *paging,
                  uint64_t *physical_out, uint32_t *permissions, hhr_fault *fault) {
    memset(fault, 0, sizeof *fault);
    fault->access = access;
    fault->linear = linear;
    uint64_t address = linear;
    uint32_t perms = HHR_PERM_READ | HHR_PERM_WRITE | HHR_PERM_EXEC;
    if (paging->cr0 & CR0_PG) {
        bool nxe = (paging->efer & EFER_NXE) != 0;
        uint64_t reserved = reserved_address_bits(c) | (nxe ? 0 : PTE_EXECUTE_DISABLE);
        bool writable = true, executable = true;
        uint64_t table = paging->cr3 & ADDRESS_FIELD_MASK;
        address = UINT64_MAX;
        for (int level = PAGING_LEVELS; level >= 1; level--) {
            uint64_t index = (linear >> level_shift(level)) & LEVEL_INDEX_MASK;
            uint64_t entry;
            if (!read_paging_entry(c, table + index * ENTRY_SIZE, &entry, fault)) {
                if (fault->kind == HHR_FAULT_PAGE_FAULT)
                    fault->page_fault_error_code |= access == HHR_ACCESS_WRITE ? PFEC_WRITE : 0;
                return 0;
            }
            if (!(entry & PTE_PRESENT)) return page_fault(fault, access, false, false, nxe);
            bool large = (level == LARGE_1G_LEVEL || level == LARGE_2M_LEVEL) && (entry & PTE_PAGE_SIZE);
            uint64_t entry_reserved = reserved;
            if (level == PAGING_LEVELS) entry_reserved |= PTE_PAGE_SIZE;
            if (large) entry_reserved |= (1ULL << level_shift(level)) - 1 - PAGE_OFFSET_MASK - PAGE_SIZE;
            if (entry & entry_reserved) return page_fault(fault, access, true, true, nxe);
            writable = writable && (entry & PTE_WRITABLE);
            executable = executable && !(nxe && (entry & PTE_EXECUTE_DISABLE));
            if (level == 1 || large) {
                uint64_t page_mask = (1ULL << level_shift(level)) - 1;
                address = (entry & ADDRESS_FIELD_MASK & ~page_mask) | (linear & page_mask);
                break;
            }
            table = entry & ADDRESS_FIELD_MASK;
        }
        perms = HHR_PERM_READ | ((writable || !(paging->cr0 & CR0_WP)) ? HHR_PERM_WRITE : 0) |
                (executable ? HHR_PERM_EXEC : 0);
        if ((perms & access_permission(access)) == 0) return page_fault(fault, access, true, false, nxe);
    }
    if (c->mode == HHR_MODE_GUEST) {
        uint32_t ept_perms;
        if (!hhr_ept_translate(c, address, access, &address, &ept_perms, fault)) {
            fault->ept_qualification |= EPTQ_LINEAR_VALID | EPTQ_FINAL_TRANSLATION;
            return 0;
        }
        perms &= ept_perms;
    } else if (address >= c->ram_size) {
        fault->kind = HHR_FAULT_NONEXISTENT_MEMORY;
        fault->guest_physical = address;
        return 0;
    }
    *physical_out = address;
    *permissions = perms;
    return 1;
}

static uint64_t read_register(hhr_ctx *c, int regid) {
    uint64_t value = 0;
    c->api->reg_read(c->uc, regid, &value);
    return value;
}

void hhr_read_paging(hhr_ctx *c, hhr_paging *paging) {
    const hhr_api *api = c->api;
    paging->cr0 = read_register(c, api->reg_cr0);
    paging->cr3 = read_register(c, api->reg_cr3);
    paging->cr4 = read_register(c, api->reg_cr4);
    struct { uint32_t index; uint64_t value; } msr = {api->msr_efer, 0};
    api->reg_read(c->uc, api->reg_msr, &msr);
    paging->efer = msr.value;
}

int hhr_translate_current(hhr_ctx *c, uint64_t linear, uint32_t access, uint64_t *physical,
                          hhr_fault *fault) {
    hhr_paging paging;
    uint32_t perms;
    hhr_read_paging(c, &paging);
    return hhr_translate(c, linear, access, &paging, physical, &perms, fault);
}

static uint32_t access_from_mem_type(const hhr_api *api, int type) {
    if (type == api->mem_write) return HHR_ACCESS_WRITE;
    if (type == api->mem_fetch) return HHR_ACCESS_FETCH;
    return HHR_ACCESS_READ;
}

/* See: SDM Vol. 1 3.3.7.1: bits 63:47 of a canonical address are all equal. */
static bool is_canonical(uint64_t linear) {
    uint64_t upper = linear >> CANONICAL_SIGN_BIT;
    return upper == 0 || upper == (UINT64_MAX >> CANONICAL_SIGN_BIT);
}

/* UC_HOOK_TLB_FILL: Unicorn asks for the host-physical page behind a linear page. */
bool hhr_tlb_fill(void *uc, uint64_t address, int type, hhr_tlb_entry *result, void *user_data) {
    hhr_ctx *c = (hhr_ctx *)user_data;
    uint64_t physical;
    uint32_t perms;
    hhr_paging paging;
    (void)uc;
    c->tlb_fills++;
    if (!is_canonical(address)) {
        /*
         * Unicorn looks up the page just below every exit point, including the non-canonical address
         * the machine passes as the never-reached end of a run: those pages answer for fetches only,
         * and execution stops before anything there runs. Any other non-canonical page allows no access,
         * so a real access still fails (the machine raises #GP for it).
         */
        c->noncanonical_fills++;
        result->paddr = 0;
        uint64_t page = address & ~PAGE_OFFSET_MASK;
        bool end_of_run = page == HHR_END_OF_RUN_ADDRESS ||
                          page == ((HHR_END_OF_RUN_ADDRESS - 1) & ~PAGE_OFFSET_MASK);
        result->perms = end_of_run ? HHR_PERM_EXEC : 0;
        return true;
    }
    hhr_read_paging(c, &paging);
    if (!hhr_translate(c, address, access_from_mem_type(c->api, type), &paging, &physical, &perms,
                       &c->fault)) {
        c->stop_reason = HHR_STOP_FAULT;
        return false;
    }
    result->paddr = physical & ~PAGE_OFFSET_MASK;
    result->perms = perms;
    if (c->dirty_pages != NULL) {
        /* Dirty-page tracking: a page is marked at the fill of its first write. A page not yet dirty
         * is filled without write permission, so its first write comes back here as a write fill. */
        uint64_t page = physical >> PAGE_SHIFT;
        if (page < c->dirty_page_count) {
            uint32_t access = access_from_mem_type(c->api, type);
            if (access == HHR_ACCESS_WRITE) c->dirty_pages[page] = 1;
            else if (!c->dirty_pages[page]) result->perms &= ~(uint32_t)HHR_PERM_WRITE;
            if (access == HHR_ACCESS_FETCH) c->code_pages[page] = 1;   /* a restore of it drops translated code */
        }
    }
    return true;
}

static void stop(hhr_ctx *c, uint32_t reason) {
    c->stop_reason = reason;
    c->api->emu_stop(c->uc);
}

static hhr_icount_entry *icount_slot(hhr_ctx *c, uint64_t pc, uint32_t size) {
    uint64_t hash = (pc ^ (pc >> 17) ^ ((uint64_t)size << 40)) * 0x9E3779B97F4A7C15ULL;
    return &c->icount_cache[(hash >> 32) & c->icount_cache_mask];
}

/*
 * UC_HOOK_BLOCK: runs before each translated block. A stop requested here takes effect before the
 * block executes, so a block is counted exactly when it runs: preemption is deterministic.
 */
/* Coverage (fuzzing): a block's place in the edge map is a multiplicative hash of its offset in
 * the image, its top bits (AFL: previous block's place shifted, xor this block's). */
#define EDGE_HASH_MULTIPLIER 0x9E3779B97F4A7C15ULL
#define EDGE_HASH_SHIFT 48

void hhr_block_hook(void *uc, uint64_t pc, uint32_t size, void *user_data) {
    hhr_ctx *c = (hhr_ctx *)user_data;
    (void)uc;
    if (size == 0) return;
    if (!is_canonical(pc)) {
        /* Code reached a non-canonical address (only the end-of-run page translates there): the
         * block must not run; the machine raises #GP (SDM Vol. 1 3.3.7.1). */
        stop(c, HHR_STOP_NONCANONICAL);
        return;
    }
    if (c->retired >= c->stop_at) {
        stop(c, HHR_STOP_BUDGET);
        return;
    }
    if (c->watch_interrupt_window && (read_register(c, c->api->reg_rflags) & RFLAGS_IF)) {
        stop(c, HHR_STOP_INTERRUPT_WINDOW);
        return;
    }
    hhr_icount_entry *slot = icount_slot(c, pc, size);
    if (slot->pc != pc || slot->size != size) {
        c->icount_misses++;
        int answer = hhr_on_new_block(c->python_id, pc, size);
        if (answer < 0) {
            stop(c, HHR_STOP_NEW_TRAPS);
            return;
        }
        slot->pc = pc;
        slot->size = size;
        slot->icount = (uint32_t)answer & HHR_BLOCK_COUNT_MASK;
        slot->uses = (uint32_t)answer >> HHR_BLOCK_USES_SHIFT;
    }
    /* The block is about to run: if it touches shared state this instance does not hold, it takes
     * it first. */
    if (slot->uses & ~c->holds) hhr_shared_acquire(c, slot->uses);
    c->block_pc = pc;
    c->block_size = size;
    c->block_icount = slot->icount;
    c->retired += slot->icount;
    c->blocks++;
    if (c->edge_map != NULL && pc >= c->edge_low && pc < c->edge_high) {
        uint64_t here = ((pc - c->edge_low) * EDGE_HASH_MULTIPLIER >> EDGE_HASH_SHIFT) & (HHR_EDGE_MAP_SIZE - 1);
        uint8_t *counter = &c->edge_map[here ^ c->edge_previous];
        if (*counter != UINT8_MAX) (*counter)++;
        c->edge_previous = here >> 1;
        if (c->block_map != NULL) c->block_map[pc - c->edge_low] = 1;
    }
}

/* Coverage: edges hit in `map` and never before in `seen` are added to it; returns how many. */
uint64_t hhr_edge_map_merge(const uint8_t *map, uint8_t *seen, uint64_t size) {
    uint64_t fresh = 0;
    for (uint64_t i = 0; i < size; i++) {
        if (map[i] && !seen[i]) { seen[i] = 1; fresh++; }
    }
    return fresh;
}

/* The dirty pages' numbers into `pages` (room for `count`), their marks cleared; returns how many. */
uint64_t hhr_dirty_collect(uint8_t *dirty, uint64_t count, uint32_t *pages) {
    uint64_t found = 0;
    const uint64_t *words = (const uint64_t *)dirty;
    for (uint64_t w = 0; w < count / sizeof(uint64_t); w++) {
        if (!words[w]) continue;
        for (uint64_t i = w * sizeof(uint64_t); i < (w + 1) * sizeof(uint64_t); i++) {
            if (dirty[i]) { pages[found++] = (uint32_t)i; dirty[i] = 0; }
        }
    }
    for (uint64_t i = count / sizeof(uint64_t) * sizeof(uint64_t); i < count; i++) {
        if (dirty[i]) { pages[found++] = (uint32_t)i; dirty[i] = 0; }
    }
    return found;
}

void hhr_forget_blocks(hhr_ctx *c) {
    memset(c->icount_cache, 0, sizeof(hhr_icount_entry) * ((size_t)c->icount_cache_mask + 1));
}

/* Copies registers between two Unicorn instances (a VM exit hands guest GPRs to the host). */
void hhr_copy_registers(const hhr_api *api, void *from_uc, void *to_uc, const int *regids, int count) {
    for (int i = 0; i < count; i++) {
        uint64_t value = 0;
        api->reg_read(from_uc, regids[i], &value);
        api->reg_write(to_uc, regids[i], &value);
    }
}

/* Unicorn's uc_x86_msr: the MSR an access of UC_X86_REG_MSR reads or writes. */
typedef struct {
    uint32_t index;
    uint64_t value;
} msr_access;

/* Copies one class of shared state from one instance to another, register by register. */
static void copy_shared_class(hhr_shared *s, const hhr_ctx *from, const hhr_ctx *to, int cls) {
    const hhr_api *api = to->api;
    for (uint32_t i = 0; i < s->register_count[cls]; i++) {
        const hhr_shared_register *r = &s->registers[cls][i];
        if (r->regid == api->reg_msr) {
            msr_access msr = {r->msr, 0};
            api->reg_read(from->uc, r->regid, &msr);
            api->reg_write(to->uc, r->regid, &msr);
        } else {
            uint8_t value[HHR_SHARED_VALUE_BYTES] = {0};
            api->reg_read(from->uc, r->regid, value);
            api->reg_write(to->uc, r->regid, value);
        }
    }
    s->copies[cls]++;
}

/* Makes `c` the holder of class `cls`: the only instance whose copy is current. */
static void take_holder(hhr_shared *s, hhr_ctx *c, int cls) {
    hhr_ctx *previous = (hhr_ctx *)s->holder[cls];
    uint32_t bit = 1U << cls;
    if (previous != NULL) previous->holds &= ~bit;
    s->generation[cls]++;
    c->held[cls] = s->generation[cls];
    s->holder[cls] = c;
    c->holds |= bit;
}

/* Before `c` runs code that may read or change shared state of the classes in `uses`: its copy
 * gets the current values (from the holder, if it has not got them), and it becomes the holder. */
void hhr_shared_acquire(hhr_ctx *c, uint32_t uses) {
    hhr_shared *s = c->shared;
    if (s == NULL) return;
    for (int cls = 0; cls < HHR_SHARED_CLASSES; cls++) {
        if (!((uses >> cls) & 1) || s->holder[cls] == c) continue;
        if (c->held[cls] != s->generation[cls]) copy_shared_class(s, (hhr_ctx *)s->holder[cls], c, cls);
        take_holder(s, c, cls);
    }
}

/* `c` leaves its LP (its VMCS is cleared, or entered on another LP): what it holds goes back to
 * the LP's root instance, so nothing of the LP's state leaves with it. */
void hhr_shared_detach(hhr_ctx *c) {
    hhr_shared *s = c->shared;
    if (s == NULL) return;
    hhr_ctx *root = (hhr_ctx *)s->root;
    for (int cls = 0; cls < HHR_SHARED_CLASSES; cls++) {
        if (s->holder[cls] == c && root != c) {
            if (root->held[cls] != s->generation[cls]) copy_shared_class(s, c, root, cls);
            take_holder(s, root, cls);
        }
        c->held[cls] = 0;
    }
    c->holds = 0;
    c->shared = NULL;
}

/* `c` runs on the LP of `shared` from now on; its own copy is current for no class yet. */
void hhr_shared_attach(hhr_ctx *c, hhr_shared *shared) {
    if (c->shared == shared) return;
    hhr_shared_detach(c);
    c->shared = shared;
}

/*
 * UC_HOOK_INSN_INVALID, registered before the machine's Python hook: VMREAD and VMWRITE with
 * register operands on a supported, writable field of the current VMCS are carried out here
 * (SDM Vol. 3C 31.3, VMsucceed). Everything else, failures included, returns false and takes
 * the full path in Python, which gives the SDM's outcome.
 */
#define REX_MIN 0x40
#define REX_MAX 0x4F
#define REX_R 0x4
#define REX_B 0x1
#define TWO_BYTE_ESCAPE 0x0F
#define OPCODE_VMREAD 0x78
#define OPCODE_VMWRITE 0x79
#define MODRM_MOD_REGISTER 3
#define MODRM_REG_SHIFT 3
#define MODRM_FIELD_MASK 7
#define REX_EXTENSION 8
#define LONGEST_FAST_FORM 4
#define HIGH_HALF_SHIFT 32
#define LOW_HALF_MASK 0xFFFFFFFFULL
#define ENCODING_ACCESS_HIGH 1ULL
/* VMsucceed clears CF, PF, AF, ZF, SF and OF (SDM Vol. 3C 31.2). */
#define RFLAGS_VMX_RESULT_BITS ((1ULL << 0) | (1ULL << 2) | (1ULL << 4) | (1ULL << 6) | (1ULL << 7) | (1ULL << 11))

static const hhr_field *field_for(const hhr_vmx *v, uint64_t encoding, bool *high) {
    if (encoding >= HHR_VMCS_ENCODING_LIMIT) return NULL;
    *high = (encoding & ENCODING_ACCESS_HIGH) != 0;
    const hhr_field *field = &v->fields[encoding & ~ENCODING_ACCESS_HIGH];
    if (!(field->flags & HHR_FIELD_SUPPORTED)) return NULL;
    if (*high && !(field->flags & HHR_FIELD_WIDTH_64)) return NULL;
    if (field->flags & HHR_FIELD_PYTHON_ONLY) return NULL;
    return field;
}

static const uint8_t VMRESUME_BYTES[] = {0x0F, 0x01, 0xC3};
static const uint8_t VMCALLR_BYTES[] = {0x0F, 0x0A};   /* docs/machine.md 8.1 */

static uint64_t guest_rip(const hhr_vmx *v, const hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = v->constants;
    if (vmcs->live_written & k->guest_rip_live_bit) return vmcs->values[k->guest_rip];
    uint64_t rip = 0;
    v->root->api->reg_read(vmcs->guest_uc, v->root->api->reg_rip, &rip);
    return rip;
}

/* A launched VMCS whose guest instance holds its state, with nothing but GUEST_RIP written since
 * entry checks that passed (see emu/vmx.py, VmxUnit._check_entry and load_guest_state): an entry
 * needs no check and no load Python would make, and no inverse hypercall is in progress. */
static bool entry_needs_no_python(const hhr_vmx *v, const hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = v->constants;
    return vmcs->launched && vmcs->guest_ctx != NULL && vmcs->guest_uc != NULL &&
           vmcs->entry_verified && !vmcs->checked_field_written &&
           !(vmcs->live_written & ~k->guest_rip_live_bit) && !vmcs->inverse_call &&
           is_canonical(guest_rip(v, vmcs)) &&
           vmcs->guest_ctx->mode == HHR_MODE_GUEST && vmcs->guest_ctx->eptp == vmcs->values[k->ept_pointer];
}

/* VMRESUME the transition loop may carry out in C: the same VM entry Python would make, with no
 * event to inject, no MSR to load and the guest not halted. */
static bool entry_is_plain(const hhr_vmx *v, const hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = v->constants;
    const uint64_t *values = vmcs->values;
    return entry_needs_no_python(v, vmcs) && !vmcs->halted &&
           !(values[k->entry_interruption_info] & k->interruption_info_valid) &&
           values[k->entry_msr_load_count] == 0;
}

/* VMCALLR the transition loop may carry out in C: every case emu/vmx.py's VmxUnit.vmcallr would
 * fail, or would check or load state for, is Python's (docs/machine.md 8.3, steps 1-6). */
static bool inverse_call_is_plain(const hhr_vmx *v, const hhr_vmcs *vmcs) {
    return entry_needs_no_python(v, vmcs) && vmcs->values[v->constants->inverse_entry] != 0;
}

/* The `length` code bytes at a linear address of a context, if it translates for a fetch and the
 * bytes lie in one page; NULL otherwise. */
static const uint8_t *code_at(hhr_ctx *c, uint64_t rip, size_t length) {
    uint64_t physical;
    hhr_fault fault;
    if (!hhr_translate_current(c, rip, HHR_ACCESS_FETCH, &physical, &fault)) return NULL;
    if ((physical & PAGE_OFFSET_MASK) > PAGE_SIZE - length) return NULL;
    return c->ram + physical;
}

bool hhr_invalid_instruction(void *uc, void *user_data) {
    hhr_vmx *v = (hhr_vmx *)user_data;
    hhr_ctx *c = v->root;
    const hhr_api *api = c->api;
    hhr_vmcs *vmcs = v->current;
    if (!v->vmx_on || vmcs == NULL) return false;
    uint64_t rip = read_register(c, api->reg_rip);
    const uint8_t *code = code_at(c, rip, LONGEST_FAST_FORM);
    if (code == NULL) return false;
    if (v->fast_entries && memcmp(code, VMRESUME_BYTES, sizeof VMRESUME_BYTES) == 0 && entry_is_plain(v, vmcs)) {
        v->entry_pending = 1;      /* the instruction retires with its block; the loop enters */
        stop(c, HHR_STOP_NONE);
        return true;
    }
    if (v->fast_entries && memcmp(code, VMCALLR_BYTES, sizeof VMCALLR_BYTES) == 0 &&
        rip + sizeof VMCALLR_BYTES == c->block_pc + c->block_size && c->block_icount != 0 &&
        inverse_call_is_plain(v, vmcs)) {
        v->inverse_call_pending = 1;   /* as VMRESUME: it retires with its block; the loop calls */
        stop(c, HHR_STOP_NONE);
        return true;
    }
    uint32_t length = 0, rex = 0;
    if (code[0] >= REX_MIN && code[0] <= REX_MAX) rex = code[length++];
    if (code[length] != TWO_BYTE_ESCAPE) return false;
    uint8_t opcode = code[length + 1];
    uint8_t modrm = code[length + 2];
    length += 3;
    if ((opcode != OPCODE_VMREAD && opcode != OPCODE_VMWRITE) || (modrm >> 6) != MODRM_MOD_REGISTER) return false;
    int reg = ((modrm >> MODRM_REG_SHIFT) & MODRM_FIELD_MASK) + ((rex & REX_R) ? REX_EXTENSION : 0);
    int rm = (modrm & MODRM_FIELD_MASK) + ((rex & REX_B) ? REX_EXTENSION : 0);
    /* VMREAD r/m64, r64: reg holds the encoding. VMWRITE r64, r/m64: reg holds the encoding too. */
    uint64_t encoding = read_register(c, api->gpr[reg]);
    bool high;
    const hhr_field *field = field_for(v, encoding, &high);
    if (field == NULL) return false;
    bool live = vmcs->guest_uc != NULL && (field->flags & HHR_FIELD_LIVE_REGISTER) &&
                !(vmcs->live_written & field->live_bit);
    uint64_t stored = vmcs->values[field->slot];
    if (live) api->reg_read(vmcs->guest_uc, field->live_register, &stored);
    if (opcode == OPCODE_VMREAD) {
        uint64_t value = stored & field->mask;
        if (high) value >>= HIGH_HALF_SHIFT;
        api->reg_write(uc, api->gpr[rm], &value);
    } else {
        if (field->flags & HHR_FIELD_READ_ONLY) return false;
        uint64_t value = read_register(c, api->gpr[rm]);
        value = high ? ((value & LOW_HALF_MASK) << HIGH_HALF_SHIFT) | (stored & LOW_HALF_MASK)
                     : value & field->mask;
        vmcs->values[field->slot] = value;
        vmcs->live_written |= field->live_bit;  /* loaded at the next VM entry, after its checks */
        if (!(field->flags & HHR_FIELD_KEEPS_VERIFICATION)) vmcs->checked_field_written = 1;
    }
    uint64_t rflags = read_register(c, api->reg_rflags) & ~RFLAGS_VMX_RESULT_BITS;
    api->reg_write(uc, api->reg_rflags, &rflags);
    rip += length;
    api->reg_write(uc, api->reg_rip, &rip);
    return true;
}

/* --- the transition loop ----------------------------------------------------------------------- */
static const uint8_t CPUID_BYTES[] = {0x0F, 0xA2};

static void record_at(hhr_lp *lp, uint64_t time, uint32_t kind, uint32_t reason, uint64_t qualification,
                      uint64_t vmcs, uint64_t rip) {
    hhr_transition_event *e = &lp->events[lp->event_count++];
    e->kind = kind;
    e->reason = reason;
    e->qualification = qualification;
    e->time = time;
    e->vmcs = vmcs;
    e->rip = rip;
}

static void record(hhr_lp *lp, uint32_t kind, uint32_t reason, uint64_t qualification, uint64_t vmcs,
                   uint64_t rip) {
    record_at(lp, lp->time, kind, reason, qualification, vmcs, rip);
}

static void write_register_if_changed(const hhr_api *api, void *uc, int regid, uint64_t value) {
    uint64_t current = 0;
    api->reg_read(uc, regid, &current);
    if (current != value) api->reg_write(uc, regid, &value);
}

static void write_table_if_changed(const hhr_api *api, void *uc, int regid, uint64_t base, uint32_t limit) {
    hhr_descriptor_table table;
    memset(&table, 0, sizeof table);
    api->reg_read(uc, regid, &table);
    if (table.base != base || table.limit != limit) {
        memset(&table, 0, sizeof table);
        table.base = base;
        table.limit = limit;
        api->reg_write(uc, regid, &table);
    }
}

/* A VM exit with no event information (CPUID, VMCALL, HLT, I/O, the VMX-preemption timer), as
 * emu/vmx.py's exit_guest and load_host_state make it (SDM Vol. 3C 28.2, 28.5). Which exits the loop
 * carries out, with which reasons and controls, is emu/traps.py's table (its FastPath rows, which
 * fill hhr_transition_constants); tests/test_traps.py fails when this file and the table disagree. */
static void exit_simply(hhr_lp *lp, hhr_vmcs *vmcs, uint32_t reason, uint32_t length, uint64_t qualification) {
    const hhr_transition_constants *k = lp->vmx->constants;
    const hhr_api *api = lp->root->api;
    uint64_t *values = vmcs->values;
    void *root_uc = lp->root->uc;
    values[k->exit_reason] = reason;
    values[k->exit_qualification] = qualification;
    values[k->exit_instruction_length] = length;
    values[k->exit_interruption_info] = 0;
    values[k->exit_interruption_error] = 0;
    values[k->idt_vectoring_info] = 0;
    values[k->idt_vectoring_error] = 0;
    values[k->activity_state] = k->activity_active;
    values[k->entry_interruption_info] &= ~k->interruption_info_valid;
    if (lp->preemption_active && (values[k->exit_controls] & k->save_preemption_timer_control)) {
        uint64_t remaining = lp->preemption_deadline > lp->time ? lp->preemption_deadline - lp->time : 0;
        values[k->preemption_timer_value] = remaining >> k->preemption_timer_rate;
    }
    lp->preemption_active = 0;
    hhr_copy_registers(api, vmcs->guest_uc, root_uc, lp->handover, lp->handover_count);
    record(lp, HHR_EVENT_VM_EXIT, reason, qualification, vmcs->address, guest_rip(lp->vmx, vmcs));
    write_register_if_changed(api, root_uc, api->reg_cr3, values[k->host_cr3]);
    write_register_if_changed(api, root_uc, api->reg_cr0, values[k->host_cr0]);
    write_register_if_changed(api, root_uc, api->reg_cr4, values[k->host_cr4]);
    write_register_if_changed(api, root_uc, api->reg_fs_base, values[k->host_fs_base]);
    write_register_if_changed(api, root_uc, api->reg_gs_base, values[k->host_gs_base]);
    write_table_if_changed(api, root_uc, api->reg_gdtr, values[k->host_gdtr_base], (uint32_t)k->descriptor_limit_after_exit);
    write_table_if_changed(api, root_uc, api->reg_idtr, values[k->host_idtr_base], (uint32_t)k->descriptor_limit_after_exit);
    if (values[k->exit_controls] & k->load_efer_control) {
        struct { uint32_t index; uint64_t value; } msr = {api->msr_efer, values[k->host_efer]};
        api->reg_write(root_uc, api->reg_msr, &msr);
    }
    uint64_t rsp = values[k->host_rsp], rflags = k->rflags_after_exit, rip = values[k->host_rip];
    api->reg_write(root_uc, api->reg_rsp, &rsp);
    api->reg_write(root_uc, api->reg_rflags, &rflags);
    api->reg_write(root_uc, api->reg_rip, &rip);
    lp->in_guest = 0;
}

/* The VM entry of a plain VMRESUME, as emu/vmx.py's begin_guest makes it (SDM Vol. 3C 27.3). */
static void enter_on_vmresume(hhr_lp *lp, hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = lp->vmx->constants;
    const hhr_api *api = lp->root->api;
    uint64_t rip = read_register(lp->root, api->reg_rip) + k->vmresume_length;
    api->reg_write(lp->root->uc, api->reg_rip, &rip);
    hhr_shared_attach(vmcs->guest_ctx, lp->shared);
    if (vmcs->live_written & k->guest_rip_live_bit) {
        api->reg_write(vmcs->guest_uc, api->reg_rip, &vmcs->values[k->guest_rip]);
        vmcs->live_written &= ~k->guest_rip_live_bit;
    }
    hhr_copy_registers(api, lp->root->uc, vmcs->guest_uc, lp->handover, lp->handover_count);
    record(lp, HHR_EVENT_VM_ENTRY, 0, 0, vmcs->address, guest_rip(lp->vmx, vmcs));
    /* The VMX-preemption timer starts counting down at VM entry (SDM Vol. 3C 26.5.1). */
    lp->preemption_active = (vmcs->values[k->pin_controls] & k->preemption_timer_control) != 0;
    if (lp->preemption_active)
        lp->preemption_deadline = lp->time + (vmcs->values[k->preemption_timer_value] << k->preemption_timer_rate);
    lp->in_guest = 1;
}

/* A live guest-state field the machine itself writes (emu/vmcs.py, ActiveVmcs.write): the slot and
 * the guest instance's register both take the value, and the field no longer counts as written by
 * software. */
static void write_live_field(const hhr_api *api, hhr_vmcs *vmcs, int32_t slot, int regid, uint32_t live_bit,
                             uint64_t value) {
    vmcs->values[slot] = value;
    api->reg_write(vmcs->guest_uc, regid, &value);
    vmcs->live_written &= ~live_bit;
}

/* VMCALLR, docs/machine.md 8.3 steps 7-9, as emu/vmx.py's VmxUnit.vmcallr makes it once its checks
 * pass (inverse_call_is_plain): the interrupted RIP, RSP and RFLAGS are saved, a `vmcallr` event
 * is published before the instruction retires, and the guest is entered as VMRESUME enters it,
 * without injection, at INVERSE_HYPERCALL_ENTRY with interrupts disabled. */
static void enter_inverse_call(hhr_lp *lp, hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = lp->vmx->constants;
    const hhr_api *api = lp->root->api;
    uint64_t *values = vmcs->values;
    if (vmcs->live_written & k->guest_rip_live_bit) {   /* load_written_state: GUEST_RIP written by software */
        api->reg_write(vmcs->guest_uc, api->reg_rip, &values[k->guest_rip]);
        vmcs->live_written &= ~k->guest_rip_live_bit;
    }
    uint64_t call = read_register(lp->root, api->gpr[0]);   /* RAX */
    vmcs->inverse_saved_rip = read_register(vmcs->guest_ctx, api->reg_rip);
    vmcs->inverse_saved_rsp = read_register(vmcs->guest_ctx, api->reg_rsp);
    vmcs->inverse_saved_rflags = read_register(vmcs->guest_ctx, api->reg_rflags);
    vmcs->inverse_call = 1;
    /* The loop counted the VMCALLR with its block; Python publishes the call before it retires. */
    record_at(lp, lp->time - 1, HHR_EVENT_INVERSE_CALL, 0, call, vmcs->address, 0);
    uint64_t rip = read_register(lp->root, api->reg_rip) + k->vmcallr_length;
    api->reg_write(lp->root->uc, api->reg_rip, &rip);
    hhr_shared_attach(vmcs->guest_ctx, lp->shared);
    hhr_copy_registers(api, lp->root->uc, vmcs->guest_uc, lp->handover, lp->handover_count);
    record(lp, HHR_EVENT_VM_ENTRY, 0, 0, vmcs->address, vmcs->inverse_saved_rip);
    lp->preemption_active = (values[k->pin_controls] & k->preemption_timer_control) != 0;
    if (lp->preemption_active)
        lp->preemption_deadline = lp->time + (values[k->preemption_timer_value] << k->preemption_timer_rate);
    vmcs->halted = 0;
    write_live_field(api, vmcs, k->guest_rip, api->reg_rip, k->guest_rip_live_bit, values[k->inverse_entry]);
    if (values[k->inverse_stack])
        write_live_field(api, vmcs, k->guest_rsp, api->reg_rsp, k->guest_rsp_live_bit, values[k->inverse_stack]);
    write_live_field(api, vmcs, k->guest_rflags, api->reg_rflags, k->guest_rflags_live_bit,
                     k->rflags_during_inverse_call);
    lp->in_guest = 1;
}

/* The guest's VMCALL during an inverse hypercall, docs/machine.md 8.3 step 11, as emu/vmx.py's
 * _end_inverse_call makes it: no VM exit; the GPRs go to root, the interrupted guest state comes
 * back, and root continues after its VMCALLR with VMsucceed. */
static void return_from_inverse_call(hhr_lp *lp, hhr_vmcs *vmcs) {
    const hhr_transition_constants *k = lp->vmx->constants;
    const hhr_api *api = lp->root->api;
    uint64_t *values = vmcs->values;
    vmcs->inverse_call = 0;
    if (lp->preemption_active && (values[k->exit_controls] & k->save_preemption_timer_control)) {
        uint64_t remaining = lp->preemption_deadline > lp->time ? lp->preemption_deadline - lp->time : 0;
        values[k->preemption_timer_value] = remaining >> k->preemption_timer_rate;
    }
    hhr_copy_registers(api, vmcs->guest_uc, lp->root->uc, lp->handover, lp->handover_count);
    write_live_field(api, vmcs, k->guest_rip, api->reg_rip, k->guest_rip_live_bit, vmcs->inverse_saved_rip);
    write_live_field(api, vmcs, k->guest_rsp, api->reg_rsp, k->guest_rsp_live_bit, vmcs->inverse_saved_rsp);
    write_live_field(api, vmcs, k->guest_rflags, api->reg_rflags, k->guest_rflags_live_bit,
                     vmcs->inverse_saved_rflags);
    vmcs->halted = values[k->activity_state] == k->activity_hlt;   /* the state before the call */
    lp->preemption_active = 0;
    lp->in_guest = 0;
    record(lp, HHR_EVENT_INVERSE_RETURN, 0, read_register(lp->root, api->gpr[0]), vmcs->address, 0);
    uint64_t rflags = read_register(lp->root, api->reg_rflags) & ~RFLAGS_VMX_RESULT_BITS;   /* VMsucceed */
    api->reg_write(lp->root->uc, api->reg_rflags, &rflags);
}

static const uint8_t VMCALL_BYTES[] = {0x0F, 0x01, 0xC1};
static const uint8_t HLT_BYTES[] = {0xF4};

/* The bytes at a linear address of a context, if they lie in one page and match `expected`. */
static bool code_is(hhr_ctx *c, uint64_t rip, const uint8_t *expected, size_t length) {
    const uint8_t *code = code_at(c, rip, length);
    return code != NULL && memcmp(code, expected, length) == 0;
}

/* IN and OUT without string or REX prefixes (SDM Vol. 2B IN, OUT): their size, port and length. */
#define OPERAND_SIZE_PREFIX 0x66
#define IN_AL_IMM 0xE4
#define IN_EAX_IMM 0xE5
#define OUT_IMM_AL 0xE6
#define OUT_IMM_EAX 0xE7
#define IN_AL_DX 0xEC
#define IN_EAX_DX 0xED
#define OUT_DX_AL 0xEE
#define OUT_DX_EAX 0xEF
#define PORT_MASK 0xFFFFULL
#define LAST_PORT 0xFFFFULL
#define BITS_PER_BYTE 8
#define LONGEST_IO_FORM 3         /* 66 E5 ib */

/* Whether a guest stopped at IN or OUT exits under its I/O-exiting controls (SDM Vol. 3C 26.1.3);
 * false also for every form the Python path handles (string I/O, prefixes, no exit). */
static bool io_exit(hhr_lp *lp, hhr_vmcs *vmcs, hhr_ctx *c, uint64_t rip, uint32_t *length,
                    uint64_t *qualification) {
    const hhr_transition_constants *k = lp->vmx->constants;
    const uint8_t *code = code_at(c, rip, LONGEST_IO_FORM);
    if (code == NULL) return false;
    uint32_t at = 0, size_of_wide = 4;
    if (code[0] == OPERAND_SIZE_PREFIX) {
        size_of_wide = 2;
        at = 1;
    }
    uint8_t opcode = code[at];
    bool immediate = opcode >= IN_AL_IMM && opcode <= OUT_IMM_EAX;
    bool through_dx = opcode >= IN_AL_DX && opcode <= OUT_DX_EAX;
    if (!immediate && !through_dx) return false;
    bool is_in = opcode == IN_AL_IMM || opcode == IN_EAX_IMM || opcode == IN_AL_DX || opcode == IN_EAX_DX;
    bool wide = opcode == IN_EAX_IMM || opcode == OUT_IMM_EAX || opcode == IN_EAX_DX || opcode == OUT_DX_EAX;
    if (at && !wide) return false;
    uint32_t size = wide ? size_of_wide : 1;
    uint64_t port = immediate ? code[at + 1] : (read_register(c, c->api->gpr[2]) & PORT_MASK); /* DX */
    uint64_t controls = vmcs->values[k->primary_controls];
    bool exits;
    if (controls & k->io_bitmaps_control) {
        exits = false;
        for (uint64_t p = port; p < port + size && !exits; p++) {
            if (p > LAST_PORT) { exits = true; break; }
            uint64_t bitmap = vmcs->values[p < k->io_bitmap_ports ? k->io_bitmap_a : k->io_bitmap_b];
            uint64_t offset = p % k->io_bitmap_ports, byte = bitmap + offset / BITS_PER_BYTE;
            if (byte >= c->ram_size) { exits = true; break; }
            exits = (c->ram[byte] >> (offset % BITS_PER_BYTE)) & 1;
        }
    } else {
        exits = (controls & k->unconditional_io_control) != 0;
    }
    if (!exits) return false;
    *length = at + (immediate ? 2 : 1);
    *qualification = (size - 1) | (is_in ? k->io_direction_in : 0) | (immediate ? k->io_immediate : 0) |
                     (port << k->io_port_shift);
    return true;
}

/* UC_HOOK_INSN_INVALID of a guest, before the machine's Python hook: while the transition loop runs
 * the guest, a VMCALL that ends the block just counted becomes a VM exit the loop carries out. */
bool hhr_guest_invalid_instruction(void *uc, void *user_data) {
    hhr_ctx *c = (hhr_ctx *)user_data;
    (void)uc;
    if (!c->fast_exits) return false;
    uint64_t rip = read_register(c, c->api->reg_rip);
    if (rip + sizeof VMCALL_BYTES != c->block_pc + c->block_size || c->block_icount == 0) return false;
    if (!code_is(c, rip, VMCALL_BYTES, sizeof VMCALL_BYTES)) return false;
    c->exit_pending = 1;
    stop(c, HHR_STOP_NONE);
    return true;
}

/* Room the loop keeps in its queue for the VM exit and entry it may queue after a run. */
#define LOOP_EVENTS_AFTER_RUN 2

void hhr_port_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data) {
    hhr_port_out *p = user_data;
    hhr_lp *lp = p->lp;
    if (port == p->console_port && lp != NULL && lp->in_run && lp->running == p->ctx && !lp->publish_each &&
        lp->event_count + 1 + LOOP_EVENTS_AFTER_RUN <= HHR_EVENTS_MAX) {
        hhr_transition_event *e = &lp->events[lp->event_count++];
        e->kind = HHR_EVENT_CONSOLE_OUT;
        e->reason = port;
        e->qualification = value;
        e->time = lp->run_time_base + p->ctx->retired - lp->run_mark;   /* the LP's clock now */
        e->vmcs = 0;
        e->rip = (uint64_t)size;
        return;
    }
    p->forward(uc, port, size, value, NULL);
}

int hhr_run_transitions(hhr_lp *lp) {
    hhr_vmx *v = lp->vmx;
    const hhr_transition_constants *k = v->constants;
    const hhr_api *api = lp->root->api;
    lp->retired = 0;
    lp->runs = 0;
    lp->event_count = 0;
    lp->running = NULL;
    v->fast_entries = 1;
    int result = HHR_LOOP_NOTHING_RAN;
    for (;;) {
        /* A trace follows the LP: the events queued so far are published before anything else runs
         * (Python answers nonzero when the loop must end: the machine stops, a subscriber failed). */
        if (lp->publish_each && lp->event_count && hhr_on_loop_events(lp->python_id)) break;
        hhr_vmcs *vmcs = v->current;
        if (lp->time >= lp->deadline || lp->attention || lp->event_count + LOOP_EVENTS_AFTER_RUN > HHR_EVENTS_MAX) break;
        if (lp->in_guest && (vmcs == NULL || vmcs->halted ||
                             (vmcs->values[k->primary_controls] & k->interrupt_window_control) ||
                             vmcs->values[k->exit_msr_store_count] || vmcs->values[k->exit_msr_load_count]))
            break;   /* VM exits with MSR lists are Python's (emu/vmx.py) */
        if (lp->in_guest && lp->preemption_active && lp->time >= lp->preemption_deadline) {
            if (vmcs->inverse_call) break;   /* the timer ends the call: Python's (emu/vmx.py) */
            exit_simply(lp, vmcs, k->exit_reason_preemption_timer, 0, 0);
            continue;
        }
        uint64_t until = lp->deadline;
        if (lp->in_guest && lp->preemption_active && lp->preemption_deadline < until)
            until = lp->preemption_deadline;
        hhr_ctx *c = lp->in_guest ? vmcs->guest_ctx : lp->root;
        c->stop_at = c->retired + (until - lp->time);
        c->stop_reason = HHR_STOP_NONE;
        c->watch_interrupt_window = 0;
        c->block_size = 0;
        c->python_stop = 0;
        c->exit_pending = 0;
        c->fast_exits = lp->in_guest;
        v->entry_pending = 0;
        v->inverse_call_pending = 0;
        lp->running = c;
        lp->run_mark = c->retired;
        lp->run_time_base = lp->time;
        uint64_t start = read_register(c, api->reg_rip);
        lp->runs++;
        c->runs++;
        lp->in_run = 1;
        lp->last_error = api->emu_start(c->uc, start, HHR_END_OF_RUN_ADDRESS, 0, 0);
        lp->in_run = 0;
        c->fast_exits = 0;
        uint64_t ran = c->retired - lp->run_mark;
        lp->time += ran;
        lp->retired += ran;
        lp->running = NULL;
        bool plain_stop = lp->last_error == 0 && c->stop_reason == HHR_STOP_NONE && !c->python_stop &&
                          !lp->attention;
        if (lp->in_guest && c->exit_pending) {
            /* A VMCALL: it counted with its block but does not retire (the Python path takes it
             * back the same way), and the guest exits with reason 18. */
            c->retired--;
            lp->time--;
            lp->retired--;
            if (vmcs->inverse_call) {
                /* docs/machine.md 8.3 step 11: not a VM exit. The loop ends here so that Python
                 * publishes `vmcallr-return` before root goes on, as its own path does (subscribers
                 * act on it: the fuzzer reads the pages the call wrote). */
                return_from_inverse_call(lp, vmcs);
                break;
            }
            exit_simply(lp, vmcs, k->exit_reason_vmcall, k->vmcall_length, 0);
            if (plain_stop) continue;
            break;
        }
        if (plain_stop && lp->in_guest && !vmcs->inverse_call) {   /* an exit ends a call: Python's */
            uint64_t rip = read_register(c, api->reg_rip);
            if (lp->debug != NULL && hhr_debug_stops_at(lp->debug, lp, rip)) {
                /* A debugger stops here: Python carries out the exit, after showing it the
                 * instruction (emu/lp.py _notify_trapped), as it does with the loop off. */
                result = HHR_LOOP_CLASSIFY;
                break;
            }
            /* A trapped instruction that exits: a trace sees it as Python's path shows it (emu/lp.py
             * _notify_trapped), before its exit. */
            if (code_is(c, rip, CPUID_BYTES, sizeof CPUID_BYTES)) {
                if (c->trace) hhr_trace_trapped_in_loop(c, lp->time, rip, k->cpuid_length);
                exit_simply(lp, vmcs, k->exit_reason_cpuid, k->cpuid_length, 0);
                continue;
            }
            if ((vmcs->values[k->primary_controls] & k->hlt_exiting_control) &&
                code_is(c, rip, HLT_BYTES, sizeof HLT_BYTES)) {
                if (c->trace) hhr_trace_trapped_in_loop(c, lp->time, rip, k->hlt_length);
                exit_simply(lp, vmcs, k->exit_reason_hlt, k->hlt_length, 0);
                continue;
            }
            uint32_t length;
            uint64_t qualification;
            if (io_exit(lp, vmcs, c, rip, &length, &qualification)) {
                if (c->trace) hhr_trace_trapped_in_loop(c, lp->time, rip, length);
                exit_simply(lp, vmcs, k->exit_reason_io, length, qualification);
                continue;
            }
        }
        if (!lp->in_guest && v->entry_pending) {
            /* The hook took the VMRESUME (it ends its block); Python, had it handled the stop,
             * would have entered too, whatever else asked for its attention in that block. */
            v->entry_pending = 0;
            enter_on_vmresume(lp, vmcs);
            if (plain_stop) continue;
            break;
        }
        if (!lp->in_guest && v->inverse_call_pending) {
            v->inverse_call_pending = 0;
            /* The loop ends here so that Python publishes `vmcallr` before the guest runs, as its own
             * path does (subscribers act on it: a fault injector changes the call's message). */
            enter_inverse_call(lp, vmcs);
            break;
        }
        if (lp->in_guest && c->stop_reason == HHR_STOP_BUDGET && lp->preemption_active &&
            lp->time >= lp->preemption_deadline && !c->python_stop && !lp->attention) {
            /* The timer fired. Within the slice the loop takes the exit itself; at its end, as
             * Python would, it leaves the exit to the LP's next turn, as it leaves the end of an
             * inverse hypercall by its timeout. */
            if (lp->time < lp->deadline && !vmcs->inverse_call) {
                exit_simply(lp, vmcs, k->exit_reason_preemption_timer, 0, 0);
                continue;
            }
            break;
        }
        result = HHR_LOOP_CLASSIFY;
        break;
    }
    v->fast_entries = 0;
    return result;
}
