; Exercise 5: two VPs on one LP (docs/labs/05-two-vps.md).
; Exercises 1 and 2 are given (vmx_on.inc, vmcs_setup.inc). Two guests, each with its own VMCS,
; share this one logical processor: the VMX-preemption timer takes the processor back from one
; and the monitor gives it to the other. Each guest keeps its own values in XMM0, CR2 and
; IA32_KERNEL_GS_BASE and checks after a while that they are still there. VM exits and entries do
; not switch those registers (docs/machine.md 7.4): the monitor must.
%include "lab.inc"

lab_start:
    mov r15, rsi                      ; the lab info block
    lea rsi, [rip + message_start]
    call print
    call vmx_on
    jbe setup_failed
    ; Both VPs start from the processor's x87/SSE state as it is now.
    fxsave [rip + first_vp + LAB_VP_FX_AREA]
    fxsave [rip + second_vp + LAB_VP_FX_AREA]
    lea rbx, [rip + second_vp]
    mov rdi, [r15 + LAB_INFO_SECOND_VMCS_REGION]
    mov rsi, [r15 + LAB_INFO_SECOND_GUEST_ENTRY]
    mov rdx, [r15 + LAB_INFO_SECOND_GUEST_STACK]
    call setup_vp
    lea rbx, [rip + first_vp]
    mov rdi, [r15 + LAB_INFO_VMCS_REGION]
    mov rsi, [r15 + LAB_INFO_GUEST_ENTRY]
    mov rdx, [r15 + LAB_INFO_GUEST_STACK]
    call setup_vp                     ; the first VP's VMCS is current now
    lea rbx, [rip + first_vp]
    mov [rip + current_vp], rbx
    jmp enter_vp

setup_failed:
    lea rsi, [rip + message_setup_failed]
    call print
    jmp lab_failed

; setup_vp: RBX = a VP, RDI = its VMCS region, RSI and RDX = its guest's RIP and RSP. Makes the
; VMCS current and fills it: controls, guest state, host state.
setup_vp:
    mov [rbx + LAB_VP_VMCS], rdi
    push rsi
    push rdx
    call vmcs_load
    jbe setup_failed
    ; The pin-based controls, with the VMX-preemption timer, and the timer's value.
    HOLE 5, 1
    mov eax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    mov ecx, IA32_VMX_PROCBASED_CTLS
    mov ebx, PROC_HLT_EXITING | PROC_USE_MSR_BITMAPS | PROC_ACTIVATE_SECONDARY_CONTROLS
    call vmcs_write_control
    call vmcs_write_64bit_ept_controls
    mov eax, VMCS_FIELD_EPT_POINTER
    mov rbx, [r15 + LAB_INFO_EPT_POINTER]
    vmwrite rax, rbx
    mov eax, VMCS_FIELD_MSR_BITMAP     ; a zeroed page: no RDMSR or WRMSR exits
    mov rbx, [r15 + LAB_INFO_TABLE_POOL]
    vmwrite rax, rbx
    pop rdx
    pop rsi
    call vmcs_write_guest_state
    lea rsi, [rip + exit_handler]
    call vmcs_write_host_state
    ret

; enter_vp: enters the current VP (current_vp; its VMCS is the current VMCS): its x87/SSE state,
; CR2 and KERNEL_GS_BASE, then its general registers, then VMLAUNCH or VMRESUME.
enter_vp:
    mov rbx, [rip + current_vp]
    call load_vp_state
    mov rbx, [rip + current_vp]
    cmp qword ptr [rbx + LAB_VP_LAUNCHED], 0
    jne enter_vp_resume
    mov qword ptr [rbx + LAB_VP_LAUNCHED], 1
    call load_guest_registers
    vmlaunch
    lea rsi, [rip + message_launch_failed]
    call print
    call vmcs_report_failure
    jmp lab_failed
enter_vp_resume:
    call load_guest_registers
    vmresume
    lea rsi, [rip + message_resume_failed]
    call print
    call vmcs_report_failure
    jmp lab_failed

; save_vp_state: RBX = the VP that just exited. Saves into it what VM exits leave to the hypervisor:
; the x87/SSE state (LAB_VP_FX_AREA), CR2 (LAB_VP_CR2), IA32_KERNEL_GS_BASE (LAB_VP_KERNEL_GS_BASE). Changes
; RAX, RCX and RDX.
save_vp_state:
    HOLE 5, 2
    ret

; load_vp_state: RBX = the VP about to be entered. Gives the processor back what save_vp_state
; saved for it. Changes RAX, RCX and RDX.
load_vp_state:
    HOLE 5, 3
    ret

; switch_vp: RBX = the current VP. Chooses the VP to run next (the other one, unless it has
; finished), makes its VMCS the current VMCS and stores it in current_vp. Returns it in RBX.
switch_vp:
    HOLE 5, 4
    ret

; exit_handler: the guest's general registers go to its VP first, then its other state.
exit_handler:
    call save_guest_registers
    mov r15, LAB_INFO_ADDRESS
    mov rbx, [rip + current_vp]
    call save_vp_state
    mov ecx, VMCS_FIELD_VM_EXIT_REASON
    vmread rax, rcx
    cmp eax, EXIT_REASON_PREEMPTION_TIMER
    je timer_expired
    cmp eax, EXIT_REASON_HLT
    je vp_halted
    mov rbx, rax
    lea rsi, [rip + message_unknown]
    call print
    mov rax, rbx
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_failed

timer_expired:
    inc qword ptr [rip + timer_exits]
    mov rbx, [rip + current_vp]
    call switch_vp
    jmp enter_vp

; vp_halted: the current VP's guest is done: report what it saw; end when both are done.
vp_halted:
    mov rbx, [rip + current_vp]
    mov qword ptr [rbx + LAB_VP_DONE], 1
    call report_vp
    lea rax, [rip + first_vp]
    cmp qword ptr [rax + LAB_VP_DONE], 0
    je vp_halted_switch
    lea rax, [rip + second_vp]
    cmp qword ptr [rax + LAB_VP_DONE], 0
    je vp_halted_switch
    lea rsi, [rip + message_timer_exits]
    call print
    mov rax, [rip + timer_exits]
    call print_hex
    lea rsi, [rip + message_end_of_line]
    call print
    jmp lab_done
vp_halted_switch:
    mov rbx, [rip + current_vp]
    call switch_vp
    jmp enter_vp

; report_vp: RBX = a VP whose guest halted: prints which registers its guest found changed.
report_vp:
    mov rdi, [r15 + LAB_INFO_GUEST_RAM]
    lea rax, [rip + first_vp]
    cmp rbx, rax
    jne report_vp_second
    lea rsi, [rip + message_first]
    mov rdx, [rdi + LAB_FIRST_GUEST_DATA + OWN_VALUES_DIFFERED]
    jmp report_vp_flags
report_vp_second:
    lea rsi, [rip + message_second]
    mov rdx, [rdi + LAB_SECOND_GUEST_DATA + OWN_VALUES_DIFFERED]
report_vp_flags:
    call print
    lea rsi, [rip + message_xmm]
    call print
    mov eax, LAB_DIFFERED_XMM
    call report_flag
    lea rsi, [rip + message_cr2]
    call print
    mov eax, LAB_DIFFERED_CR2
    call report_flag
    lea rsi, [rip + message_kernel_gs_base]
    call print
    mov eax, LAB_DIFFERED_KERNEL_GS_BASE
    call report_flag
    lea rsi, [rip + message_end_of_line]
    call print
    ret

; report_flag: prints "ok" if the bit EAX is clear in RDX, else "changed".
report_flag:
    lea rsi, [rip + message_ok]
    test rdx, rax
    jz report_flag_print
    lea rsi, [rip + message_changed]
report_flag_print:
    call print
    ret

; save_guest_registers / load_guest_registers: the general registers of the current VP's guest
; to and from its LAB_VP_REGISTERS (RSP is the guest's own, in GUEST_RSP).
save_guest_registers:
    push rax
    mov rax, [rip + current_vp]
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RBX], rbx
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RCX], rcx
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RDX], rdx
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RSI], rsi
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RDI], rdi
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RBP], rbp
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R8], r8
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R9], r9
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R10], r10
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R11], r11
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R12], r12
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R13], r13
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R14], r14
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R15], r15
    pop rbx
    mov [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RAX], rbx
    ret
load_guest_registers:
    mov rax, [rip + current_vp]
    mov rbx, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RBX]
    mov rcx, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RCX]
    mov rdx, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RDX]
    mov rsi, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RSI]
    mov rdi, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RDI]
    mov rbp, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RBP]
    mov r8, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R8]
    mov r9, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R9]
    mov r10, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R10]
    mov r11, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R11]
    mov r12, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R12]
    mov r13, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R13]
    mov r14, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R14]
    mov r15, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_R15]
    mov rax, [rax + LAB_VP_REGISTERS + GUEST_REGISTERS_RAX]
    ret

    .balign 16
first_vp:                             ; the VPs (LAB_VP_* offsets): FXSAVE needs 16-byte alignment
    .zero LAB_VP_SIZE
second_vp:
    .zero LAB_VP_SIZE
current_vp:
    .quad 0
timer_exits:
    .quad 0
message_start:
    .asciz "exercise 5: two VPs on one LP\n"
message_setup_failed:
    .asciz "VMXON or the VMCS setup failed\n"
message_launch_failed:
    .asciz "VMLAUNCH failed: "
message_resume_failed:
    .asciz "VMRESUME failed: "
message_unknown:
    .asciz "unexpected VM exit, reason "
message_first:
    .asciz "guest 1 finished:"
message_second:
    .asciz "guest 2 finished:"
message_xmm:
    .asciz " xmm "
message_cr2:
    .asciz ", cr2 "
message_kernel_gs_base:
    .asciz ", kernel_gs_base "
message_ok:
    .asciz "ok"
message_changed:
    .asciz "changed"
message_timer_exits:
    .asciz "both guests finished; preemption-timer exits: "
message_end_of_line:
    .asciz "\n"

%include "vmcs_setup.inc"
%include "vmx_on.inc"
%include "support.inc"
