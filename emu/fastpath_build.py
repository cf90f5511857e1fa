"""Builds the machine's C hot path (emu/fastpath.c) as the extension module emu._fastpath with cffi."""
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
HEADER = (HERE / "fastpath.h").read_text()
SOURCE = (HERE / "fastpath.c").read_text()

# The block hook asks Python how many instructions a newly seen block holds.
CALLBACKS = 'extern "Python" int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);'

ffi = cffi.FFI()
ffi.cdef(HEADER + "\n" + CALLBACKS)
ffi.set_source(
    "emu._fastpath",
    "#include <stdint.h>\n#include <stdbool.h>\n"
    "static int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);\n"
    + SOURCE.replace('#include "fastpath.h"', HEADER),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=str(HERE.parent), verbose=False)
