; Solution of exercise 4: paste each block in place of its HOLE line.

; E#4-1
    mov rax, [rbx]
    test eax, EPT_RWX_MASK            ; bits 2:0 all 0: not present (SDM 29.3.2)
    jnz ept_next_present
    call alloc_table                  ; a zeroed page: 512 entries, none present
    or rax, EPT_RWX_MASK              ; the table's permissions: all; the leaf decides
    mov [rbx], rax
ept_next_present:
    mov rbx, EPT_ADDRESS_MASK
    and rbx, rax                      ; bits 51:12: the table's host-physical address

; E#4-2
    mov rbx, [rip + ept_root]
    mov rcx, rdi
    shr rcx, LAB_EPT_PML4_SHIFT
    and ecx, LAB_EPT_INDEX_MASK
    lea rbx, [rbx + rcx*8]            ; the PML4 entry
    call ept_next_table               ; RBX = the PDPT
    mov rcx, rdi
    shr rcx, LAB_EPT_PDPT_SHIFT
    and ecx, LAB_EPT_INDEX_MASK
    lea rbx, [rbx + rcx*8]
    call ept_next_table               ; RBX = the page directory
    mov rcx, rdi
    shr rcx, LAB_EPT_PD_SHIFT
    and ecx, LAB_EPT_INDEX_MASK
    lea rbx, [rbx + rcx*8]
    call ept_next_table               ; RBX = the page table
    mov rcx, rdi
    shr rcx, LAB_EPT_PT_SHIFT
    and ecx, LAB_EPT_INDEX_MASK
    lea rbx, [rbx + rcx*8]            ; the page-table entry
    mov rax, rsi
    or rax, rdx                       ; read, write, execute
    or rax, LAB_EPT_MEMORY_TYPE << EPT_MEMORY_TYPE_SHIFT
    mov [rbx], rax

; E#4-3
    mov rax, [rip + ept_root]
    or rax, LAB_EPT_MEMORY_TYPE | ((EPT_WALK_LENGTH_4 - 1) << EPTP_WALK_LENGTH_SHIFT)
    mov [rip + eptp], rax
    mov ecx, VMCS_FIELD_EPT_POINTER
    vmwrite rcx, rax

; E#4-4
    mov ecx, VMCS_FIELD_EXIT_QUALIFICATION
    vmread rax, rcx
    test eax, EPT_QUAL_DATA_READ | EPT_QUAL_DATA_WRITE
    jz ept_violation_unexpected       ; an instruction fetch: not this guest's business
    mov ecx, VMCS_FIELD_GUEST_PHYSICAL_ADDRESS
    vmread rdi, rcx
    cmp rdi, [r15 + LAB_INFO_GUEST_RAM_SIZE]
    jae ept_violation_unexpected      ; beyond the guest's RAM
    and rdi, -PAGE_SIZE               ; the page
    mov rsi, [r15 + LAB_INFO_GUEST_RAM]
    add rsi, rdi
    mov edx, EPT_RWX_MASK
    call ept_map_page
    mov rax, [rip + eptp]
    mov [rip + invept_descriptor], rax
    mov ecx, INVEPT_TYPE_SINGLE_CONTEXT
    invept rcx, [rip + invept_descriptor]
