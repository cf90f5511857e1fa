; hostile: tries what a guest must not be able to do. VMX instructions and VMCALLR come back as
; #UD (its handler prints "UD" and goes on), the doorbell and unknown ports are ignored, a bad
; hypercall is refused, and so are maps and unmaps with bad addresses; at last it maps a page, writes
; it, prints "mapped ", unmaps it and reads it again: hv1 stops it there (EPT violation), as it would
; for any read outside its memory.
%define COM1 0x3F8
%define DOORBELL_STATUS_PORT 0x530
%define NOT_A_PAGE 0xFFFFFFFFFFFFF000
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
    mov rdi, NOT_A_PAGE
    mov eax, HC_MAP_PAGE
    vmcall                        ; refused: not in the map window
    xor edi, edi
    mov eax, HC_UNMAP_PAGE
    vmcall                        ; refused: guest RAM is not unmapped by hypercall
    mov rdi, MAP_WINDOW_BASE
    mov eax, HC_MAP_PAGE
    vmcall
    mov rbx, MAP_WINDOW_BASE
    mov qword ptr [rbx], 1        ; the page is its own for now
    mov dx, COM1
    lea rsi, [rip + mapped_text]
print_mapped:
    lodsb
    test al, al
    jz unmap
    out dx, al
    jmp print_mapped
unmap:
    mov rdi, MAP_WINDOW_BASE
    mov eax, HC_UNMAP_PAGE
    vmcall
    mov rax, [rbx]                ; EPT violation: hv1 stops the partition here
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

mapped_text:
    .asciz "mapped "
.align 8
resume_at:
    .quad 0
scratch:
    .quad 0
