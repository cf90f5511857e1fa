; Exercise 1: enter VMX operation (docs/labs/01-vmxon.md).
; The machine starts this program on LP 0 in 64-bit root mode with paging on and every host-physical
; address mapped to itself (docs/machine.md 4.1, 4.2); RSI points at the lab info block (LAB_INFO_*).
%include "lab.inc"

lab_start:
    mov r15, rsi                      ; the lab info block, for the whole program
    lea rsi, [rip + message_start]
    call print

    HOLE 1, 1

    HOLE 1, 2

    HOLE 1, 3

    lea rsi, [rip + message_in_vmx]
    call print
    mov rax, [r15 + LAB_INFO_VMXON_REGION]
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_done

vmxon_failed:
    lea rsi, [rip + message_vmxon_failed]
    call print
    jmp lab_failed

message_start:
    .asciz "exercise 1: entering VMX operation\n"
message_in_vmx:
    .asciz "VMXON succeeded: in VMX root operation, VMXON region "
message_vmxon_failed:
    .asciz "VMXON failed (VMfailInvalid)\n"
message_end_of_line:
    .asciz "\n"

%include "support.inc"
