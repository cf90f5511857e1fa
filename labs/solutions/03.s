; Solution of exercise 3: paste each block in place of its HOLE line.

; E#3-1
    mov ecx, VMCS_FIELD_VM_EXIT_REASON
    vmread rax, rcx
    and eax, EXIT_REASON_BASIC_MASK   ; bits 15:0: the basic exit reason
    cmp eax, EXIT_REASON_CPUID
    je handle_cpuid
    cmp eax, EXIT_REASON_IO_INSTRUCTION
    je handle_io
    cmp eax, EXIT_REASON_HLT
    je handle_hlt
    jmp unknown_exit

; E#3-2
    mov rax, [rip + guest_registers + GUEST_REGISTERS_RAX]
    cmp eax, LAB_HYPERVISOR_LEAF
    jne cpuid_pass_through
    mov qword ptr [rip + guest_registers + GUEST_REGISTERS_RAX], LAB_HYPERVISOR_LEAF
    mov rbx, [r15 + LAB_INFO_CHALLENGE]
    mov [rip + guest_registers + GUEST_REGISTERS_RBX], rbx
    mov qword ptr [rip + guest_registers + GUEST_REGISTERS_RCX], LAB_SIGNATURE_ECX
    mov qword ptr [rip + guest_registers + GUEST_REGISTERS_RDX], LAB_SIGNATURE_EDX
    jmp skip_instruction
cpuid_pass_through:
    mov rcx, [rip + guest_registers + GUEST_REGISTERS_RCX]
    cpuid                             ; leaf EAX, subleaf ECX, as the processor answers them
    mov [rip + guest_registers + GUEST_REGISTERS_RAX], rax
    mov [rip + guest_registers + GUEST_REGISTERS_RBX], rbx
    mov [rip + guest_registers + GUEST_REGISTERS_RCX], rcx
    mov [rip + guest_registers + GUEST_REGISTERS_RDX], rdx

; E#3-3
    mov ecx, VMCS_FIELD_EXIT_QUALIFICATION
    vmread rax, rcx
    test eax, IO_QUAL_DIRECTION_IN
    jnz io_done                       ; IN: this guest does none
    shr eax, IO_QUAL_PORT_SHIFT
    cmp eax, COM1_BASE
    jne io_done                       ; another port: ignored
    mov rax, [rip + guest_registers + GUEST_REGISTERS_RAX]
    mov dx, COM1_BASE
    out dx, al
io_done:

; E#3-4
    mov ecx, VMCS_FIELD_GUEST_RIP
    vmread rax, rcx
    mov ecx, VMCS_FIELD_VM_EXIT_INSTRUCTION_LEN
    vmread rbx, rcx
    add rax, rbx
    mov ecx, VMCS_FIELD_GUEST_RIP
    vmwrite rcx, rax
