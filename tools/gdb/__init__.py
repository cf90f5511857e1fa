"""A GDB remote stub for the machine: threads are LPs, registers and memory are those of the context each LP runs (docs/gdb.md)."""
