; hypercalls: exercises hv1's hypercall ABI (docs/hv1.md) and checks each answer; the exit code is
; 0 when every check passed, otherwise the number of the first failed check.
%define HC_UNKNOWN 0x777
%define TOO_LONG 0x100000
%define OUTSIDE_RAM 0x7FFFFFFF0000

start:
    mov eax, HC_VERSION
    vmcall
    mov r12, rax                  ; kept for the report
    mov ecx, 1
    test rax, rax
    jz fail
    mov eax, HC_CLOCK
    vmcall
    mov r13, rax
    mov eax, HC_YIELD
    vmcall
    mov ecx, 2
    test rax, rax
    jnz fail
    mov eax, HC_CLOCK
    vmcall
    mov ecx, 3
    cmp rax, r13
    jbe fail                      ; virtual time moved on
    mov eax, HC_CONSOLE_WRITE
    lea rdi, [rip + message]
    mov esi, message_end - message
    vmcall
    mov ecx, 4
    test rax, rax
    jnz fail
    mov eax, HC_CONSOLE_WRITE
    lea rdi, [rip + message]
    mov esi, TOO_LONG
    vmcall
    mov ecx, 5
    cmp rax, EINVAL
    jne fail
    mov eax, HC_CONSOLE_WRITE
    mov rdi, OUTSIDE_RAM
    mov esi, 1
    vmcall
    mov ecx, 6
    cmp rax, EINVAL
    jne fail
    mov eax, HC_UNKNOWN
    vmcall
    mov ecx, 7
    cmp rax, ENOSYS
    jne fail
    xor ecx, ecx
fail:
    mov al, cl
    out EXIT_PORT, al
halt:
    hlt
    jmp halt

message:
    .ascii "hypercall console write\n"
message_end:
