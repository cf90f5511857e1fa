"""Instruction-level tracing of a hot restart: every instruction on every LP, interleaved with the machine's events (docs/tracing.md)."""
