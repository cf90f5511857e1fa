; Exercise 4: EPT (docs/labs/04-ept.md).
; Exercises 1 and 2 are given (vmx_on.inc, vmcs_setup.inc). This time the lab machine gives no EPT:
; you build it in the table pool. The monitor maps the first LAB_EAGER_SIZE bytes of guest-physical
; memory to the guest's RAM before the guest runs; the guest then reads a page above them, whose
; address it finds at LAB_GUEST_LAZY_POINTER, and your monitor maps that page when the guest
; touches it.
%include "lab.inc"

lab_start:
    mov r15, rsi                      ; the lab info block
    lea rsi, [rip + message_start]
    call print
    call vmx_on
    jbe setup_failed
    mov rdi, [r15 + LAB_INFO_VMCS_REGION]
    call vmcs_load
    jbe setup_failed

    ; The EPT: its PML4 is the first page of the table pool.
    mov rax, [r15 + LAB_INFO_TABLE_POOL]
    mov [rip + pool_next], rax
    call alloc_table
    mov [rip + ept_root], rax
    ; Guest-physical [0, LAB_EAGER_SIZE) to the guest's RAM, one 4-KiB page at a time.
    xor r12d, r12d
map_next_page:
    mov rdi, r12
    mov rsi, [r15 + LAB_INFO_GUEST_RAM]
    add rsi, r12
    mov edx, EPT_RWX_MASK
    call ept_map_page
    add r12, PAGE_SIZE
    cmp r12, LAB_EAGER_SIZE
    jb map_next_page
    lea rsi, [rip + message_mapped]
    call print
    mov rax, [rip + pool_next]
    sub rax, [r15 + LAB_INFO_TABLE_POOL]
    shr rax, PAGE_SHIFT
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print

    ; The EPT pointer: VMWRITE it, and keep it in eptp for INVEPT.
    HOLE 4, 3

    mov eax, VMCS_FIELD_PIN_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PINBASED_CTLS
    mov ebx, 0
    call vmcs_write_control
    mov eax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PROCBASED_CTLS
    mov ebx, PROC_HLT_EXITING | PROC_ACTIVATE_SECONDARY_CONTROLS
    call vmcs_write_control
    call vmcs_write_64bit_ept_controls
    mov rsi, [r15 + LAB_INFO_GUEST_ENTRY]
    mov rdx, [r15 + LAB_INFO_GUEST_STACK]
    call vmcs_write_guest_state
    lea rsi, [rip + exit_handler]
    call vmcs_write_host_state
    call load_guest_registers
    vmlaunch
    lea rsi, [rip + message_launch_failed]
    call print
    call vmcs_report_failure
    jmp lab_failed

setup_failed:
    lea rsi, [rip + message_setup_failed]
    call print
    jmp lab_failed

; alloc_table: RAX = the next page of the table pool (zeroed by the lab machine). Keeps every other
; register.
alloc_table:
    push rdx
    mov rax, [rip + pool_next]
    mov rdx, [r15 + LAB_INFO_TABLE_POOL]
    add rdx, [r15 + LAB_INFO_TABLE_POOL_SIZE]
    cmp rax, rdx
    jae pool_exhausted
    add qword ptr [rip + pool_next], PAGE_SIZE
    pop rdx
    ret
pool_exhausted:
    lea rsi, [rip + message_pool_exhausted]
    call print
    jmp lab_failed

; ept_next_table: RBX = the address of an EPT entry that points to a table (a PML4, PDPT or PD
; entry). Returns RBX = the address of that table; when the entry is not present, first takes a
; table from the pool and makes the entry point to it, with every permission. Changes RAX.
ept_next_table:
    HOLE 4, 1
    ret

; ept_map_page: maps the 4-KiB guest-physical page RDI to the host-physical page RSI with the
; permissions EDX (bits 2:0: read, write, execute), write-back, creating the tables on the way.
; Changes RAX, RBX and RCX.
ept_map_page:
    HOLE 4, 2
    ret

; exit_handler: the guest's registers are saved in guest_registers first.
exit_handler:
    call save_guest_registers
    mov r15, LAB_INFO_ADDRESS
    mov ecx, VMCS_FIELD_VM_EXIT_REASON
    vmread rax, rcx
    cmp eax, EXIT_REASON_EPT_VIOLATION
    je handle_ept_violation
    cmp eax, EXIT_REASON_HLT
    je handle_hlt
    jmp unknown_exit

; handle_ept_violation: the guest touched a guest-physical address its EPT does not map (or not for
; that kind of access). Map the page, invalidate what the processor may have cached, and resume
; the guest at the same instruction.
handle_ept_violation:
    inc qword ptr [rip + ept_violations]
    HOLE 4, 4
resume:
    call load_guest_registers
    vmresume
    lea rsi, [rip + message_resume_failed]
    call print
    call vmcs_report_failure
    jmp lab_failed

; ept_violation_unexpected: an EPT violation this monitor does not map.
ept_violation_unexpected:
    lea rsi, [rip + message_unexpected_violation]
    call print
    mov ecx, VMCS_FIELD_GUEST_PHYSICAL_ADDRESS
    vmread rax, rcx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_failed

handle_hlt:
    lea rsi, [rip + message_checksum]
    call print
    mov rdi, [r15 + LAB_INFO_GUEST_RAM]
    mov rax, [rdi + LAB_GUEST_RESULT]
    call print_hex
    lea rsi, [rip + message_violations]
    call print
    mov rax, [rip + ept_violations]
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_done

unknown_exit:
    mov rbx, rax
    lea rsi, [rip + message_unknown]
    call print
    mov rax, rbx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_failed


    .balign 16
invept_descriptor:                    ; SDM 31.3 INVEPT: the EPTP in bits 63:0, bits 127:64 zero
    .quad 0, 0
ept_root:
    .quad 0
eptp:
    .quad 0
pool_next:
    .quad 0
ept_violations:
    .quad 0
message_start:
    .asciz "exercise 4: EPT\n"
message_mapped:
    .asciz "EPT built before the first entry; tables used: "
message_setup_failed:
    .asciz "VMXON or the VMCS setup failed\n"
message_pool_exhausted:
    .asciz "the table pool is exhausted\n"
message_launch_failed:
    .asciz "VMLAUNCH failed: "
message_resume_failed:
    .asciz "VMRESUME failed: "
message_unexpected_violation:
    .asciz "EPT violation this monitor does not handle, guest-physical "
message_checksum:
    .asciz "guest checksum: "
message_violations:
    .asciz ", EPT violations: "
message_unknown:
    .asciz "unexpected VM exit, reason "
message_end_of_line:
    .asciz "\n"

%include "guest_registers.inc"
%include "vmcs_setup.inc"
%include "vmx_on.inc"
%include "support.inc"
