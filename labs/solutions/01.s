; Solution of exercise 1: paste each block in place of its HOLE line.

; E#1-1
    mov ecx, IA32_VMX_BASIC
    rdmsr                             ; EDX:EAX = IA32_VMX_BASIC; bits 30:0 = revision identifier
    and eax, VMX_BASIC_REVISION_MASK
    mov rdi, [r15 + LAB_INFO_VMXON_REGION]
    mov [rdi], eax

; E#1-2
    mov ecx, IA32_VMX_CR0_FIXED0
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rbx, cr0
    or rbx, rax                       ; bits fixed to 1 in VMX operation
    mov ecx, IA32_VMX_CR0_FIXED1
    rdmsr
    shl rdx, 32
    or rax, rdx
    and rbx, rax                      ; bits fixed to 0
    mov cr0, rbx
    mov ecx, IA32_VMX_CR4_FIXED0
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rbx, cr4
    or rbx, rax                       ; CR4.VMXE among them
    mov ecx, IA32_VMX_CR4_FIXED1
    rdmsr
    shl rdx, 32
    or rax, rdx
    and rbx, rax
    mov cr4, rbx

; E#1-3
    vmxon [r15 + LAB_INFO_VMXON_REGION]
    jc vmxon_failed                   ; VMfailInvalid: CF = 1
