; sieve: counts the primes below SIEVE_LIMIT with the sieve of Eratosthenes, prints the count and
; exits with 0 if it is the expected one, 1 if not (the test recomputes it in Python).
%define SIEVE_LIMIT 100000
%define EXPECTED_PRIMES 9592
%define SIEVE_BASE 0x400000       ; guest-physical scratch for the sieve, one byte per number

start:
    mov rdi, SIEVE_BASE
    mov rcx, SIEVE_LIMIT
    mov al, 1
    rep stosb                     ; every number starts as a candidate
    mov rbx, 2
outer:
    mov rax, rbx
    imul rax, rbx
    cmp rax, SIEVE_LIMIT
    jae count
    mov rdi, SIEVE_BASE
    cmp byte ptr [rdi + rbx], 0
    je next_base
strike:
    mov byte ptr [rdi + rax], 0
    add rax, rbx
    cmp rax, SIEVE_LIMIT
    jb strike
next_base:
    inc rbx
    jmp outer
count:
    xor r12, r12
    mov rbx, 2
    mov rdi, SIEVE_BASE
count_next:
    cmp rbx, SIEVE_LIMIT
    jae report
    movzx eax, byte ptr [rdi + rbx]
    add r12, rax
    inc rbx
    jmp count_next
report:
    lea rsi, [rip + label_text]
    call print
    mov rax, r12
    call print_decimal
    call print_newline
    xor eax, eax
    cmp r12, EXPECTED_PRIMES
    setne al
    jmp exit_guest

%include "console.inc"

label_text:
    .asciz "primes below 100000: "
