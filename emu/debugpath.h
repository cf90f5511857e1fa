/* The debugger's instruction hook (debugpath.c): in every instance only while a gdb client uses
 * breakpoints, single steps or event breaks (tools/gdb); never installed otherwise. */

#define HHR_DEBUG_BREAKPOINTS_MAX 64

/* What stops the machine: an instruction at one of the breakpoint addresses (any instance), the
 * next instruction of the LP whose hhr_lp is `step_loop`, or the next instruction of any LP. */
typedef struct {
    int python_id;                    /* the debugger's number, for hhr_on_debug_stop */
    uint32_t breakpoint_count;
    uint64_t breakpoints[HHR_DEBUG_BREAKPOINTS_MAX];
    void *step_loop;                  /* hhr_lp *, or NULL */
    uint32_t stop_any;
    uint32_t reserved;
} hhr_debug;

/* One per instance the hook is installed in. */
typedef struct {
    hhr_debug *debug;
    hhr_ctx *ctx;
} hhr_debug_context;

void hhr_debug_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data);
