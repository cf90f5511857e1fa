"""Builds the machine's C code (the hot path emu/fastpath.c, the trace recorder emu/tracepath.c and its line renderer emu/trace_lines.c) as the extension module emu._fastpath with cffi."""
import importlib.util
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
# By path: setuptools' cffi_modules runs this file on its own, where the emu package may not import.
_digest_spec = importlib.util.spec_from_file_location("emu_fastpath_digest", HERE / "fastpath_digest.py")
fastpath_digest = importlib.util.module_from_spec(_digest_spec)
_digest_spec.loader.exec_module(fastpath_digest)
HEADER = (HERE / "fastpath.h").read_text()
TRACE_HEADER = (HERE / "tracepath.h").read_text()
SOURCE = (HERE / "fastpath.c").read_text()
# The recorder and the line renderer share tracepath.h, included once.
TRACE_INCLUDE = '#include "tracepath.h"'
TRACE_SOURCE = "".join((HERE / name).read_text().replace(TRACE_INCLUDE, "") for name in ("tracepath.c", "trace_lines.c"))
# The debugger's instruction hook (tools/gdb), after the hot path whose types it uses.
DEBUG_HEADER = (HERE / "debugpath.h").read_text()
DEBUG_SOURCE = (HERE / "debugpath.c").read_text().replace('#include "debugpath.h"', "")
# The built module carries this marker, so a module built from other sources is known before import.
DIGEST_MARKER = fastpath_digest.marker()

# The block hook asks Python how many instructions a newly seen block holds; the transition loop
# hands its events to Python while a trace follows the LP; the recorder asks Python to name a VMCS
# and tells it when an LP's trace window is over.
CALLBACKS = """
extern "Python" int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);
extern "Python" int hhr_on_loop_events(int python_id);
extern "Python" int hhr_on_trace_vmcs(int python_id, uint32_t lp, uint64_t vmcs);
extern "Python" void hhr_on_trace_lp_done(int python_id, uint32_t lp);
extern "Python" void hhr_on_debug_stop(int python_id, int context_id, uint64_t address);
"""
CALLBACK_DECLARATIONS = (
    "static int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);\n"
    "static int hhr_on_loop_events(int python_id);\n"
    "static int hhr_on_trace_vmcs(int python_id, uint32_t lp, uint64_t vmcs);\n"
    "static void hhr_on_trace_lp_done(int python_id, uint32_t lp);\n"
    "static void hhr_on_debug_stop(int python_id, int context_id, uint64_t address);\n")

ffi = cffi.FFI()
ffi.cdef(HEADER + "\n" + TRACE_HEADER + "\n" + DEBUG_HEADER + "\n" + CALLBACKS)
ffi.set_source(
    "emu._fastpath",
    "#include <stdint.h>\n#include <stdbool.h>\n" + CALLBACK_DECLARATIONS
    + f'__attribute__((used)) static const char hhr_source_digest[] = "{DIGEST_MARKER.decode()}";\n'
    + SOURCE.replace('#include "fastpath.h"', HEADER)
    + TRACE_HEADER + TRACE_SOURCE + DEBUG_HEADER + DEBUG_SOURCE,
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=str(HERE.parent), verbose=False)
