; Solution of exercise 5: paste each block in place of its HOLE line.

; E#5-1
    mov eax, VMCS_FIELD_PIN_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PINBASED_CTLS
    mov ebx, PIN_ACTIVATE_VMX_PREEMPTION_TIMER
    call vmcs_write_control
    mov eax, VMCS_FIELD_VMX_PREEMPTION_TIMER_VALUE
    mov ebx, LAB_TIME_SLICE           ; instructions the guest runs before it exits (rate 0)
    vmwrite rax, rbx

; E#5-2
    fxsave [rbx + LAB_VP_FX_AREA]         ; x87, MXCSR, XMM0-XMM15: still the guest's
    mov rax, cr2
    mov [rbx + LAB_VP_CR2], rax
    mov ecx, IA32_KERNEL_GS_BASE
    rdmsr
    mov [rbx + LAB_VP_KERNEL_GS_BASE], eax
    mov [rbx + LAB_VP_KERNEL_GS_BASE + 4], edx

; E#5-3
    fxrstor [rbx + LAB_VP_FX_AREA]
    mov rax, [rbx + LAB_VP_CR2]
    mov cr2, rax
    mov ecx, IA32_KERNEL_GS_BASE
    mov eax, [rbx + LAB_VP_KERNEL_GS_BASE]
    mov edx, [rbx + LAB_VP_KERNEL_GS_BASE + 4]
    wrmsr

; E#5-4
    lea rax, [rip + first_vp]
    cmp rbx, rax
    jne switch_vp_other
    lea rax, [rip + second_vp]
switch_vp_other:                      ; RAX = the other VP
    cmp qword ptr [rax + LAB_VP_DONE], 0
    jne switch_vp_load                ; it has finished: the current one goes on
    mov rbx, rax
switch_vp_load:
    vmptrld [rbx + LAB_VP_VMCS]
    jbe lab_failed
    mov [rip + current_vp], rbx
