; counter: a long, steady computation for restarts to happen during: the sum of i * i for i below
; ITERATIONS, modulo 2^64, in a tight loop of plain instructions; prints it (the test checks it
; against the closed form n(n-1)(2n-1)/6). Exit code 0.
%define ITERATIONS 30000000

start:
    xor ecx, ecx                       ; i
    xor ebx, ebx                       ; the sum
    mov rdx, ITERATIONS
square:
    mov rax, rcx
    imul rax, rcx
    add rbx, rax
    inc rcx
    cmp rcx, rdx
    jb square
    lea rsi, [rip + label_text]
    call print
    mov rax, rbx
    call print_decimal
    call print_newline
    xor eax, eax
    jmp exit_guest

%include "console.inc"

label_text:
    .asciz "sum of squares below 30000000: "
