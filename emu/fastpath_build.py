"""Builds the machine's C hot path (emu/fastpath.c) as the extension module emu._fastpath with cffi."""
import hashlib
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
HEADER = (HERE / "fastpath.h").read_text()
SOURCE = (HERE / "fastpath.c").read_text()
# The built module carries this marker, so a module built from other sources is known before import.
DIGEST_MARKER_PREFIX = b"hhr-fastpath-source-"
SOURCE_DIGEST = hashlib.sha256((HEADER + SOURCE).encode()).hexdigest()[:32]
DIGEST_MARKER = DIGEST_MARKER_PREFIX + SOURCE_DIGEST.encode()

# The block hook asks Python how many instructions a newly seen block holds.
CALLBACKS = 'extern "Python" int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);'

ffi = cffi.FFI()
ffi.cdef(HEADER + "\n" + CALLBACKS)
ffi.set_source(
    "emu._fastpath",
    "#include <stdint.h>\n#include <stdbool.h>\n"
    "static int hhr_on_new_block(int python_id, uint64_t pc, uint32_t size);\n"
    f'__attribute__((used)) static const char hhr_source_digest[] = "{DIGEST_MARKER.decode()}";\n'
    + SOURCE.replace('#include "fastpath.h"', HEADER),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=str(HERE.parent), verbose=False)
