; Solution of exercise 6: paste each block in place of its HOLE line.

; E#6-1
    mov rbx, [rip + transfer_area]
    push r15
    vmcallr                                  ; every register but RSP comes back from the guest
    pop r15
    jbe call_service.failed
    test rax, rax
    jnz call_service.refused
    clc
    ret

; E#6-2
    call receive_call
    vmcall

; E#6-3
    cmp rax, CALL_INVARIANTS
    je receive_invariants
    cmp rax, CALL_STATE
    je receive_state
    cmp rax, CALL_VERIFY
    je receive_verify
    cmp rax, CALL_COMMIT
    je receive_commit

; E#6-4
    xor r15d, r15d
    mov rax, VMCS_FIELD_VM_INSTRUCTION_ERROR
    vmread rcx, rax
    cmp ecx, VMCALLR_ENDED_BY_VM_EXIT           ; the timer ended the call (docs/machine.md 8.4)
    jne call_service.error
    mov rax, VMCS_FIELD_VM_EXIT_REASON       ; what ended the call: a fault, a timeout ...
    vmread rcx, rax
