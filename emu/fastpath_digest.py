"""The digest of the C hot path's sources, which the built module carries so that a stale build is known before import."""
from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("fastpath.h", "fastpath.c", "tracepath.h", "tracepath.c", "trace_lines.c")
MARKER_PREFIX = b"hhr-fastpath-source-"
DIGEST_HEX_DIGITS = 32


def marker() -> bytes:
    """The bytes a module built from today's C sources carries."""
    text = "".join((HERE / name).read_text() for name in SOURCES)
    return MARKER_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX_DIGITS].encode()
