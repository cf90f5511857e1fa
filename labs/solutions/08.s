; Solution of exercise 8: paste each block in place of its HOLE line.

; E#8-1
    mov rax, [rip + new_cr3]
    mov rbx, [rip + new_takeover]
    mov rsi, [rip + service_boot]
    mov rdi, r15
    mov cr3, rax
    vmxoff
    jmp rbx

; E#8-2
    call enable_vmx                          ; VMXON with this hypervisor's own region
    test r15, r15
    jnz takeover_wait
    call takeover_finish
    mov qword ptr [rip + boot_done], 1
    jmp schedule
takeover_wait:
    pause
    cmp qword ptr [rip + boot_done], 0
    je takeover_wait
    jmp schedule

; E#8-3
    mov rbp, [rsi + VP_PARTITION]
    call load_fresh_vmcs
    call write_vm_controls
    call write_host_state
    lea rax, [rip + vmcs_images]
    mov r10, [rax + r12 * 8]
    lea r8, [rip + vmcs_transfer_fields]
    xor ecx, ecx
takeover_finish.field:
    mov eax, [r8 + rcx * 4]
    vmwrite rax, [r10 + rcx * 8]
    jbe panic
    inc ecx
    cmp ecx, VMCS_TRANSFER_FIELD_COUNT
    jb takeover_finish.field
    mov dword ptr [rsi + VP_LAUNCHED], 0
    call release_vmcs
