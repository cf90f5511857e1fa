; Exercise 2: a VMCS and the first VM entry (docs/labs/02-vmcs.md).
; Exercise 1's work is given (vmx_on.inc). The guest is given too: it starts at
; [r15 + LAB_INFO_GUEST_ENTRY], takes a number in RDI, stores what it makes of it at guest-physical
; LAB_GUEST_RESULT and halts. Until your monitor enters it, it never runs.
%include "lab.inc"

; VMWRITE_FIELD field, value: VMWRITE `value` (a number, a constant or a register other than RAX
; and RBX) into the VMCS field `field` (VMCS_FIELD_*). Changes RAX and RBX.
%macro VMWRITE_FIELD field, value
    mov eax, %field
    mov rbx, %value
    vmwrite rax, rbx
%endmacro

lab_start:
    mov r15, rsi                      ; the lab info block
    lea rsi, [rip + message_start]
    call print
    call vmx_on                       ; exercise 1
    jbe vmxon_failed

    ; The VMCS region: the revision identifier, VMCLEAR, VMPTRLD.
    HOLE 2, 1

    ; The VM-execution, VM-exit and VM-entry controls, each adjusted by its capability MSR
    ; (write_control, below), and the EPT pointer the lab machine gives.
    mov eax, VMCS_FIELD_PIN_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PINBASED_CTLS
    mov ebx, 0
    call write_control
    mov eax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PROCBASED_CTLS
    mov ebx, PROC_HLT_EXITING | PROC_ACTIVATE_SECONDARY_CONTROLS
    call write_control
    mov eax, VMCS_FIELD_SECONDARY_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PROCBASED_CTLS2
    mov ebx, PROC2_ENABLE_EPT
    call write_control
    mov eax, VMCS_FIELD_VM_EXIT_CONTROLS
    mov ecx, IA32_VMX_EXIT_CTLS
    mov ebx, EXIT_CTL_HOST_ADDRESS_SPACE_SIZE
    call write_control
    mov eax, VMCS_FIELD_VM_ENTRY_CONTROLS
    mov ecx, IA32_VMX_ENTRY_CTLS
    mov ebx, ENTRY_CTL_IA32E_MODE_GUEST
    call write_control
    VMWRITE_FIELD VMCS_FIELD_EPT_POINTER, [r15 + LAB_INFO_EPT_POINTER]

    ; The guest-state area: a 64-bit guest.
    HOLE 2, 3

    ; The host-state area: where and how the processor comes back at a VM exit.
    HOLE 2, 4

    lea rsi, [rip + message_launch]
    call print
launch:
    inc qword ptr [rip + launches]
    ; VMLAUNCH, giving the guest its number in RDI; when it fails, read and report why.
    HOLE 2, 5

; launch_failed: a VMLAUNCH failed with VMfailValid; RAX = the VM-instruction error.
launch_failed:
    mov rbx, rax
    lea rsi, [rip + message_launch_failed]
    call print
    mov rax, rbx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    cmp qword ptr [rip + launches], 1
    je lab_failed                     ; the first VMLAUNCH had to succeed
    lea rsi, [rip + message_relaunch_failed]
    call print
    jmp lab_done

launch_failed_invalid:
    lea rsi, [rip + message_launch_failed_invalid]
    call print
    jmp lab_failed

vmcs_failed:
    lea rsi, [rip + message_vmcs_failed]
    call print
    jmp lab_failed

vmxon_failed:
    lea rsi, [rip + message_vmxon_failed]
    call print
    jmp lab_failed

; write_control: VMWRITE into the control field EAX the controls EBX wants, adjusted by the
; capability MSR of that control: ECX names the original one (IA32_VMX_PINBASED_CTLS,
; PROCBASED_CTLS, PROCBASED_CTLS2, EXIT_CTLS or ENTRY_CTLS); use its TRUE twin when IA32_VMX_BASIC
; says there is one (SDM A.1, A.3-A.5). Changes RAX, RBX, RCX and RDX.
write_control:
    HOLE 2, 2
    ret

; read_msr: RAX = the 64-bit MSR ECX. Changes RDX.
read_msr:
    rdmsr
    shl rdx, 32
    or rax, rdx
    ret

; exit_handler: the processor comes here (HOST_RIP) at every VM exit, on the stack HOST_RSP, with the
; guest's general registers.
exit_handler:
    mov r15, LAB_INFO_ADDRESS
    mov eax, VMCS_FIELD_VM_EXIT_REASON
    vmread rbx, rax
    lea rsi, [rip + message_exit]
    call print
    mov rax, rbx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    bt ebx, 31                        ; SDM 27.8: bit 31 = the VM entry failed
    jc entry_failed
    cmp ebx, EXIT_REASON_HLT
    jne unexpected_exit
    lea rsi, [rip + message_result]
    call print
    mov rdi, [r15 + LAB_INFO_GUEST_RAM]
    mov rax, [rdi + LAB_GUEST_RESULT]
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    ; A launched VMCS takes VMRESUME: launching it again must fail. Show how your code reports it.
    lea rsi, [rip + message_relaunch]
    call print
    jmp launch

entry_failed:
    lea rsi, [rip + message_entry_failed]
    call print
    jmp lab_failed

unexpected_exit:
    lea rsi, [rip + message_unexpected]
    call print
    jmp lab_failed

launches:
    .quad 0
message_start:
    .asciz "exercise 2: a VMCS and the first VM entry\n"
message_launch:
    .asciz "VMCS ready, VMLAUNCH\n"
message_exit:
    .asciz "VM exit: reason "
message_result:
    .asciz "guest result: "
message_relaunch:
    .asciz "VMLAUNCH again (a launched VMCS takes VMRESUME)\n"
message_launch_failed:
    .asciz "VMLAUNCH failed: VM-instruction error "
message_relaunch_failed:
    .asciz "as it must: error 4 is VMLAUNCH with a non-clear VMCS\n"
message_launch_failed_invalid:
    .asciz "VMLAUNCH failed: VMfailInvalid (no current VMCS)\n"
message_entry_failed:
    .asciz "VM-entry failure (bit 31 of the exit reason): the guest state is invalid\n"
message_unexpected:
    .asciz "unexpected VM exit\n"
message_vmcs_failed:
    .asciz "VMCLEAR or VMPTRLD of the VMCS failed\n"
message_vmxon_failed:
    .asciz "VMXON failed\n"
message_end_of_line:
    .asciz "\n"

%include "vmx_on.inc"
%include "support.inc"
