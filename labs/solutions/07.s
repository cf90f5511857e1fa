; Solution of exercise 7: paste each block in place of its HOLE line.

; E#7-1
    COPY_GPRS_TO_RECORD
    mov eax, RECORD_VP_STATE                 ; its state beyond the VMCS (vp_state.inc)
    mov ecx, TR_VP_STATE_SIZE
    call message_record                      ; (rsi, the VP record, is preserved)
    jc send_partitions_and_vps.aborted
    call vp_state_to_record

; E#7-2
    COPY_VP_STATE_REGISTERS TO_RECORD
    xor ecx, ecx
vp_state_to_record.msr:
    mov rax, [rsi + VP_KERNEL_GS_BASE + rcx * SHARED_MSR_BYTES]
    mov [rdi + TR_VP_STATE_KERNEL_GS_BASE + rcx * SHARED_MSR_BYTES], rax
    inc ecx
    cmp ecx, SHARED_MSR_COUNT
    jb vp_state_to_record.msr
    push rsi
    push rdi
    lea rsi, [rsi + VP_FX_AREA]
    lea rdi, [rdi + TR_VP_STATE_FX_HEADER]
    mov ecx, FXSAVE_AREA_BYTES / 8
    cld
    rep movsq
    pop rdi
    pop rsi

; E#7-3
    COPY_GPRS_FROM_RECORD

; E#7-4
    push rsi
    call check_vp_state_record
    pop rsi
    test eax, eax
    jnz receive_vp_state.refused
    COPY_VP_STATE_REGISTERS FROM_RECORD
    xor ecx, ecx
receive_vp_state.msr:
    mov rax, [rdi + TR_VP_STATE_KERNEL_GS_BASE + rcx * SHARED_MSR_BYTES]
    mov [rsi + VP_KERNEL_GS_BASE + rcx * SHARED_MSR_BYTES], rax
    inc ecx
    cmp ecx, SHARED_MSR_COUNT
    jb receive_vp_state.msr
    push rsi
    push rdi
    lea rax, [rsi + VP_FX_AREA]
    lea rsi, [rdi + TR_VP_STATE_FX_HEADER]
    mov rdi, rax
    mov ecx, FXSAVE_AREA_BYTES / 8
    cld
    rep movsq
    pop rdi
    pop rsi
    lea rax, [rip + vp_state_ready]
    mov byte ptr [rax + r9], 1
