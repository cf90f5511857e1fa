/* Types and entry points of the machine's C hot path (fastpath.c); also read by cffi's cdef. */

#define HHR_MODE_ROOT 0
#define HHR_MODE_GUEST 1

#define HHR_ACCESS_READ 0
#define HHR_ACCESS_WRITE 1
#define HHR_ACCESS_FETCH 2

#define HHR_PERM_READ 1
#define HHR_PERM_WRITE 2
#define HHR_PERM_EXEC 4

#define HHR_FAULT_NONE 0
#define HHR_FAULT_PAGE_FAULT 1
#define HHR_FAULT_EPT_VIOLATION 2
#define HHR_FAULT_EPT_MISCONFIG 3
#define HHR_FAULT_NONEXISTENT_MEMORY 4

/* The non-canonical address a run is told to end at; it is never reached (see context.py). */
#define HHR_END_OF_RUN_ADDRESS 0x8000000000000000

#define HHR_STOP_NONE 0
#define HHR_STOP_BUDGET 1
#define HHR_STOP_FAULT 2
#define HHR_STOP_NEW_TRAPS 3
#define HHR_STOP_INTERRUPT_WINDOW 4
#define HHR_STOP_NONCANONICAL 5

typedef struct {
    uint64_t paddr;
    uint32_t perms;
} hhr_tlb_entry;

/* Unicorn's C entry points and the constants this file needs, handed over by Python. */
typedef struct {
    int (*emu_stop)(void *uc);
    int (*reg_read)(void *uc, int regid, void *value);
    int (*reg_write)(void *uc, int regid, const void *value);
    int (*emu_start)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
    int reg_cr0, reg_cr3, reg_cr4, reg_rflags, reg_msr, reg_rip;
    int reg_rsp, reg_fs_base, reg_gs_base, reg_gdtr, reg_idtr;
    int gpr[16];                 /* Unicorn ids of RAX..R15 in ModRM register-number order */
    uint32_t msr_efer;
    int mem_read, mem_write, mem_fetch;
} hhr_api;

typedef struct {
    uint64_t cr0, cr3, cr4, efer;
} hhr_paging;

/* Unicorn's uc_x86_mmr: GDTR, IDTR, LDTR and TR as its register API reads and writes them. */
typedef struct {
    uint16_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
} hhr_descriptor_table;

typedef struct {
    uint32_t kind;
    uint32_t access;
    uint64_t linear;
    uint64_t guest_physical;
    uint32_t page_fault_error_code;
    uint32_t in_paging_structure;
    uint64_t ept_qualification;
} hhr_fault;

typedef struct {
    uint64_t pc;
    uint32_t size;
    uint32_t icount;
    uint32_t uses;                    /* HHR_USES_* classes of shared state its instructions touch */
    uint32_t reserved;
} hhr_icount_entry;

/*
 * State real hardware shares between VMX root and non-root operation: VM entries and exits do not
 * switch it (SDM Vol. 3C 27.3, 28.3), so root code sees the guest's values after a VM exit and the
 * guest sees root's after a VM entry (docs/machine.md 7.4). Every Unicorn instance keeps its own
 * copy; per LP one instance holds the current values of each class, and an instance that is about
 * to run a block touching a class first takes the values from that holder (hhr_shared_acquire).
 */
#define HHR_SHARED_X87_SSE 0          /* what FXSAVE stores: x87, MXCSR, XMM0-XMM15 */
#define HHR_SHARED_SCALARS 1          /* CR2, DR0-DR3, DR6 and the MSRs VMX does not switch */
#define HHR_SHARED_CLASSES 2
#define HHR_USES_X87_SSE 1            /* 1 << HHR_SHARED_X87_SSE */
#define HHR_USES_SCALARS 2            /* 1 << HHR_SHARED_SCALARS */
#define HHR_USES_ALL 3
#define HHR_BLOCK_USES_SHIFT 24       /* hhr_on_new_block's answer: count | uses << this */
#define HHR_BLOCK_COUNT_MASK 16777215 /* (1 << HHR_BLOCK_USES_SHIFT) - 1 */
#define HHR_SHARED_VALUE_BYTES 16     /* the widest register copied: an XMM register */

/* One register of a shared class: a Unicorn register id, or UC_X86_REG_MSR with the MSR's index. */
typedef struct {
    int regid;
    uint32_t msr;
} hhr_shared_register;

/* One LP's shared state: which instance holds the current values of each class. */
typedef struct {
    void *holder[HHR_SHARED_CLASSES];          /* hhr_ctx * */
    uint64_t generation[HHR_SHARED_CLASSES];   /* bumped at every change of holder: only the holder
                                                  has the current values, others had them earlier */
    void *root;                                /* hhr_ctx * of the LP's root instance */
    const hhr_shared_register *registers[HHR_SHARED_CLASSES];
    uint32_t register_count[HHR_SHARED_CLASSES];
    uint64_t copies[HHR_SHARED_CLASSES];       /* statistics: copies between instances */
} hhr_shared;

/* One per Unicorn instance (a logical processor in root mode, or one VMCS's guest). */
typedef struct {
    const hhr_api *api;
    void *uc;
    uint8_t *ram;
    uint64_t ram_size;
    uint32_t maxphyaddr;
    uint32_t mode;
    uint64_t eptp;
    int python_id;
    uint64_t retired;
    uint64_t stop_at;
    uint32_t stop_reason;
    uint32_t watch_interrupt_window;
    uint64_t block_pc;
    uint32_t block_size;
    uint32_t block_icount;
    hhr_icount_entry *icount_cache;
    uint32_t icount_cache_mask;
    hhr_fault fault;
    uint64_t blocks;
    uint64_t tlb_fills;
    uint64_t icount_misses;
    uint64_t noncanonical_fills;
    uint32_t python_stop;             /* a Python hook ended the run (its stop must be classified) */
    uint32_t fast_exits;              /* the transition loop runs this guest: VMCALL may exit in C */
    uint32_t exit_pending;            /* the exit reason the guest's invalid-instruction hook found */
    uint32_t reserved;
    /* Fuzzing only (tools/fuzz, emu/dirty.py): all NULL otherwise, and then each costs one test. */
    uint8_t *dirty_pages;             /* one byte per 4 KiB host page written since the mark */
    uint64_t dirty_page_count;        /* pages dirty_pages and code_pages cover */
    uint8_t *code_pages;              /* one byte per 4 KiB host page code was fetched from */
    uint8_t *edge_map;                /* HHR_EDGE_MAP_SIZE counters of (block, next block) edges */
    uint64_t edge_low, edge_high;     /* only blocks in [low, high) count: one image's code */
    uint64_t edge_previous;           /* the last counted block's hash, shifted (AFL style) */
    uint8_t *block_map;               /* one byte per byte of [low, high): a block starts there */
    /* Shared state (hhr_shared): the LP this instance runs on, and the generation of each class
     * its own copy holds (0: none). */
    hhr_shared *shared;
    uint64_t held[HHR_SHARED_CLASSES];
    uint32_t holds;                   /* HHR_USES_* of the classes this instance is the holder of */
    uint32_t reserved2;
    /* Tracing only (emu/tracepath.c): this instance's hhr_trace_context, NULL otherwise. */
    void *trace;
    /* Runs begun on it (uc_emu_start calls, by the transition loop or emu/context.py): between two
     * runs anything may write its registers, within one only its instructions do (a trace reads
     * them all at a run's first instruction). */
    uint64_t runs;
} hhr_ctx;

#define HHR_EDGE_MAP_SIZE 65536

/* VMCS field facts the VMREAD/VMWRITE fast path needs, indexed by encoding (emu/vmcs_fields.py). */
#define HHR_VMCS_ENCODING_LIMIT 0x8000
#define HHR_FIELD_SUPPORTED 1
#define HHR_FIELD_READ_ONLY 2
#define HHR_FIELD_WIDTH_64 4
#define HHR_FIELD_LIVE_REGISTER 8     /* lives in the guest instance as a scalar register */
#define HHR_FIELD_PYTHON_ONLY 16      /* lives in the guest instance in a form only Python moves */
#define HHR_FIELD_KEEPS_VERIFICATION 32  /* no entry check reads it (GUEST_RIP: only canonical form) */

typedef struct {
    uint64_t mask;
    int32_t slot;
    int32_t live_register;
    uint32_t flags;
    uint32_t live_bit;                /* this field's bit in hhr_vmcs.live_written, or 0 */
} hhr_field;

/* An active VMCS as the fast path sees it: the cached field slots and the bound guest instance.
 * The flags are the machine's one copy of that state; emu/vmcs.py reads and writes them. */
typedef struct {
    uint64_t *values;
    void *guest_uc;
    hhr_ctx *guest_ctx;
    uint64_t address;
    uint32_t launched;
    uint32_t entry_verified;          /* the last VM-entry check passed (see checked_field_written) */
    uint32_t inverse_call;            /* an inverse hypercall (VMCALLR) is in progress */
    uint32_t halted;                  /* the guest is in the HLT activity state */
    uint32_t checked_field_written;   /* software wrote a field an entry check reads */
    uint32_t live_written;            /* live fields VMWRITE changed: the slot holds the value the
                                         next VM entry checks and loads into the guest instance */
    /* With inverse_call: the guest RIP, RSP and RFLAGS the inverse hypercall interrupted, restored
     * when it ends (docs/machine.md 8.3, steps 7, 11, 12). */
    uint64_t inverse_saved_rip, inverse_saved_rsp, inverse_saved_rflags;
} hhr_vmcs;

/* Slot numbers of the VMCS fields and the architectural values the transition loop uses, filled
 * from emu/vmcs_fields.py and emu/vmx_defs.py so that no encoding is written twice. */
typedef struct {
    int32_t exit_reason, exit_qualification, exit_instruction_length, exit_interruption_info;
    int32_t exit_interruption_error, idt_vectoring_info, idt_vectoring_error, activity_state;
    int32_t entry_interruption_info, guest_rip, ept_pointer, pin_controls, primary_controls;
    int32_t exit_controls, host_cr0, host_cr3, host_cr4, host_fs_base, host_gs_base;
    int32_t host_gdtr_base, host_idtr_base, host_efer, host_rsp, host_rip, entry_msr_load_count;
    int32_t io_bitmap_a, io_bitmap_b, exit_msr_store_count, exit_msr_load_count;
    uint64_t interruption_info_valid, preemption_timer_control, interrupt_window_control;
    uint64_t load_efer_control, rflags_after_exit, descriptor_limit_after_exit, hlt_exiting_control;
    uint64_t unconditional_io_control, io_bitmaps_control, io_direction_in, io_immediate, io_port_shift;
    uint32_t exit_reason_io, io_bitmap_ports;
    int32_t preemption_timer_value;
    uint32_t exit_reason_preemption_timer, preemption_timer_rate;
    uint64_t save_preemption_timer_control;
    uint32_t exit_reason_cpuid, cpuid_length, exit_reason_vmcall, vmcall_length;
    uint32_t exit_reason_hlt, hlt_length, vmresume_length, activity_active, guest_rip_live_bit;
    uint32_t activity_hlt;
    /* VMCALLR and its return (docs/machine.md 8.3). */
    int32_t inverse_entry, inverse_stack, guest_rsp, guest_rflags;
    uint32_t guest_rsp_live_bit, guest_rflags_live_bit, vmcallr_length, reserved;
    uint64_t rflags_during_inverse_call;
} hhr_transition_constants;

/* One LP's VMX state for the fast path; Python keeps it in step with emu/vmx.py's VmxUnit. */
typedef struct {
    hhr_ctx *root;
    const hhr_field *fields;
    hhr_vmcs *current;
    uint32_t vmx_on;
    uint32_t fast_entries;            /* the transition loop runs: VMRESUME may be taken in C */
    const hhr_transition_constants *constants;
    uint32_t entry_pending;           /* the hook found a VMRESUME the loop carries out */
    uint32_t inverse_call_pending;    /* the hook found a VMCALLR the loop carries out */
} hhr_vmx;

#define HHR_EVENT_VM_EXIT 1
#define HHR_EVENT_VM_ENTRY 2
#define HHR_EVENT_INVERSE_CALL 3      /* qualification: the call number (RAX) */
#define HHR_EVENT_INVERSE_RETURN 4    /* qualification: the result (RAX); the call succeeded */
#define HHR_EVENT_CONSOLE_OUT 5       /* root's OUT to the console port during a run of the loop (not a
                                         transition): reason = the port, qualification = the value,
                                         rip = the access size */
#define HHR_EVENTS_MAX 64
#define HHR_LOOP_NOTHING_RAN 0        /* deadline reached or Python's attention asked for */
#define HHR_LOOP_CLASSIFY 1           /* the last run ended in a way only Python handles */

typedef struct {
    uint32_t kind;
    uint32_t reason;
    uint64_t qualification;
    uint64_t time;
    uint64_t vmcs;
    uint64_t rip;
} hhr_transition_event;

/* The transition loop of one LP: runs root and guest, carrying out the common VM exits and
 * entries itself, until something needs Python. */
typedef struct {
    hhr_ctx *root;
    hhr_vmx *vmx;
    const int *handover;              /* general registers VM transitions hand over */
    hhr_shared *shared;               /* the LP's shared state (x87/SSE, CR2, DRs, MSRs) */
    int handover_count;
    uint32_t in_guest;
    uint64_t time;                    /* the LP's virtual time */
    uint64_t deadline;
    uint64_t preemption_deadline;     /* with preemption_active: when the guest's timer fires */
    uint32_t preemption_active;
    uint32_t reserved2;
    uint64_t retired;                 /* instructions retired during this call */
    uint32_t attention;               /* Python wants the loop to end after the current run */
    int last_error;                   /* uc_emu_start's result for the run to classify */
    hhr_ctx *running;
    uint64_t run_mark;                /* running->retired when the current run began */
    uint64_t run_time_base;           /* time when the current run began */
    uint32_t event_count;
    uint32_t runs;                    /* runs this call made; 0: Python must take this turn itself */
    uint32_t publish_each;            /* a trace follows the LP: before each run the loop hands the events
                                         it queued to Python (hhr_on_loop_events), which publishes them
                                         where they happen, and goes on unless Python says it must end */
    int python_id;                    /* the LP, for hhr_on_loop_events */
    hhr_transition_event events[HHR_EVENTS_MAX];
    /* Debugging only (emu/debugpath.c, tools/gdb): the debugger's hhr_debug, NULL otherwise. The loop
     * leaves to Python a guest's exit at an instruction the debugger wants to stop at. */
    void *debug;
    uint32_t in_run;                  /* 1 while a run the loop started is under way (root's console
                                         OUTs are queued then: hhr_port_out_hook) */
} hhr_lp;

/* The OUT hook of an LP's root instance: an OUT to `console_port` made in a run of the loop is queued
 * as an HHR_EVENT_CONSOLE_OUT with the LP's time (Python publishes it, in order, and hands the byte to
 * the console: emu/lp.py), unless a trace follows the LP or the queue lacks room; every other access
 * goes to `forward`, the machine's own handler (a cffi callback of emu/fast.py). */
typedef struct {
    hhr_lp *lp;                       /* NULL until the LP is made: every access is forwarded */
    hhr_ctx *ctx;                     /* the root instance */
    uint32_t console_port;
    void (*forward)(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
} hhr_port_out;

void hhr_port_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data);

int hhr_run_transitions(hhr_lp *lp);
/* Whether the debugger (an hhr_debug) stops LP `loop` (an hhr_lp) at `address` (emu/debugpath.c). */
bool hhr_debug_stops_at(const void *debug, const void *loop, uint64_t address);
/* An instruction the loop carries out itself, for the trace recorder (emu/tracepath.c). */
void hhr_trace_trapped_in_loop(hhr_ctx *c, uint64_t time, uint64_t address, uint32_t size);

bool hhr_invalid_instruction(void *uc, void *user_data);
bool hhr_guest_invalid_instruction(void *uc, void *user_data);

int hhr_ept_translate(hhr_ctx *c, uint64_t guest_physical, uint32_t access,
                      uint64_t *host_physical, uint32_t *permissions, hhr_fault *fault);
int hhr_translate(hhr_ctx *c, uint64_t linear, uint32_t access, const hhr_paging *paging,
                  uint64_t *physical_out, uint32_t *permissions, hhr_fault *fault);
void hhr_read_paging(hhr_ctx *c, hhr_paging *paging);
int hhr_translate_current(hhr_ctx *c, uint64_t linear, uint32_t access, uint64_t *physical,
                          hhr_fault *fault);
bool hhr_tlb_fill(void *uc, uint64_t address, int type, hhr_tlb_entry *result, void *user_data);
void hhr_block_hook(void *uc, uint64_t pc, uint32_t size, void *user_data);
void hhr_forget_blocks(hhr_ctx *c);
uint64_t hhr_edge_map_merge(const uint8_t *map, uint8_t *seen, uint64_t size);
uint64_t hhr_dirty_collect(uint8_t *dirty, uint64_t count, uint32_t *pages);
void hhr_copy_registers(const hhr_api *api, void *from_uc, void *to_uc, const int *regids, int count);
void hhr_shared_acquire(hhr_ctx *c, uint32_t uses);
void hhr_shared_attach(hhr_ctx *c, hhr_shared *shared);
void hhr_shared_detach(hhr_ctx *c);
