/*
 * UC_HOOK_CODE of the debugger (tools/gdb): runs before every instruction of an instance it is
 * installed in, and asks Python to stop the machine there only at a breakpoint address or at the
 * next instruction of a stepped LP. The machine itself is not told: it is paused inside the hook,
 * so its run goes on exactly as it would have (docs/gdb.md).
 */
#include "debugpath.h"

static bool at_breakpoint(const hhr_debug *g, uint64_t address) {
    for (uint32_t i = 0; i < g->breakpoint_count; i++)
        if (g->breakpoints[i] == address) return true;
    return false;
}

void hhr_debug_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    hhr_debug_context *d = (hhr_debug_context *)user_data;
    hhr_debug *g = d->debug;
    (void)uc;
    (void)size;
    bool hit = g->stop_any != 0;
    if (!hit && g->step_loop != NULL) hit = ((hhr_lp *)g->step_loop)->running == d->ctx;
    if (hit || at_breakpoint(g, address)) hhr_on_debug_stop(g->python_id, d->ctx->python_id, address);
}

/* The transition loop's question before it carries out a guest's trapped instruction itself
 * (emu/fastpath.c): a stop there needs Python's path, which shows the instruction to the debugger. */
bool hhr_debug_stops_at(const void *debug, const void *loop, uint64_t address) {
    const hhr_debug *g = (const hhr_debug *)debug;
    return g->stop_any != 0 || g->step_loop == loop || at_breakpoint(g, address);
}
