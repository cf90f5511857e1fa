; hostile: tries what a guest must not be able to do. VMX instructions and VMCALLR come back as
; #UD (its handler prints "UD" and goes on), the doorbell and unknown ports are ignored, a bad
; hypercall is refused; at last it reads far outside its RAM, and hv1 stops it (EPT violation).
%define COM1 0x3F8
%define DOORBELL_STATUS_PORT 0x530
%define HC_CONSOLE_WRITE 3
%define VECTOR_UD 6
%define FAR_OUTSIDE 0x20000000      ; 512 MiB: mapped by the guest's page tables, not by EPT
%include "idt.inc"

start:
    ; An IDT with one gate: #UD -> ud_handler.
    SET_INTERRUPT_GATE VECTOR_UD, ud_handler
    LOAD_IDT
    lea rax, [rip + after_vmxon]
    mov [rip + resume_at], rax
    vmxon [rip + scratch]
after_vmxon:
    lea rax, [rip + after_vmcallr]
    mov [rip + resume_at], rax
    vmcallr
after_vmcallr:
    mov dx, DOORBELL_STATUS_PORT
    out dx, eax                   ; the doorbell is the operator's, not a guest's
    mov eax, HC_CONSOLE_WRITE
    mov rdi, FAR_OUTSIDE
    mov esi, 16
    vmcall                        ; refused with an error code, nothing printed
    mov rax, FAR_OUTSIDE
    mov rax, [rax]                ; EPT violation: hv1 stops the partition here
    mov al, 0
    out 0xF4, al
halt:
    hlt
    jmp halt

ud_handler:
    mov dx, COM1
    mov al, 0x55                  ; "U"
    out dx, al
    mov al, 0x44                  ; "D"
    out dx, al
    mov al, 0x20
    out dx, al
    mov rax, [rip + resume_at]
    mov [rsp], rax                ; return to the next step instead of the faulting instruction
    iretq

.align 8
resume_at:
    .quad 0
scratch:
    .quad 0
