/*
 * UC_HOOK_CODE of the debugger (tools/gdb): runs before every instruction of an instance it is
 * installed in, and asks Python to stop the machine there only at a breakpoint address or at the
 * next instruction of a stepped LP. The machine itself is not told: it is paused inside the hook,
 * so its run goes on exactly as it would have (docs/gdb.md).
 */
#include "debugpath.h"

void hhr_debug_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    hhr_debug_context *d = (hhr_debug_context *)user_data;
    hhr_debug *g = d->debug;
    (void)uc;
    (void)size;
    bool hit = g->stop_any != 0;
    if (!hit && g->step_loop != NULL) hit = ((hhr_lp *)g->step_loop)->running == d->ctx;
    for (uint32_t i = 0; !hit && i < g->breakpoint_count; i++) hit = g->breakpoints[i] == address;
    if (hit) hhr_on_debug_stop(g->python_id, d->ctx->python_id, address);
}
