; pingpong: two VPs take turns through shared memory. VP 0 moves the ball from even to odd, VP 1
; from odd to even, ROUNDS times each; VP 0 then prints the count and the sum of every value the two
; saw, and exits 0 if both are right. Run it with vps=2 (any other VP count exits with code 2).
%define ROUNDS 500
%define WRONG_VP_COUNT 2

start:
    cmp rsi, 2
    jne wrong_vp_count
    mov r12, rdi                  ; 0 or 1: the parity this VP waits for
    mov r14, ROUNDS
play:
    mov rax, [rip + ball]
    and rax, 1
    cmp rax, r12
    je hit
    pause
    jmp play
hit:
    mov rax, [rip + ball]
    lock add [rip + seen_sum], rax
    inc rax
    mov [rip + ball], rax
    dec r14
    jnz play
    test r12, r12
    jnz halt_forever
wait_other:
    cmp qword ptr [rip + ball], 2 * ROUNDS
    jb wait_other
    lea rsi, [rip + label_text]
    call print
    mov rax, [rip + ball]
    call print_decimal
    mov al, 0x20
    call putc
    mov rax, [rip + seen_sum]
    call print_decimal
    call print_newline
    xor eax, eax
    mov rbx, 2 * ROUNDS * (2 * ROUNDS - 1) / 2
    cmp [rip + seen_sum], rbx     ; 0 + 1 + ... + (2 ROUNDS - 1)
    setne al
    jmp exit_guest
wrong_vp_count:
    mov al, WRONG_VP_COUNT
    jmp exit_guest

%include "console.inc"

label_text:
    .asciz "pingpong ball and sum: "
.align 8
ball:
    .quad 0
seen_sum:
    .quad 0
