/* Types and entry points of the machine's instruction recorder (tracepath.c); also read by cffi's cdef.
 * The trace file these records make is described in docs/tracing.md, "The trace file". */

#define HHR_TRACE_REGISTERS 21        /* tools/trace/registers.py TRACED_REGISTERS, in that order */
#define HHR_TRACE_RIP_INDEX 16        /* RIP's place among them */
#define HHR_TRACE_CR3_INDEX 19        /* CR3's place among them */
#define HHR_TRACE_MAX_LPS 64          /* emu/machine.py MAX_LPS */
#define HHR_TRACE_CODE_BYTES 15       /* the longest x86 instruction (SDM Vol. 2A 2.3.11) */
#define HHR_TRACE_CODE_SLOTS 65536    /* remembered (context, address): code bytes last written */
#define HHR_TRACE_NAME_SLOTS 4096     /* VMCSs whose name the file holds since the last forget */
#define HHR_TRACE_BUFFER_BYTES 8388608
#define HHR_TRACE_SCRATCH_BYTES 1048576   /* memory one instruction writes or reads, at most */
#define HHR_TRACE_WIDE_WRITES 64          /* writes wider than Unicorn reports, per instruction */
#define HHR_TRACE_DEFERRED_BYTES 65536    /* data records held behind the instruction in progress */
#define HHR_TRACE_LP_NONE 255

/* Record kinds: the first byte of every record. */
#define HHR_RECORD_INSTRUCTION 1
#define HHR_RECORD_CODE 2
#define HHR_RECORD_LOAD 3
#define HHR_RECORD_DATA 4
#define HHR_RECORD_BIND 5

/* HHR_RECORD_LOAD flags. */
#define HHR_LOAD_INITIAL 1            /* the context's first record: every register, none changed */

/* HHR_RECORD_INSTRUCTION flags. */
#define HHR_INSN_TIME_NEXT 1          /* time: the LP's previous instruction's + 1 (no time field) */
#define HHR_INSN_RIP_NEXT 2           /* address: the LP's previous instruction's + its size */
#define HHR_INSN_RIP_ADVANCED 4       /* RIP after: address + size (not among the values) */
#define HHR_INSN_WRITES 8
#define HHR_INSN_READS 16

/* Answers of hhr_on_trace_vmcs. */
#define HHR_VMCS_ENDS_WINDOW 1        /* the first instruction of this VMCS's guest ends its LP's window */

/* One LP as the recorder sees it. */
typedef struct {
    void *loop;                       /* its hhr_lp: shared state, VMX unit, clock of the run under way */
    uint32_t phase;                   /* the phase index its instructions are stamped with */
    uint32_t done;                    /* its window is over: nothing more of it is recorded */
    uint64_t last_time;               /* of its last instruction written, for HHR_INSN_TIME_NEXT */
    uint64_t next_rip;                /* after its last instruction written, for HHR_INSN_RIP_NEXT */
    uint32_t written;                 /* it has an instruction in the file */
    uint32_t end_after_this;          /* the pending instruction is its window's last */
} hhr_trace_lp;

struct hhr_trace;

/* One Unicorn instance as the recorder sees it (the user data of its hooks). */
typedef struct {
    struct hhr_trace *trace;
    void *ctx;                        /* hhr_ctx * */
    uint32_t id;                      /* its number in the file */
    uint32_t seen;                    /* registers[] hold its values after its last instruction */
    uint64_t registers[HHR_TRACE_REGISTERS];
    uint64_t blocks_mark;             /* ctx->blocks at its last instruction */
    uint64_t block_base;              /* the time of that block's first instruction */
    uint64_t block_index;
    void *lp_shared;                  /* the LP it ran on last (its hhr_shared), and that LP's number */
    uint32_t lp_index;
    uint32_t reserved;
    uint64_t code_page, code_cr3, code_eptp, code_host;   /* the last code page translated */
    uint32_t code_valid;
    uint32_t reserved2;
    uint64_t vmcs;                    /* the VMCS its guest instructions belong to, as last written */
} hhr_trace_context;

typedef struct {
    uint64_t vmcs;
    uint32_t flags;                   /* HHR_VMCS_* */
    uint32_t used;
} hhr_trace_name;

typedef struct {
    uint64_t address;
    uint32_t context;
    uint32_t length;
    uint8_t bytes[HHR_TRACE_CODE_BYTES];
    uint8_t used;
} hhr_trace_code;

typedef struct hhr_trace {
    int python_id;
    int fd;                           /* the trace file, written with write(2) */
    int error;                        /* errno of the first failed write, or 0 */
    uint32_t recording;               /* instructions are recorded (Python opens and closes the window) */
    uint32_t record_reads;
    uint32_t has_time_window;         /* only instructions whose time is in [window_start, window_end) */
    uint64_t window_start, window_end;
    uint32_t lp_count;
    uint32_t per_lp_end;              /* an LP's window ends at its first guest instruction of a VMCS
                                         named HHR_VMCS_ENDS_WINDOW */
    const int *register_ids;          /* Unicorn ids of the traced registers */
    int (*reg_read_batch)(void *uc, const int *regids, void **values, int count);
    uint64_t recorded;                /* instructions written */
    uint64_t bytes_written;
    hhr_trace_lp lps[HHR_TRACE_MAX_LPS];
    /* The instruction in progress: written when the next one begins, or by hhr_trace_finish. */
    hhr_trace_context *pending;
    uint32_t pending_lp, pending_size;
    uint8_t *deferred;                /* HHR_TRACE_DEFERRED_BYTES: data records published meanwhile */
    uint64_t deferred_used;
    uint64_t pending_time, pending_rip;
    uint64_t pending_before[HHR_TRACE_REGISTERS];
    uint8_t *writes;                  /* HHR_TRACE_SCRATCH_BYTES: (u64 address, u32 length, bytes)... */
    uint64_t writes_used;
    uint32_t write_count, writes_lost;
    uint8_t *reads;
    uint64_t reads_used;
    uint32_t read_count, reads_lost;
    uint64_t wide_offsets[HHR_TRACE_WIDE_WRITES];   /* writes whose bytes are read back at the end */
    uint32_t wide_count;
    uint32_t reserved;
    hhr_trace_code *code;             /* HHR_TRACE_CODE_SLOTS */
    hhr_trace_name names[HHR_TRACE_NAME_SLOTS];
    uint8_t *buffer;                  /* HHR_TRACE_BUFFER_BYTES */
    uint64_t buffer_used;
} hhr_trace;

int hhr_trace_open(hhr_trace *t, int fd);
void hhr_trace_close(hhr_trace *t);
void hhr_trace_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data);
void hhr_trace_write_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data);
void hhr_trace_read_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data);
void hhr_trace_trapped(hhr_trace_context *tc, uint32_t lp, uint64_t time, uint64_t address, uint32_t size);
void hhr_trace_finish(hhr_trace *t);
void hhr_trace_data(hhr_trace *t, const uint8_t *data, uint32_t length, int after_instruction);
void hhr_trace_forget_names(hhr_trace *t);
int hhr_trace_flush(hhr_trace *t);
