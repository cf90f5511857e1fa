; Exercise 3: exit handling (docs/labs/03-exits.md).
; Exercises 1 and 2 are given (vmx_on.inc, vmcs_setup.inc): the monitor enters the guest with HLT
; exiting and unconditional I/O exiting on. The guest asks CPUID for the hypervisor's leaf and for
; leaf 0, prints what it got on COM1, writes one byte to another port and halts. Every one of those
; instructions is a VM exit; your exit handler decides what each does.
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
    mov eax, VMCS_FIELD_PIN_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PINBASED_CTLS
    mov ebx, 0
    call vmcs_write_control
    mov eax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PROCBASED_CTLS
    mov ebx, PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO_EXITING | PROC_ACTIVATE_SECONDARY_CONTROLS
    call vmcs_write_control
    call vmcs_write_64bit_ept_controls
    mov eax, VMCS_FIELD_EPT_POINTER
    mov rbx, [r15 + LAB_INFO_EPT_POINTER]
    vmwrite rax, rbx
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

; exit_handler: the processor comes here (HOST_RIP) at every VM exit. The guest's general registers
; are in the registers: they are saved first, so that the handlers can read and change them in
; guest_registers ([rip + guest_registers + GUEST_REGISTERS_RAX] and so on) and use the registers themselves.
exit_handler:
    call save_guest_registers
    mov r15, LAB_INFO_ADDRESS
    inc qword ptr [rip + exit_count]
    ; Dispatch on the basic exit reason: CPUID to handle_cpuid, I/O to handle_io, HLT to handle_hlt,
    ; anything else to unknown_exit (with the reason in RAX).
    HOLE 3, 1

; handle_cpuid: what CPUID gives the guest. The hypervisor's own leaf LAB_HYPERVISOR_LEAF answers
; EAX = LAB_HYPERVISOR_LEAF, EBX = the challenge, ECX:EDX = the signature; every other leaf is the
; processor's answer.
handle_cpuid:
    HOLE 3, 2
    jmp skip_instruction

; handle_io: a guest OUT to COM1 goes to the console; other ports are ignored.
handle_io:
    HOLE 3, 3
    jmp skip_instruction

; skip_instruction: the guest continues after the instruction that exited, then VMRESUME.
skip_instruction:
    HOLE 3, 4
resume:
    call load_guest_registers
    vmresume
    lea rsi, [rip + message_resume_failed]
    call print
    call vmcs_report_failure
    jmp lab_failed

handle_hlt:
    lea rsi, [rip + message_halted]
    call print
    mov rax, [rip + exit_count]
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_done

; unknown_exit: an exit this monitor does not handle; RAX = the exit reason.
unknown_exit:
    mov rbx, rax
    lea rsi, [rip + message_unknown]
    call print
    mov rax, rbx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_failed

    .balign 8
exit_count:
    .quad 0
message_start:
    .asciz "exercise 3: exit handling\n"
message_setup_failed:
    .asciz "VMXON or the VMCS setup failed\n"
message_launch_failed:
    .asciz "VMLAUNCH failed: "
message_resume_failed:
    .asciz "VMRESUME failed: "
message_halted:
    .asciz "guest halted; VM exits: "
message_unknown:
    .asciz "unexpected VM exit, reason "
message_end_of_line:
    .asciz "\n"

%include "guest_registers.inc"
%include "vmcs_setup.inc"
%include "vmx_on.inc"
%include "support.inc"
