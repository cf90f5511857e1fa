; heartbeat: reads the clock in a tight loop for HEARTBEATS reads and reports the largest gap it
; ever saw between two reads, in ticks. Under a hot restart that gap is the blackout as the guest
; saw it. Exit code 0.
%define CLOCK_LOW 0x500
%define CLOCK_HIGH 0x504
%define HEARTBEATS 20000

start:
    call read_clock
    mov r12, rax                  ; previous reading
    xor r13, r13                  ; largest gap
    mov r14, HEARTBEATS
beat:
    call read_clock
    mov rbx, rax
    sub rbx, r12
    cmp rbx, r13
    jbe not_larger
    mov r13, rbx
not_larger:
    mov r12, rax
    dec r14
    jnz beat
    lea rsi, [rip + label_text]
    call print
    mov rax, r13
    call print_decimal
    call print_newline
    xor eax, eax
    jmp exit_guest

read_clock:                       ; rax = virtual time (the low read latches the high half)
    mov dx, CLOCK_LOW
    in eax, dx
    mov ecx, eax
    mov dx, CLOCK_HIGH
    in eax, dx
    shl rax, 32
    or rax, rcx
    ret

%include "console.inc"

label_text:
    .asciz "largest heartbeat gap (ticks): "
