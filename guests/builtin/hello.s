; hello: prints a line from every VP, then VP 0 waits for the others and exits with code 0.
; Guest ABI (docs/guests.md): RDI = VP index, RSI = VP count; COM1 at 0x3F8; exit code to 0xF4.
%define COM1 0x3F8
%define LSR 0x3FD
%define LSR_READY 0x20

start:
    mov r12, rdi
    mov r13, rsi
    lea rsi, [rip + message]
    call print
    mov al, r12b
    add al, 0x30                 ; one decimal digit of the VP index
    call putc
    mov al, 0x0A
    call putc
    lock inc qword ptr [rip + finished]
    test r12, r12
    jnz halt
wait_all:
    pause
    cmp [rip + finished], r13
    jb wait_all
    xor eax, eax
    out EXIT_PORT, al
halt:
    hlt
    jmp halt

print:                           ; rsi = NUL-terminated string
    lodsb
    test al, al
    jz print_done
    call putc
    jmp print
print_done:
    ret

putc:                            ; al = byte; waits for the transmitter like a real 16550 driver
    push rax
    mov dx, LSR
putc_wait:
    in al, dx
    test al, LSR_READY
    jz putc_wait
    pop rax
    mov dx, COM1
    out dx, al
    ret

message:
    .asciz "hello from VP "
.align 8
finished:
    .quad 0
