"""Encodings of the instructions our machine adds to x86-64 (not known to keystone or capstone)."""

# VMCALLR, the inverse hypercall: the root hypervisor calls into its guest (docs/machine.md, "VMCALLR").
# It uses the reserved two-byte opcode 0F 0A, which is #UD on Intel hardware (SDM Vol. 2D Table A-3,
# opcode map row 0F 0x: entry 0A is blank), so it cannot collide with a real instruction.
VMCALLR_OPCODE = b"\x0f\x0a"
VMCALLR_MNEMONIC = "vmcallr"
