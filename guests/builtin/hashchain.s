; hashchain: fills a BUFFER_BYTES buffer with a pseudo-random sequence (a 64-bit LCG), then hashes
; it ROUNDS times, each round continuing from the previous digest: FNV-1a over the buffer's 64-bit
; words (digest = (digest XOR word) * FNV prime). Prints the final digest in hex; the test recomputes
; it in Python. Exit code 0.
%define BUFFER 0x800000           ; guest-physical, 8 MiB
%define BUFFER_BYTES 0x400000     ; 4 MiB
%define ROUNDS 3
%define FNV_OFFSET 0xCBF29CE484222325
%define FNV_PRIME 0x100000001B3
%define LCG_MULTIPLIER 6364136223846793005
%define LCG_INCREMENT 1442695040888963407
%define LCG_SEED 2026
%define HEX_DIGITS 16

start:
    ; Fill: one 64-bit LCG step per qword.
    mov rdi, BUFFER
    mov rcx, BUFFER_BYTES / 8
    mov rax, LCG_SEED
    mov r8, LCG_MULTIPLIER
    mov r9, LCG_INCREMENT
fill:
    imul rax, r8
    add rax, r9
    mov [rdi], rax
    add rdi, 8
    dec rcx
    jnz fill
    ; Hash chain.
    mov r12, FNV_OFFSET           ; digest
    mov r10, FNV_PRIME
    mov r13, ROUNDS
round:
    mov rax, r12                  ; each round starts from the previous digest
    mov rsi, BUFFER
    mov rcx, BUFFER_BYTES / 8
hash_word:
    xor rax, [rsi]
    imul rax, r10
    add rsi, 8
    dec rcx
    jnz hash_word
    mov r12, rax
    dec r13
    jnz round
    lea rsi, [rip + label_text]
    call print
    mov rbx, r12
    mov rcx, HEX_DIGITS
hex_digit:
    rol rbx, 4
    mov al, bl
    and al, 0xF
    cmp al, 10
    jb decimal
    add al, 0x61 - 10 - 0x30
decimal:
    add al, 0x30
    push rcx
    call putc
    pop rcx
    dec rcx
    jnz hex_digit
    call print_newline
    xor eax, eax
    jmp exit_guest

%include "console.inc"

label_text:
    .asciz "hash chain digest: "
