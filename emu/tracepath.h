/* Types and entry points of the machine's instruction recorder (tracepath.c); also read by cffi's cdef.
 * The trace file these records make is described in docs/tracing.md, "The trace file". */

#define HHR_TRACE_REGISTERS 21        /* tools/trace/registers.py TRACED_REGISTERS, in that order */
#define HHR_TRACE_RIP_INDEX 16        /* RIP's place among them */
#define HHR_TRACE_RFLAGS_INDEX 17
#define HHR_TRACE_CR3_INDEX 19        /* CR3's place among them */
#define HHR_TRACE_MAX_LPS 64          /* emu/machine.py MAX_LPS */
#define HHR_TRACE_CODE_BYTES 15       /* the longest x86 instruction (SDM Vol. 2A 2.3.11) */
#define HHR_TRACE_CODE_WORDS 2        /* those bytes zero-padded to whole words, compared as words */
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

/* Capstone's C entry points (the binding's own library) and what the recorder asks of them: which
 * traced registers an instruction may write, so that only those are read after it (RFLAGS only when
 * it may affect a flag). */
#define HHR_DECODER_REGISTER_LIMIT 512    /* capstone x86 register ids below this */
#define HHR_DECODER_INSTRUCTION_LIMIT 2048  /* capstone x86 instruction ids below this */
#define HHR_DECODER_GROUPS 8
#define HHR_WRITES_ACROSS_BLOCKS 0x80000000u  /* hhr_trace_code.writes: the mask holds at the next
                                                 block's start too (decoder.py _BLOCK_END_WRITES) */
typedef struct {
    size_t handle;                    /* a csh opened for x86-64 with details on */
    size_t (*disasm)(size_t handle, const uint8_t *code, size_t size, uint64_t address, size_t count,
                     void **instructions);
    void (*free)(void *instructions, size_t count);
    int (*regs_access)(size_t handle, const void *instruction, uint16_t *read, uint8_t *read_count,
                       uint16_t *written, uint8_t *written_count);
    bool (*in_group)(size_t handle, const void *instruction, unsigned int group);
    uint32_t register_bits[HHR_DECODER_REGISTER_LIMIT];   /* capstone register: traced registers' bits */
    uint8_t read_all[HHR_DECODER_INSTRUCTION_LIMIT];      /* instruction ids whose effects are read whole */
    uint8_t flags_kept[HHR_DECODER_INSTRUCTION_LIMIT];    /* instruction ids that affect no flag */
    uint32_t block_end_writes[HHR_DECODER_INSTRUCTION_LIMIT];  /* instructions that end their block
                                        (branches, REP string iterations): the traced registers they
                                        write, by the SDM (0: not one of them) */
    uint32_t groups[HHR_DECODER_GROUPS];                  /* groups whose effects are read whole */
    uint32_t group_count;
} hhr_decoder;

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
    uint32_t seen;                    /* registers[] hold its values after its last instruction (and
                                         so before its pending one) */
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
    uint64_t words[HHR_TRACE_CODE_WORDS];   /* its bytes (`length` of them), zero-padded */
    uint32_t used;
    uint32_t writes;                  /* traced registers the instruction may write (all: not known) */
} hhr_trace_code;

typedef struct hhr_trace {
    int python_id;
    int fd;                           /* the trace file, written with write(2) by the writer thread */
    int error;                        /* errno of the first failed write, or 0 */
    uint32_t recording;               /* instructions are recorded (Python opens and closes the window) */
    uint32_t record_reads;
    uint32_t has_time_window;         /* only instructions whose time is in [window_start, window_end) */
    uint64_t window_start, window_end;
    uint32_t lp_count;
    uint32_t per_lp_end;              /* an LP's window ends at its first guest instruction of a VMCS
                                         named HHR_VMCS_ENDS_WINDOW */
    const int *register_ids;          /* Unicorn ids of the traced registers */
    const hhr_decoder *decoder;       /* NULL, or what lets an instruction's registers be read in part */
    uint32_t read_all_registers;      /* read every traced register after every instruction (a check) */
    uint32_t pending_writes;          /* the pending instruction's hhr_trace_code.writes */
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
    uint64_t pending_run;             /* its instance's hhr_ctx.runs when it began */
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
    uint8_t *buffer;                  /* HHR_TRACE_BUFFER_BYTES: the one being filled */
    uint64_t buffer_used;
    void *writer;                     /* the thread that writes full buffers to the file (tracepath.c) */
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

/* --- Rendering (trace_lines.c): text and JSON Lines instruction lines straight from the file. ---- */
#define HHR_RENDER_END 0              /* the file is done */
#define HHR_RENDER_RECORD 1           /* a record other than an instruction at `offset`: Python's */
#define HHR_RENDER_SITE 2             /* an instruction whose site Python has not described (miss_*) */
#define HHR_RENDER_OUTPUT_FULL 3      /* write out `out` (and grow it to `needed` if that is larger) */
#define HHR_RENDER_COUNTS_FULL 4      /* take the counts and clear them */
#define HHR_RENDER_DAMAGED 5          /* a record runs past the end of the file */
#define HHR_RENDER_MAX_LPS 256
#define HHR_RENDER_MAX_PHASES 256

/* What is the same every time an instruction runs in a context. */
typedef struct {
    uint64_t address;
    uint32_t context;
    uint32_t used;
    const char *fixed;                /* text: the padded columns; JSON: the fields after the phase */
    uint32_t fixed_length;
    uint32_t fixed_trimmed_length;    /* text: without trailing blanks (a line with no effects) */
    const char *context_json;         /* JSON: the context's name as a JSON string */
    uint32_t context_json_length;
    uint32_t exact_length;            /* the instruction's decoded length */
    uint32_t taken;                   /* the context and symbol filters take it */
    uint32_t number;                  /* its number for the counts */
} hhr_render_site;

typedef struct {
    const uint8_t *file;
    uint64_t size;
    uint64_t offset;                  /* the next record */
    uint32_t json;                    /* 0: text, 1: JSON Lines */
    uint32_t wants_instructions;
    uint8_t lp_taken[HHR_RENDER_MAX_LPS];
    uint8_t phase_taken[HHR_RENDER_MAX_PHASES];
    uint32_t has_range;
    uint32_t reserved;
    uint64_t range_start, range_end;
    uint64_t lp_time[HHR_RENDER_MAX_LPS];      /* the file's per-LP state (HHR_INSN_TIME_NEXT, RIP_NEXT) */
    uint64_t lp_next_rip[HHR_RENDER_MAX_LPS];
    hhr_render_site *sites;
    uint32_t site_mask;               /* slots - 1 (a power of two) */
    uint32_t site_count;
    const char *phase_json[HHR_RENDER_MAX_PHASES];
    uint32_t phase_json_length[HHR_RENDER_MAX_PHASES];
    const char *register_names[HHR_TRACE_REGISTERS];
    char *out;
    uint64_t out_capacity, out_used, needed;
    uint64_t *count_keys;             /* (site << 16 | phase << 8 | LP) + 1, 0 for a free slot */
    uint64_t *count_values;
    uint32_t count_mask, count_used;
    uint64_t first_time, last_time;
    uint32_t have_time;
    uint32_t miss_context, miss_lp, miss_size;
    uint64_t miss_address;
    uint64_t instructions;            /* instruction records read */
} hhr_render;

int hhr_render_lines(hhr_render *r);
void hhr_render_forget_site(hhr_render *r, uint32_t context, uint64_t address);
void hhr_render_forget_sites(hhr_render *r);
int hhr_render_add_site(hhr_render *r, const hhr_render_site *site);
