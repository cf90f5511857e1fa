; hv1: the first hypervisor of hhr.
;
; Every LP enters at hv1_entry (firmware hand-off, docs/boot.md): RDI = LP index, RSI = boot info.
; LP 0 builds a partition for each guest the boot info names (its RAM, EPT, page tables, GDT and
; one VMCS per virtual processor) while the other LPs wait; then every LP turns on VMX and runs
; the VPs assigned to it, round robin, preempted by the VMX-preemption timer.
;
; Registers the code keeps: r15 = this LP's index, rbp = the current VP's record (HV1_VP).
; All structure offsets, VMCS encodings and VMX bits are constants generated from Python.

; Hypercall numbers (HC_*), their errors (EINVAL ...) and limits come from hypervisors/guest_abi.py.
%define NO_DEADLINE -1                       ; larger than any deadline (unsigned)
%define BLOCKING_BY_STI_OR_MOV_SS 3          ; interruptibility-state bits 1:0 (SDM Vol. 3C 25.4.2)
%define LP_INDEX_SLOT 8                      ; the LP index lives in the top qword of its stack
%define HOST_STACK_OFFSET 16                 ; HOST_RSP = stack top - 16
%define SAVED_GPRS 15
%define GPR_BYTES 8
%define PTE_PRESENT_WRITABLE 0x3
%define PTE_LARGE 0x83
%define EPT_RWX 0x7
%define EPT_LARGE (EPT_RWX | (MEMORY_TYPE_WB << 3) | 0x80)
%define EPT_PAGE (EPT_RWX | (MEMORY_TYPE_WB << 3))  ; a 4 KiB page of the map window
%define EPTP_VALUE_FLAGS (MEMORY_TYPE_WB | (3 << 3))
%define PAGE_SHIFT 12
%define FRAME_SHIFT 21                       ; the ownership database's frames are 2 MiB
%define PAGES_PER_FRAME 512
%define GIB 0x40000000
%define GIB_SHIFT 30
%define ENTRIES_PER_TABLE 512
%define GATE_COUNT 32
%define GATE_BYTES 16
%define GATE_TYPE_INTERRUPT 0x8E00           ; present, DPL 0, 64-bit interrupt gate
%define HV_CODE 0x08
%define HV_DATA 0x10
%define HV_TSS 0x18
%define PANIC_EXIT 0x7F

hv1_entry:
    mov r15, rdi
    mov r14, rsi
    ; This LP's stack: HEAP_BASE + (index + 1) * LP_STACK_SIZE, its index kept in the top qword.
    lea rax, [rdi + 1]
    imul rax, rax, LP_STACK_SIZE
    mov rbx, HEAP_BASE
    add rax, rbx
    mov [rax - LP_INDEX_SLOT], rdi
    lea rsp, [rax - HOST_STACK_OFFSET]
    test r15, r15
    jnz wait_for_boot
    call build_tables                        ; LP 0: the hypervisor's GDT, TSS descriptor and IDT
    call load_descriptor_tables
    mov rax, r14
    mov rbx, BOOT_MAGIC_VALUE
    cmp [rax + BOOT_INFO_MAGIC], rbx         ; the firmware really handed over a boot info
    jne panic
    mov [rip + boot_info], rax
    call build_page_tables                   ; its own identity map: the firmware's is left behind
    call load_page_tables
    call enable_vmx
    call create_partitions
    mov qword ptr [rip + boot_done], 1
    jmp schedule

wait_for_boot:
    pause
    cmp qword ptr [rip + boot_done], 0
    je wait_for_boot
    call load_page_tables
    call load_descriptor_tables
    call enable_vmx
    jmp schedule

; --- hv1's page tables: all of RAM mapped to itself with 1 GiB pages (SDM Vol. 3A 4.5), in the heap.
; Every LP and every VMCS's HOST_CR3 use them.
build_page_tables:
    call alloc_page
    mov [rip + hv_cr3], rax                  ; the PML4
    mov rdi, rax
    call alloc_page                          ; one PDPT: 512 GiB, more than the machine's RAM
    lea rbx, [rax + PTE_PRESENT_WRITABLE]
    mov [rdi], rbx
    mov rdi, rax
    mov rdx, [rip + boot_info]
    mov rdx, [rdx + BOOT_INFO_RAM_SIZE]
    xor eax, eax                             ; host address of the GiB
build_page_tables.gib:
    lea rbx, [rax + PTE_LARGE]
    mov [rdi], rbx
    add rdi, 8
    mov rbx, GIB
    add rax, rbx
    cmp rax, rdx
    jb build_page_tables.gib
    ret

load_page_tables:
    mov rax, [rip + hv_cr3]
    mov cr3, rax
    ret

; --- descriptor tables (SDM Vol. 3A 3.5.1, 6.14.1) -------------------------------------------------
build_tables:
    lea rdi, [rip + hv_idt]
    lea rax, [rip + panic_interrupt]
    mov rcx, GATE_COUNT
build_tables.gate:
    mov rdx, rax
    and edx, 0xFFFF                          ; offset 15:0
    mov rbx, HV_CODE
    shl rbx, 16
    or rdx, rbx                              ; selector
    mov rbx, GATE_TYPE_INTERRUPT
    shl rbx, 32
    or rdx, rbx                              ; type and present
    mov rbx, rax
    shr rbx, 16
    and rbx, 0xFFFF
    shl rbx, 48
    or rdx, rbx                              ; offset 31:16
    mov [rdi], rdx
    mov rdx, rax
    shr rdx, 32
    mov [rdi + 8], rdx                       ; offset 63:32
    add rdi, GATE_BYTES
    dec rcx
    jnz build_tables.gate
    ; The TSS descriptor (busy 64-bit TSS) needs the TSS's address in pieces.
    lea rax, [rip + hv_tss]
    mov rdx, 0x0000890000000067              ; limit 0x67, available 64-bit TSS, present
    mov rbx, rax
    and rbx, 0xFFFFFF
    shl rbx, 16
    or rdx, rbx                              ; base 23:0
    mov rbx, rax
    shr rbx, 24
    and rbx, 0xFF
    shl rbx, 56
    or rdx, rbx                              ; base 31:24
    mov [rip + hv_gdt + HV_TSS], rdx
    mov rbx, rax
    shr rbx, 32
    mov [rip + hv_gdt + HV_TSS + 8], rbx     ; base 63:32
    ret

load_descriptor_tables:
    lgdt [rip + hv_gdtr]
    lidt [rip + hv_idtr]
    lea rax, [rip + load_descriptor_tables.reloaded]
    push HV_CODE
    push rax
    retfq
load_descriptor_tables.reloaded:
    mov ax, HV_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    ret

; --- VMX operation (SDM Vol. 3C 24.7, 24.11.5) ---------------------------------------------------
enable_vmx:
    mov rax, cr4
    or rax, CR4_VMXE
    mov cr4, rax
    ; This LP's VMXON region: a page after all the stacks.
    mov rax, r15
    shl rax, 12
    mov rbx, HEAP_BASE + MAX_LPS * LP_STACK_SIZE
    add rax, rbx
    mov dword ptr [rax], VMCS_REVISION
    push rax
    vmxon [rsp]
    pop rax
    jbe panic
    ret

; --- memory for the hypervisor's own structures: 4 KiB pages bump-allocated from the heap, zero
; (RAM starts zero). rcx = page count: rax = the first page. Clobbers rbx.
alloc_pages:
    mov rax, [rip + heap_next]
    test rax, rax
    jnz alloc_pages.have
    mov rax, HEAP_BASE + MAX_LPS * LP_STACK_SIZE + MAX_LPS * PAGE_SIZE
alloc_pages.have:
    mov rbx, rcx
    shl rbx, PAGE_SHIFT
    add rbx, rax
    push rcx
    mov rcx, HEAP_BASE + HEAP_SIZE
    cmp rbx, rcx
    pop rcx
    ja panic
    mov [rip + heap_next], rbx
    ret

; rax = one fresh page. Clobbers rbx.
alloc_page:
    push rcx
    mov ecx, 1
    call alloc_pages
    pop rcx
    ret

; --- the page-ownership database (docs/hv1.md) -----------------------------------------------------
; One HV1_FRAME per 2 MiB of RAM, owner OWNER_FREE (zero) until someone takes it. The frames below
; free memory (firmware, hypervisor image, guest staging, heap) are the hypervisor's.
init_ownership:
    mov rax, [rip + boot_info]
    mov rcx, [rax + BOOT_INFO_RAM_SIZE]
    shr rcx, FRAME_SHIFT
    mov [rip + frame_count], rcx
    imul rcx, rcx, HV1_FRAME_SIZE
    add rcx, PAGE_SIZE - 1
    shr rcx, PAGE_SHIFT                      ; pages the table takes
    call alloc_pages
    mov [rip + frame_table], rax
    mov rdx, [rip + boot_info]
    test qword ptr [rdx + BOOT_INFO_FREE_BASE], LARGE_PAGE_SIZE - 1
    jnz panic                                ; free memory must start on a frame
    mov rdx, [rdx + BOOT_INFO_FREE_BASE]
    mov ecx, OWNER_HYPERVISOR
    xor eax, eax                             ; from host address 0 up to free memory
    ; fall through: those frames are the hypervisor's

; rax = a host address on a frame boundary, rdx = bytes (whole frames), ecx = owner: those frames
; now say so. Clobbers rax, rdx.
set_frames_owner:
    shr rax, FRAME_SHIFT
    imul rax, rax, HV1_FRAME_SIZE
    add rax, [rip + frame_table]
    shr rdx, FRAME_SHIFT
set_frames_owner.frame:
    test rdx, rdx
    jz set_frames_owner.done
    mov [rax + HV1_FRAME_OWNER], ecx
    add rax, HV1_FRAME_SIZE
    dec rdx
    jmp set_frames_owner.frame
set_frames_owner.done:
    ret

; --- the map pool: 4 KiB pages for hypercall maps and the EPT tables that map them ------------------
; Pages come from split frames: free frames taken from the top of RAM down (partition RAM grows from
; the bottom up), each keeping its 512 HV1_PAGE records in its own first page. Everything here runs
; with memory_lock held.

; edx = the owner: rax = a zeroed page it now owns, rdi = its HV1_PAGE record, CF = 0; CF = 1 when
; free memory is used up. Preserves the other registers.
alloc_pool_page:
    push rbx
    push rcx
    push rdx
    push rsi
    mov rsi, [rip + pool_frame]              ; the split frame pages were taken from last
    test rsi, rsi
    jz alloc_pool_page.find_split
    cmp word ptr [rsi + HV1_FRAME_FREE_PAGES], 0
    jne alloc_pool_page.take
alloc_pool_page.find_split:                  ; a split frame with a page freed since
    mov rsi, [rip + frame_table]
    mov rcx, [rip + frame_count]
alloc_pool_page.split_frame:
    cmp dword ptr [rsi + HV1_FRAME_OWNER], OWNER_SPLIT
    jne alloc_pool_page.not_split
    cmp word ptr [rsi + HV1_FRAME_FREE_PAGES], 0
    jne alloc_pool_page.found
alloc_pool_page.not_split:
    add rsi, HV1_FRAME_SIZE
    dec rcx
    jnz alloc_pool_page.split_frame
    mov rcx, [rip + frame_count]             ; none: split the highest free frame
    imul rsi, rcx, HV1_FRAME_SIZE
    add rsi, [rip + frame_table]
alloc_pool_page.free_frame:
    sub rsi, HV1_FRAME_SIZE
    cmp dword ptr [rsi + HV1_FRAME_OWNER], OWNER_FREE
    je alloc_pool_page.split
    dec rcx
    jnz alloc_pool_page.free_frame
    stc                                      ; no free frame left
    jmp alloc_pool_page.done
alloc_pool_page.split:
    call frame_address                       ; rax = the frame's host address
    mov rdi, rax
    push rax
    mov ecx, PAGE_SIZE / 8
    xor eax, eax
    cld
    rep stosq                                ; its records start as free (the frame held anything)
    pop rax
    mov dword ptr [rax + HV1_PAGE_OWNER], OWNER_HYPERVISOR  ; the records' own page
    mov [rsi + HV1_FRAME_PAGES], rax
    mov word ptr [rsi + HV1_FRAME_FREE_PAGES], PAGES_PER_FRAME - 1
    mov word ptr [rsi + HV1_FRAME_FIRST_FREE], 1
    mov dword ptr [rsi + HV1_FRAME_OWNER], OWNER_SPLIT
alloc_pool_page.found:
    mov [rip + pool_frame], rsi
alloc_pool_page.take:
    movzx ecx, word ptr [rsi + HV1_FRAME_FIRST_FREE]  ; page number in the frame: search from here
    imul rdi, rcx, HV1_PAGE_SIZE
    add rdi, [rsi + HV1_FRAME_PAGES]
alloc_pool_page.record:
    cmp dword ptr [rdi + HV1_PAGE_OWNER], OWNER_FREE
    je alloc_pool_page.claim
    add rdi, HV1_PAGE_SIZE
    inc ecx
    cmp ecx, PAGES_PER_FRAME
    jb alloc_pool_page.record
    jmp panic                                ; free_pages said there was one: the database is broken
alloc_pool_page.claim:
    mov [rdi + HV1_PAGE_OWNER], edx
    mov dword ptr [rdi + HV1_PAGE_GUEST_FRAME], 0
    dec word ptr [rsi + HV1_FRAME_FREE_PAGES]
    lea ebx, [rcx + 1]
    mov [rsi + HV1_FRAME_FIRST_FREE], bx
    call frame_address
    shl rcx, PAGE_SHIFT
    add rax, rcx                             ; the page
    push rdi
    push rax
    mov rdi, rax
    mov ecx, PAGE_SIZE / 8
    xor eax, eax
    cld
    rep stosq                                ; zero: nothing of its last owner shows through
    pop rax
    pop rdi
    clc
alloc_pool_page.done:
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret

; rsi = an HV1_FRAME record: rax = the host address of its frame.
frame_address:
    push rbx
    push rdx
    mov rax, rsi
    sub rax, [rip + frame_table]
    xor edx, edx
    mov ebx, HV1_FRAME_SIZE
    div rbx
    shl rax, FRAME_SHIFT
    pop rdx
    pop rbx
    ret

; rax = a page of a split frame: it is free again. Clobbers rcx, rdx.
free_pool_page:
    mov rcx, rax
    shr rcx, FRAME_SHIFT
    cmp rcx, [rip + frame_count]
    jae panic
    imul rcx, rcx, HV1_FRAME_SIZE
    add rcx, [rip + frame_table]
    cmp dword ptr [rcx + HV1_FRAME_OWNER], OWNER_SPLIT
    jne panic                                ; not a pool page: the EPT or the database is broken
    mov rdx, rax
    shr rdx, PAGE_SHIFT
    and rdx, PAGES_PER_FRAME - 1             ; the page's number in its frame
    cmp dx, [rcx + HV1_FRAME_FIRST_FREE]
    jae free_pool_page.record
    mov [rcx + HV1_FRAME_FIRST_FREE], dx     ; the lowest free page now
free_pool_page.record:
    imul rdx, rdx, HV1_PAGE_SIZE
    add rdx, [rcx + HV1_FRAME_PAGES]
    mov dword ptr [rdx + HV1_PAGE_OWNER], OWNER_FREE
    mov dword ptr [rdx + HV1_PAGE_GUEST_FRAME], 0
    inc word ptr [rcx + HV1_FRAME_FREE_PAGES]
    ret

; Serializes the map pool, the ownership database and the map windows' EPT across LPs.
lock_memory:
    lock bts qword ptr [rip + memory_lock], 0
    jnc lock_memory.held
lock_memory.wait:
    pause
    test qword ptr [rip + memory_lock], 1
    jnz lock_memory.wait
    jmp lock_memory
lock_memory.held:
    ret

unlock_memory:
    mov qword ptr [rip + memory_lock], 0
    ret

; --- the map window: EPT with 4 KiB pages (SDM Vol. 3C 29.3.2) -------------------------------------
; rbx = partition, rsi = a page in its map window: rax = the address of the EPT entry that maps it,
; CF = 0. With r10 = 1, tables missing on the way are made from the pool (the hypervisor's pages);
; CF = 1 when a table is missing (r10 = 0) or cannot be made. Clobbers rcx, rdx, rdi, r8, r9.
window_pte:
    mov rax, [rbx + HV1_PARTITION_EPTP]
    mov rcx, EPT_ADDRESS_MASK
    and rax, rcx                             ; the PML4
    mov ecx, EPT_PML4_SHIFT
window_pte.level:
    mov r8, rsi
    shr r8, cl
    and r8, ENTRIES_PER_TABLE - 1
    lea r9, [rax + r8 * 8]                   ; the entry at this level
    cmp ecx, PAGE_SHIFT
    je window_pte.found
    mov rax, [r9]
    test rax, EPT_RWX
    jnz window_pte.down
    test r10, r10
    jz window_pte.missing
    mov edx, OWNER_HYPERVISOR
    call alloc_pool_page                     ; a zeroed table
    jc window_pte.missing
    lea rdx, [rax + EPT_RWX]
    mov [r9], rdx
window_pte.down:
    mov rdx, EPT_ADDRESS_MASK
    and rax, rdx
    sub ecx, EPT_LEVEL_BITS
    jmp window_pte.level
window_pte.found:
    mov rax, r9
    clc
    ret
window_pte.missing:
    stc
    ret

; The map and unmap hypercalls' argument: rsi = the guest's RDI when it is a 4 KiB-aligned page of
; the map window (CF = 0); otherwise CF = 1 and rax = EINVAL.
window_argument:
    mov rsi, [rbp + HV1_VP_RDI]
    mov rax, EINVAL
    test rsi, PAGE_SIZE - 1
    jnz window_argument.bad
    mov rcx, rsi
    mov rdx, MAP_WINDOW_BASE
    sub rcx, rdx
    jb window_argument.bad
    cmp rcx, MAP_WINDOW_SIZE
    jae window_argument.bad
    clc
    ret
window_argument.bad:
    stc
    ret

; rbx = partition, rsi = a page of its map window: a zeroed pool page of the partition appears there.
; rax = 0, EEXIST, or ENOMEM (quota or free memory used up).
map_page:
    mov rax, ENOMEM
    cmp dword ptr [rbx + HV1_PARTITION_MAPPED_PAGES], MAP_QUOTA_PAGES
    jae map_page.done
    mov r10d, 1
    call window_pte
    jc map_page.no_memory
    mov r11, rax                             ; the entry
    mov rax, EEXIST
    test qword ptr [r11], EPT_RWX
    jnz map_page.done
    mov edx, [rbx + HV1_PARTITION_NUMBER]
    add edx, OWNER_PARTITION_BASE
    call alloc_pool_page
    jc map_page.no_memory
    mov rcx, rsi
    shr rcx, PAGE_SHIFT
    mov [rdi + HV1_PAGE_GUEST_FRAME], ecx
    or rax, EPT_PAGE
    mov [r11], rax                           ; not present before: nothing cached to invalidate
    inc dword ptr [rbx + HV1_PARTITION_MAPPED_PAGES]
    xor eax, eax
map_page.done:
    ret
map_page.no_memory:
    mov rax, ENOMEM
    ret

; rbx = partition, rsi = a page of its map window: the page leaves the window and returns to the pool.
; rax = 0, or ENOENT if nothing is mapped there.
unmap_page:
    xor r10d, r10d
    call window_pte
    jc unmap_page.not_mapped
    mov r11, rax
    mov rax, [r11]
    test rax, EPT_RWX
    jz unmap_page.not_mapped
    mov qword ptr [r11], 0
    call invalidate_partition_ept            ; no VP may use the page from here on
    mov rcx, EPT_ADDRESS_MASK
    and rax, rcx
    call free_pool_page
    dec dword ptr [rbx + HV1_PARTITION_MAPPED_PAGES]
    xor eax, eax
    ret
unmap_page.not_mapped:
    mov rax, ENOENT
    ret

; rbx = partition: INVEPT single-context for its EPTP. The machine drops that EPTP's cached
; translations on every LP (docs/machine.md 7.10.5; SDM Vol. 3C 31.3). Preserves rax.
invalidate_partition_ept:
    push rax
    push 0                                   ; the INVEPT descriptor: EPTP, then a reserved zero
    push qword ptr [rbx + HV1_PARTITION_EPTP]
    mov rax, INVEPT_TYPE_SINGLE_CONTEXT
    invept rax, [rsp]
    lea rsp, [rsp + 16]
    jbe panic
    pop rax
    ret

; rbx = a partition that has ended: its map window leaves its EPT, and every page under it (mapped
; pages and the tables) returns to the pool. The window lies in one PDPT entry (guest_abi.py).
; Clobbers rax, rcx, rdx, r8, r9, r12, r13, r14.
release_map_window:
    mov rax, [rbx + HV1_PARTITION_EPTP]
    mov rcx, EPT_ADDRESS_MASK
    and rax, rcx                             ; the PML4
    mov rdx, MAP_WINDOW_BASE
    shr rdx, EPT_PML4_SHIFT
    and rdx, ENTRIES_PER_TABLE - 1
    mov rax, [rax + rdx * 8]
    test rax, EPT_RWX
    jz release_map_window.done
    and rax, rcx                             ; the PDPT
    mov rdx, MAP_WINDOW_BASE
    shr rdx, GIB_SHIFT
    and rdx, ENTRIES_PER_TABLE - 1
    lea r9, [rax + rdx * 8]
    mov r8, [r9]
    test r8, EPT_RWX
    jz release_map_window.done
    mov qword ptr [r9], 0
    call invalidate_partition_ept            ; detached: no VP reaches the window any more
    and r8, rcx                              ; the page directory
    xor r12d, r12d
release_map_window.directory_entry:
    mov r13, [r8 + r12 * 8]
    test r13, EPT_RWX
    jz release_map_window.next_directory_entry
    mov rcx, EPT_ADDRESS_MASK
    and r13, rcx                             ; a page table
    xor r14d, r14d
release_map_window.table_entry:
    mov rax, [r13 + r14 * 8]
    test rax, EPT_RWX
    jz release_map_window.next_table_entry
    mov rcx, EPT_ADDRESS_MASK
    and rax, rcx
    call free_pool_page
    dec dword ptr [rbx + HV1_PARTITION_MAPPED_PAGES]
release_map_window.next_table_entry:
    inc r14
    cmp r14, ENTRIES_PER_TABLE
    jb release_map_window.table_entry
    mov rax, r13
    call free_pool_page
release_map_window.next_directory_entry:
    inc r12
    cmp r12, ENTRIES_PER_TABLE
    jb release_map_window.directory_entry
    mov rax, r8
    call free_pool_page
release_map_window.done:
    ret

; --- partitions ------------------------------------------------------------------------------------
create_partitions:
    call init_ownership
    mov rax, [rip + boot_info]
    mov rbx, [rax + BOOT_INFO_FREE_BASE]
    mov [rip + free_next], rbx
    mov rbx, [rax + BOOT_INFO_FREE_BASE]
    add rbx, [rax + BOOT_INFO_FREE_SIZE]
    mov [rip + free_end], rbx
    xor r12, r12                             ; guest number
create_partitions.next_guest:
    mov rax, [rip + boot_info]
    mov ecx, [rax + BOOT_INFO_GUEST_COUNT]
    cmp r12, rcx
    jae create_partitions.done
    cmp r12, MAX_PARTITIONS
    jae panic
    mov r13, [rax + BOOT_INFO_GUESTS]
    imul rbx, r12, GUEST_DESCRIPTOR_SIZE
    add r13, rbx                             ; r13 = this guest's descriptor
    imul rbp, r12, HV1_PARTITION_SIZE
    lea rbx, [rip + partitions]
    add rbp, rbx                             ; rbp = its partition record
    call create_partition
    inc r12
    mov [rip + partition_count], r12
    jmp create_partitions.next_guest
create_partitions.done:
    mov rax, [rip + partition_count]
    mov [rip + running_partitions], rax
    ret

; r13 = guest descriptor, rbp = partition record, r12 = partition number
create_partition:
    mov rax, [r13 + GUEST_DESCRIPTOR_MEMORY_SIZE]
    mov [rbp + HV1_PARTITION_MEMORY_SIZE], rax
    mov rbx, [rip + free_next]
    mov [rbp + HV1_PARTITION_MEMORY], rbx
    add rax, rbx
    cmp rax, [rip + free_end]
    ja panic
    mov [rip + free_next], rax
    mov rax, [rbp + HV1_PARTITION_MEMORY]    ; its frames are the partition's
    mov rdx, [rbp + HV1_PARTITION_MEMORY_SIZE]
    mov ecx, r12d
    add ecx, OWNER_PARTITION_BASE
    call set_frames_owner
    mov [rbp + HV1_PARTITION_NUMBER], r12d
    mov dword ptr [rbp + HV1_PARTITION_STATE], PARTITION_RUNNING
    mov eax, r12d
    inc eax
    mov [rbp + HV1_PARTITION_CHANNEL], eax   ; console channel = partition number + 1
    mov eax, [r13 + GUEST_DESCRIPTOR_VP_COUNT]
    mov [rbp + HV1_PARTITION_VP_COUNT], eax
    ; The image, copied into guest RAM at the load address.
    mov rsi, [r13 + GUEST_DESCRIPTOR_IMAGE]
    mov rdi, [rbp + HV1_PARTITION_MEMORY]
    add rdi, GUEST_LOAD_ADDRESS
    mov rcx, [r13 + GUEST_DESCRIPTOR_IMAGE_SIZE]
    cld
    rep movsb
    call build_guest_paging
    call build_ept
    ; One VP record and VMCS for each virtual processor.
    xor r14, r14
create_partition.next_vp:
    cmp r14d, [rbp + HV1_PARTITION_VP_COUNT]
    jae create_partition.vps_done
    call create_vp
    inc r14
    jmp create_partition.next_vp
create_partition.vps_done:
    ret

; Identity page tables with 1 GiB pages and a GDT, in guest RAM (docs/guests.md).
build_guest_paging:
    mov rdi, [rbp + HV1_PARTITION_MEMORY]
    mov qword ptr [rdi + GUEST_PML4], GUEST_PDPT | PTE_PRESENT_WRITABLE
    xor rcx, rcx
build_guest_paging.gib:
    mov rax, rcx
    imul rax, rax, GIB
    cmp rax, [rbp + HV1_PARTITION_MEMORY_SIZE]
    jae build_guest_paging.window
    or rax, PTE_LARGE
    mov [rdi + GUEST_PDPT + rcx * 8], rax
    inc rcx
    jmp build_guest_paging.gib
build_guest_paging.window:                   ; the map window, identity too (docs/guests.md)
    mov rax, MAP_WINDOW_BASE
    mov rcx, rax
    shr rcx, GIB_SHIFT                       ; its first PDPT entry (1 GiB each)
    or rax, PTE_LARGE
    mov rdx, MAP_WINDOW_SIZE / GIB
build_guest_paging.window_gib:
    mov [rdi + GUEST_PDPT + rcx * 8], rax
    mov rbx, GIB
    add rax, rbx
    inc rcx
    dec rdx
    jnz build_guest_paging.window_gib
build_guest_paging.gdt:
    mov rax, 0x00AF9B000000FFFF              ; 64-bit code
    mov [rdi + GUEST_GDT + GUEST_CODE_SELECTOR], rax
    mov rax, 0x00CF93000000FFFF              ; data
    mov [rdi + GUEST_GDT + GUEST_DATA_SELECTOR], rax
    mov rax, 0x00008B0040000067              ; busy 64-bit TSS at GUEST_TSS, limit 0x67
    mov [rdi + GUEST_GDT + GUEST_TSS_SELECTOR], rax
    ret

; EPT for the partition: GPA 0..memory_size -> its host RAM in 2 MiB pages (SDM Vol. 3C 29.3.2).
build_ept:
    call alloc_page
    mov r8, rax                              ; PML4
    call alloc_page
    mov r9, rax                              ; PDPT
    lea rax, [r9 + EPT_RWX]
    mov [r8], rax
    xor r10, r10                             ; 2 MiB page number
build_ept.page:
    mov rax, r10
    shl rax, 21
    cmp rax, [rbp + HV1_PARTITION_MEMORY_SIZE]
    jae build_ept.done
    mov rbx, r10
    and rbx, ENTRIES_PER_TABLE - 1
    jnz build_ept.have_pd
    call alloc_page                          ; a new page directory for each GiB
    mov r11, rax
    mov rbx, r10
    shr rbx, 9
    lea rax, [r11 + EPT_RWX]
    mov [r9 + rbx * 8], rax
build_ept.have_pd:
    mov rax, r10
    shl rax, 21
    add rax, [rbp + HV1_PARTITION_MEMORY]
    or rax, EPT_LARGE
    mov rbx, r10
    and rbx, ENTRIES_PER_TABLE - 1
    mov [r11 + rbx * 8], rax
    inc r10
    jmp build_ept.page
build_ept.done:
    lea rax, [r8 + EPTP_VALUE_FLAGS]
    mov [rbp + HV1_PARTITION_EPTP], rax
    ret

%macro VMWRITE_VALUE field, value
    mov rax, VMCS_FIELD_%field
    mov rbx, %value
    vmwrite rax, rbx
%endmacro

%macro VMWRITE_REGISTER field, register
    mov rax, VMCS_FIELD_%field
    vmwrite rax, %register
%endmacro

; rbp = partition, r14 = VP index in it: a VP record and its VMCS, assigned to an LP round robin.
create_vp:
    mov rax, [rip + vp_total]
    cmp rax, MAX_VPS
    jae panic
    imul rbx, rax, HV1_VP_SIZE
    lea rdi, [rip + vps]
    add rdi, rbx                             ; rdi = the VP record
    mov [rdi + HV1_VP_PARTITION], rbp
    mov [rdi + HV1_VP_INDEX], r14d
    mov rcx, [rip + boot_info]
    mov ecx, [rcx + BOOT_INFO_LP_COUNT]
    xor edx, edx
    div rcx                                  ; rdx = vp_total % lp_count
    mov [rdi + HV1_VP_LP], edx
    mov dword ptr [rdi + HV1_VP_STATE], VP_RUNNABLE
    mov [rdi + HV1_VP_RDI], r14              ; the guest ABI: RDI = VP index, RSI = VP count
    mov eax, [rbp + HV1_PARTITION_VP_COUNT]
    mov [rdi + HV1_VP_RSI], rax
    inc qword ptr [rip + vp_total]
    push rdi
    call alloc_page
    pop rdi
    mov [rdi + HV1_VP_VMCS], rax
    mov dword ptr [rax], VMCS_REVISION
    push rdi
    push rax
    vmclear [rsp]
    vmptrld [rsp]
    pop rax
    pop rdi
    jbe panic
    mov rsi, rdi                             ; rsi = VP record while the VMCS is written
    ; Controls: what the machine requires, plus HLT and I/O exits, EPT and the preemption timer.
    VMWRITE_VALUE PIN_BASED_VM_EXEC_CONTROL, PIN_MUST_BE_ONE | PIN_ACTIVATE_VMX_PREEMPTION_TIMER
    VMWRITE_VALUE CPU_BASED_VM_EXEC_CONTROL, PROC_MUST_BE_ONE | PROC_HLT_EXITING | PROC_UNCONDITIONAL_IO_EXITING | PROC_ACTIVATE_SECONDARY_CONTROLS
    VMWRITE_VALUE SECONDARY_VM_EXEC_CONTROL, PROC2_MUST_BE_ONE | PROC2_ENABLE_EPT
    ; The timer's remaining value is saved at every exit, so a VP's quantum spans its exits.
    VMWRITE_VALUE VM_EXIT_CONTROLS, EXIT_MUST_BE_ONE | EXIT_CTL_HOST_ADDRESS_SPACE_SIZE | EXIT_CTL_SAVE_VMX_PREEMPTION_TIMER_VALUE
    VMWRITE_VALUE VM_ENTRY_CONTROLS, ENTRY_MUST_BE_ONE | ENTRY_CTL_IA32E_MODE_GUEST
    VMWRITE_VALUE VMCS_LINK_POINTER, 0xFFFFFFFFFFFFFFFF
    mov rax, VMCS_FIELD_EPT_POINTER
    vmwrite rax, [rbp + HV1_PARTITION_EPTP]
    ; Guest state: the guest ABI of docs/guests.md.
    VMWRITE_VALUE GUEST_CR0, CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    VMWRITE_VALUE GUEST_CR3, GUEST_PML4
    VMWRITE_VALUE GUEST_CR4, CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_VMXE
    VMWRITE_VALUE GUEST_IA32_EFER, EFER_LME | EFER_LMA | EFER_NXE
    VMWRITE_VALUE GUEST_CS_SELECTOR, GUEST_CODE_SELECTOR
    VMWRITE_VALUE GUEST_CS_AR_BYTES, 0xA09B
    VMWRITE_VALUE GUEST_CS_LIMIT, 0xFFFFFFFF
    VMWRITE_VALUE GUEST_SS_SELECTOR, GUEST_DATA_SELECTOR
    VMWRITE_VALUE GUEST_SS_AR_BYTES, 0xC093
    VMWRITE_VALUE GUEST_SS_LIMIT, 0xFFFFFFFF
    VMWRITE_VALUE GUEST_DS_SELECTOR, GUEST_DATA_SELECTOR
    VMWRITE_VALUE GUEST_DS_AR_BYTES, 0xC093
    VMWRITE_VALUE GUEST_DS_LIMIT, 0xFFFFFFFF
    VMWRITE_VALUE GUEST_ES_SELECTOR, GUEST_DATA_SELECTOR
    VMWRITE_VALUE GUEST_ES_AR_BYTES, 0xC093
    VMWRITE_VALUE GUEST_ES_LIMIT, 0xFFFFFFFF
    VMWRITE_VALUE GUEST_FS_AR_BYTES, 0x10000
    VMWRITE_VALUE GUEST_GS_AR_BYTES, 0x10000
    VMWRITE_VALUE GUEST_LDTR_AR_BYTES, 0x10000
    VMWRITE_VALUE GUEST_TR_SELECTOR, GUEST_TSS_SELECTOR
    VMWRITE_VALUE GUEST_TR_AR_BYTES, 0x8B
    VMWRITE_VALUE GUEST_TR_LIMIT, 0x67
    VMWRITE_VALUE GUEST_TR_BASE, GUEST_TSS
    VMWRITE_VALUE GUEST_GDTR_BASE, GUEST_GDT
    VMWRITE_VALUE GUEST_GDTR_LIMIT, 0x27
    VMWRITE_VALUE GUEST_IDTR_LIMIT, 0xFFFF
    VMWRITE_VALUE GUEST_RFLAGS, RFLAGS_FIXED1
    VMWRITE_VALUE GUEST_DR7, 0x400
    mov rax, VMCS_FIELD_GUEST_RIP
    vmwrite rax, [r13 + GUEST_DESCRIPTOR_ENTRY]
    mov rcx, [rbp + HV1_PARTITION_MEMORY_SIZE]
    mov rbx, r14
    imul rbx, rbx, GUEST_VP_STACK_SIZE
    sub rcx, rbx
    VMWRITE_REGISTER GUEST_RSP, rcx
    ; Host state: the hypervisor as it runs on the VP's LP.
    mov rbx, cr0
    VMWRITE_REGISTER HOST_CR0, rbx
    mov rbx, cr3
    VMWRITE_REGISTER HOST_CR3, rbx
    mov rbx, cr4
    VMWRITE_REGISTER HOST_CR4, rbx
    VMWRITE_VALUE HOST_CS_SELECTOR, HV_CODE
    VMWRITE_VALUE HOST_SS_SELECTOR, HV_DATA
    VMWRITE_VALUE HOST_DS_SELECTOR, HV_DATA
    VMWRITE_VALUE HOST_ES_SELECTOR, HV_DATA
    VMWRITE_VALUE HOST_TR_SELECTOR, HV_TSS
    lea rbx, [rip + hv_tss]
    VMWRITE_REGISTER HOST_TR_BASE, rbx
    lea rbx, [rip + hv_gdt]
    VMWRITE_REGISTER HOST_GDTR_BASE, rbx
    lea rbx, [rip + hv_idt]
    VMWRITE_REGISTER HOST_IDTR_BASE, rbx
    lea rbx, [rip + vm_exit]
    VMWRITE_REGISTER HOST_RIP, rbx
    mov ebx, [rsi + HV1_VP_LP]
    inc rbx
    imul rbx, rbx, LP_STACK_SIZE
    mov rcx, HEAP_BASE - HOST_STACK_OFFSET
    add rbx, rcx
    VMWRITE_REGISTER HOST_RSP, rbx
    ; Written back to RAM, so any LP may load it (SDM Vol. 3C 25.11.1).
    push qword ptr [rsi + HV1_VP_VMCS]
    vmclear [rsp]
    pop rax
    ret

; --- the scheduler: the next runnable VP of this LP, round robin ------------------------------------
schedule:
    call due_wakeup                          ; a halted VP whose tick is due runs first
    jnc schedule.round_robin
    mov rbp, rsi
    lea rbx, [rip + lp_next]
    mov rdx, [rbx + r15 * 8]                 ; the round robin goes on where it was
    call timer_due                           ; makes the tick pending and re-arms the timer
    mov dword ptr [rbp + HV1_VP_HALTED], 0
    jmp run_vp
schedule.round_robin:
    mov rcx, [rip + vp_total]
    test rcx, rcx
    jz idle
    lea rbx, [rip + lp_next]
    mov rdx, [rbx + r15 * 8]                 ; the VP this LP ran last
    mov r8, rcx                              ; VPs left to look at
schedule.look:
    inc rdx
    cmp rdx, rcx
    jb schedule.in_range
    xor edx, edx
schedule.in_range:
    imul rbp, rdx, HV1_VP_SIZE
    lea rax, [rip + vps]
    add rbp, rax
    mov rdi, rbp
    call vp_may_run
    jne schedule.skip
    cmp dword ptr [rbp + HV1_VP_HALTED], 0   ; a halted VP waits for its tick (above)
    je run_vp
schedule.skip:
    dec r8
    jnz schedule.look
idle:
    cmp qword ptr [rip + running_partitions], 0
    jne idle.waiters
    mov al, 0                                ; every partition has ended: stop the machine
    out DEBUG_EXIT_PORT, al
idle.waiters:
    call earliest_wakeup                     ; halted VPs of this LP that a tick will wake
    jnc idle.halt
    pause
    jmp schedule
idle.halt:
    cli
    hlt
    jmp idle

; rdi = VP record: ZF = 1 if the VP is this LP's, runnable, and its partition is running.
; Clobbers r10.
vp_may_run:
    cmp [rdi + HV1_VP_LP], r15d
    jne vp_may_run.done
    cmp dword ptr [rdi + HV1_VP_STATE], VP_RUNNABLE
    jne vp_may_run.done
    mov r10, [rdi + HV1_VP_PARTITION]
    cmp dword ptr [r10 + HV1_PARTITION_STATE], PARTITION_RUNNING
vp_may_run.done:
    ret

; The earliest wake-up among this LP's halted VPs that a tick will wake (timer running, VP
; runnable, partition running): CF = 1, rax = its deadline, rsi = the VP's record; CF = 0 if there
; is none. Clobbers rcx, rdi, r10.
earliest_wakeup:
    mov rax, NO_DEADLINE
    xor ecx, ecx                             ; VP number
    lea rdi, [rip + vps]
earliest_wakeup.next:
    cmp rcx, [rip + vp_total]
    jae earliest_wakeup.done
    cmp dword ptr [rdi + HV1_VP_HALTED], 0
    je earliest_wakeup.skip
    cmp qword ptr [rdi + HV1_VP_TIMER_PERIOD], 0
    je earliest_wakeup.skip
    call vp_may_run
    jne earliest_wakeup.skip
    cmp [rdi + HV1_VP_TIMER_DEADLINE], rax
    jae earliest_wakeup.skip
    mov rax, [rdi + HV1_VP_TIMER_DEADLINE]
    mov rsi, rdi
earliest_wakeup.skip:
    add rdi, HV1_VP_SIZE
    inc rcx
    jmp earliest_wakeup.next
earliest_wakeup.done:
    cmp rax, NO_DEADLINE                     ; CF = 1 exactly when a deadline was found
    ret

; rax = the LP's virtual time (docs/machine.md: the low half latches the high half).
read_clock:
    push rcx
    push rdx
    mov dx, CLOCK_LOW_PORT
    in eax, dx
    mov ecx, eax
    mov dx, CLOCK_HIGH_PORT
    in eax, dx
    shl rax, 32
    or rax, rcx
    pop rdx
    pop rcx
    ret

; rbp = VP: CF = 1 if its timer runs and its deadline has passed (then it is re-armed and its tick
; made pending).
timer_due:
    cmp qword ptr [rbp + HV1_VP_TIMER_PERIOD], 0
    je timer_due.no
    call read_clock
    cmp rax, [rbp + HV1_VP_TIMER_DEADLINE]
    jb timer_due.no
    mov dword ptr [rbp + HV1_VP_TIMER_PENDING], 1
    mov rcx, [rbp + HV1_VP_TIMER_DEADLINE]
    add rcx, [rbp + HV1_VP_TIMER_PERIOD]
    cmp rcx, rax
    ja timer_due.armed
    mov rcx, rax                             ; a long wait does not queue a burst of ticks
    add rcx, [rbp + HV1_VP_TIMER_PERIOD]
timer_due.armed:
    mov [rbp + HV1_VP_TIMER_DEADLINE], rcx
    stc
    ret
timer_due.no:
    clc
    ret

; Before an entry (rbp = VP, its VMCS current): a due tick is injected as an external interrupt if
; the guest can take one now, else interrupt-window exiting asks for the moment it can
; (SDM Vol. 3C 26.7.5, 27.6).
deliver_timer:
    call timer_due
    cmp dword ptr [rbp + HV1_VP_TIMER_PENDING], 0
    je deliver_timer.done
    mov rax, VMCS_FIELD_VM_ENTRY_INTR_INFO_FIELD
    vmread rbx, rax
    test ebx, INTR_INFO_VALID
    jnz deliver_timer.done                   ; another event goes first; the tick waits
    mov rax, VMCS_FIELD_GUEST_RFLAGS
    vmread rbx, rax
    test rbx, RFLAGS_IF
    jz deliver_timer.window
    mov rax, VMCS_FIELD_GUEST_INTERRUPTIBILITY_INFO
    vmread rbx, rax
    test rbx, BLOCKING_BY_STI_OR_MOV_SS
    jnz deliver_timer.window
    mov ebx, [rbp + HV1_VP_TIMER_VECTOR]
    or ebx, INTR_INFO_VALID | (INTR_TYPE_EXTERNAL_INTERRUPT << INTR_INFO_TYPE_SHIFT)
    mov rax, VMCS_FIELD_VM_ENTRY_INTR_INFO_FIELD
    vmwrite rax, rbx
    mov dword ptr [rbp + HV1_VP_TIMER_PENDING], 0
    xor ecx, ecx                             ; delivered: no window needed
    jmp deliver_timer.controls
deliver_timer.window:
    mov rcx, PROC_INTERRUPT_WINDOW_EXITING
deliver_timer.controls:
    mov rax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    vmread rbx, rax
    mov rdx, rbx
    and rbx, ~PROC_INTERRUPT_WINDOW_EXITING
    or rbx, rcx
    cmp rbx, rdx
    je deliver_timer.done                    ; unchanged: no write (a write costs a full entry check)
    vmwrite rax, rbx
deliver_timer.done:
    ret

; CF = 1 if a halted VP of this LP has its tick due now: rsi = its record.
due_wakeup:
    call earliest_wakeup
    jnc due_wakeup.done
    mov rcx, rax
    call read_clock
    cmp rax, rcx
    cmc                                      ; CF = 1 when now >= deadline
due_wakeup.done:
    ret

; Before an entry (rbp = VP, its VMCS current): the preemption timer ends the entry at the first of
; the VP's slice end, its own next tick and the next tick of a halted VP on this LP. These are LP
; times, which count hv1's instructions too, while the timer counts only the guest's (rate 0,
; IA32_VMX_MISC; SDM Vol. 3C 26.5.1): so it is set anew at every entry.
set_slice:
    call earliest_wakeup                     ; rax = NO_DEADLINE if there is none
    cmp rax, [rbp + HV1_VP_SLICE_END]
    jb set_slice.own_tick
    mov rax, [rbp + HV1_VP_SLICE_END]
set_slice.own_tick:
    cmp qword ptr [rbp + HV1_VP_TIMER_PERIOD], 0
    je set_slice.chosen
    cmp rax, [rbp + HV1_VP_TIMER_DEADLINE]
    jbe set_slice.chosen
    mov rax, [rbp + HV1_VP_TIMER_DEADLINE]
set_slice.chosen:
    mov rcx, rax
    call read_clock
    sub rcx, rax                             ; ticks left
    ja set_slice.write
    mov ecx, 1                               ; already due: exit at once
set_slice.write:
    VMWRITE_REGISTER VMX_PREEMPTION_TIMER_VALUE, rcx
    ret

; Before every entry (rbp = VP, its VMCS current): the VP's due tick delivered and its slice bounded
; by the ticks on this LP. An LP where no timer runs has neither to do: its slices are the
; preemption timer as run_vp set it and as each exit saved it.
timers_before_entry:
    lea rax, [rip + lp_timer_vps]
    cmp qword ptr [rax + r15 * 8], 0
    je timers_before_entry.none
    call deliver_timer
    jmp set_slice
timers_before_entry.none:
    ret

; rbp = the VP's record, rdx = the round robin's new position (the VP's number; a VP woken by its
; tick leaves the position where it was)
run_vp:
    lea rbx, [rip + lp_next]
    mov [rbx + r15 * 8], rdx
    lea rbx, [rip + lp_current]
    mov [rbx + r15 * 8], rbp
    push qword ptr [rbp + HV1_VP_VMCS]
    vmptrld [rsp]
    pop rax
    jbe entry_failed
    VMWRITE_VALUE VMX_PREEMPTION_TIMER_VALUE, HV1_QUANTUM
    call read_clock
    add rax, HV1_QUANTUM
    mov [rbp + HV1_VP_SLICE_END], rax
    cmp dword ptr [rbp + HV1_VP_LAUNCHED], 0
    jne resume_vp
    mov dword ptr [rbp + HV1_VP_LAUNCHED], 1
    call timers_before_entry
    call load_guest_registers
    vmlaunch
    jmp entry_failed

resume_vp:
    call timers_before_entry
    call load_guest_registers
    vmresume
entry_failed:
    lea rbx, [rip + lp_current]
    mov rbp, [rbx + r15 * 8]
    mov ebx, PARTITION_STOP_ENTRY_FAILED
    jmp stop_partition

; Loads the guest's general registers from the VP record (rbp); rbp itself last.
load_guest_registers:
    mov rax, [rbp + HV1_VP_RAX]
    mov rbx, [rbp + HV1_VP_RBX]
    mov rcx, [rbp + HV1_VP_RCX]
    mov rdx, [rbp + HV1_VP_RDX]
    mov rsi, [rbp + HV1_VP_RSI]
    mov rdi, [rbp + HV1_VP_RDI]
    mov r8, [rbp + HV1_VP_R8]
    mov r9, [rbp + HV1_VP_R9]
    mov r10, [rbp + HV1_VP_R10]
    mov r11, [rbp + HV1_VP_R11]
    mov r12, [rbp + HV1_VP_R12]
    mov r13, [rbp + HV1_VP_R13]
    mov r14, [rbp + HV1_VP_R14]
    mov r15, [rbp + HV1_VP_R15]
    mov rbp, [rbp + HV1_VP_RBP]
    ret

; --- VM exits (SDM Vol. 3C 28) ---------------------------------------------------------------------
vm_exit:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov r15, [rsp + SAVED_GPRS * GPR_BYTES + HOST_STACK_OFFSET - LP_INDEX_SLOT]
    lea rbx, [rip + lp_current]
    mov rbp, [rbx + r15 * 8]
    mov rax, [rsp + 0 * GPR_BYTES]
    mov [rbp + HV1_VP_R15], rax
    mov rax, [rsp + 1 * GPR_BYTES]
    mov [rbp + HV1_VP_R14], rax
    mov rax, [rsp + 2 * GPR_BYTES]
    mov [rbp + HV1_VP_R13], rax
    mov rax, [rsp + 3 * GPR_BYTES]
    mov [rbp + HV1_VP_R12], rax
    mov rax, [rsp + 4 * GPR_BYTES]
    mov [rbp + HV1_VP_R11], rax
    mov rax, [rsp + 5 * GPR_BYTES]
    mov [rbp + HV1_VP_R10], rax
    mov rax, [rsp + 6 * GPR_BYTES]
    mov [rbp + HV1_VP_R9], rax
    mov rax, [rsp + 7 * GPR_BYTES]
    mov [rbp + HV1_VP_R8], rax
    mov rax, [rsp + 8 * GPR_BYTES]
    mov [rbp + HV1_VP_RBP], rax
    mov rax, [rsp + 9 * GPR_BYTES]
    mov [rbp + HV1_VP_RDI], rax
    mov rax, [rsp + 10 * GPR_BYTES]
    mov [rbp + HV1_VP_RSI], rax
    mov rax, [rsp + 11 * GPR_BYTES]
    mov [rbp + HV1_VP_RDX], rax
    mov rax, [rsp + 12 * GPR_BYTES]
    mov [rbp + HV1_VP_RCX], rax
    mov rax, [rsp + 13 * GPR_BYTES]
    mov [rbp + HV1_VP_RBX], rax
    mov rax, [rsp + 14 * GPR_BYTES]
    mov [rbp + HV1_VP_RAX], rax
    add rsp, SAVED_GPRS * GPR_BYTES
    mov rax, VMCS_FIELD_VM_EXIT_REASON
    vmread rbx, rax
    cmp ebx, EXIT_REASON_CPUID
    je exit_cpuid
    cmp ebx, EXIT_REASON_IO_INSTRUCTION
    je exit_io
    cmp ebx, EXIT_REASON_VMCALL
    je exit_vmcall
    cmp ebx, EXIT_REASON_HLT
    je exit_hlt
    cmp ebx, EXIT_REASON_PREEMPTION_TIMER
    je exit_preemption_timer
    cmp ebx, EXIT_REASON_INTERRUPT_WINDOW
    je exit_interrupt_window
    cmp ebx, EXIT_REASON_VMCALLR
    je inject_invalid_opcode
    cmp ebx, EXIT_REASON_VMCLEAR
    jb vm_exit.not_vmx
    cmp ebx, EXIT_REASON_VMXON
    jbe inject_invalid_opcode
vm_exit.not_vmx:
    cmp ebx, EXIT_REASON_INVEPT
    je inject_invalid_opcode
    cmp ebx, EXIT_REASON_INVVPID
    je inject_invalid_opcode
    jmp stop_partition                       ; triple fault, EPT violation, anything else: ebx = reason

; VMX instructions and VMCALLR in a guest: #UD, delivered on the next entry (SDM Vol. 3C 27.6).
inject_invalid_opcode:
    VMWRITE_VALUE VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID | (INTR_TYPE_HARDWARE_EXCEPTION << INTR_INFO_TYPE_SHIFT) | VECTOR_UD
    jmp resume_vp

advance_rip:
    mov rax, VMCS_FIELD_GUEST_RIP
    vmread rcx, rax
    mov rax, VMCS_FIELD_VM_EXIT_INSTRUCTION_LEN
    vmread rdx, rax
    add rcx, rdx
    mov rax, VMCS_FIELD_GUEST_RIP
    vmwrite rax, rcx
    ret

; The preemption timer: the slice is over (the next VP runs) or a tick is due: a halted VP's (the
; scheduler wakes it) or this VP's own (resume_vp delivers it).
exit_preemption_timer:
    lea rax, [rip + lp_timer_vps]
    cmp qword ptr [rax + r15 * 8], 0
    je schedule                              ; no timer on this LP: the slice is over
    call read_clock
    cmp rax, [rbp + HV1_VP_SLICE_END]
    jae schedule
    call due_wakeup
    jc schedule
    jmp resume_vp

; HLT: the VP idles until its timer wakes it (a VP without a timer sleeps for good).
exit_hlt:
    call advance_rip
    mov dword ptr [rbp + HV1_VP_HALTED], 1
    jmp schedule

; The guest can take an interrupt now: resume_vp injects the waiting tick (if the timer was stopped
; meanwhile, none waits, and the window is simply closed).
exit_interrupt_window:
    mov rax, VMCS_FIELD_CPU_BASED_VM_EXEC_CONTROL
    vmread rbx, rax
    and rbx, ~PROC_INTERRUPT_WINDOW_EXITING  ; off: deliver_timer asks again if a tick still waits
    vmwrite rax, rbx
    jmp resume_vp

; CPUID: the fixed answers of hypervisors/invariants.py.
exit_cpuid:
    mov eax, [rbp + HV1_VP_RAX]
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    cmp eax, 0
    je exit_cpuid.vendor
    cmp eax, 1
    je exit_cpuid.features
    cmp eax, HV_CPUID_HYPERVISOR_BASE
    je exit_cpuid.hypervisor
    cmp eax, HV_CPUID_MAX_HYPERVISOR_LEAF
    je exit_cpuid.version
    xor eax, eax
    jmp exit_cpuid.answer
exit_cpuid.vendor:
    mov eax, HV_CPUID_MAX_BASIC_LEAF
    jmp exit_cpuid.vendor_words
exit_cpuid.hypervisor:
    mov eax, HV_CPUID_MAX_HYPERVISOR_LEAF
exit_cpuid.vendor_words:
    mov ebx, HV_CPUID_VENDOR_EBX
    mov edx, HV_CPUID_VENDOR_EDX
    mov ecx, HV_CPUID_VENDOR_ECX
    jmp exit_cpuid.answer
exit_cpuid.features:
    mov eax, HV_CPUID_FAMILY_MODEL
    mov ebx, [rbp + HV1_VP_INDEX]
    shl ebx, HV_CPUID_APIC_ID_SHIFT
    mov rsi, [rbp + HV1_VP_PARTITION]
    mov ecx, [rsi + HV1_PARTITION_VP_COUNT]
    shl ecx, HV_CPUID_VP_COUNT_SHIFT
    or ebx, ecx
    mov ecx, HV_CPUID_LEAF1_ECX
    mov edx, HV_CPUID_LEAF1_EDX
    jmp exit_cpuid.answer
exit_cpuid.version:
    mov eax, HV1_VERSION
exit_cpuid.answer:
    mov [rbp + HV1_VP_RAX], rax              ; 32-bit results zero-extend, as CPUID's do
    mov [rbp + HV1_VP_RBX], rbx
    mov [rbp + HV1_VP_RCX], rcx
    mov [rbp + HV1_VP_RDX], rdx
    call advance_rip
    jmp resume_vp

; I/O: COM1 and the exit port per partition, the clock passed through, the rest a default
; (IN reads all ones, OUT is ignored). Exit qualification per SDM Vol. 3C Table 28-5.
exit_io:
    mov rax, VMCS_FIELD_EXIT_QUALIFICATION
    vmread r8, rax
    test r8, IO_QUAL_STRING
    jnz exit_io.string
    mov r9, r8
    shr r9, IO_QUAL_PORT_SHIFT
    and r9, 0xFFFF                           ; port
    test r8, IO_QUAL_DIRECTION_IN
    jnz exit_io.in
    cmp r9, COM1_BASE
    je exit_io.putc
    cmp r9, DEBUG_EXIT_PORT
    je exit_io.exit_code
    jmp exit_io.done
exit_io.putc:
    mov rsi, [rbp + HV1_VP_PARTITION]
    mov eax, [rsi + HV1_PARTITION_CHANNEL]
    mov dx, CONSOLE_CHANNEL_PORT
    out dx, eax
    mov rax, [rbp + HV1_VP_RAX]
    mov dx, COM1_BASE
    out dx, al
    jmp exit_io.done
exit_io.exit_code:
    mov rsi, [rbp + HV1_VP_PARTITION]
    mov eax, PARTITION_RUNNING
    mov ecx, PARTITION_EXITED
    lock cmpxchg [rsi + HV1_PARTITION_STATE], ecx
    jne exit_io.ended_before                 ; another of its VPs ended it first
    movzx eax, byte ptr [rbp + HV1_VP_RAX]
    mov [rsi + HV1_PARTITION_EXIT_CODE], eax
    call partition_ended
exit_io.ended_before:
    call advance_rip
    jmp schedule
exit_io.in:
    mov eax, 0xFFFFFFFF
    cmp r9, COM1_BASE + UART_LSR
    jne exit_io.not_lsr
    mov eax, LSR_READY
    jmp exit_io.result
exit_io.not_lsr:
    cmp r9, COM1_BASE
    jb exit_io.not_com1
    cmp r9, COM1_BASE + 7
    ja exit_io.not_com1
    xor eax, eax
    jmp exit_io.result
exit_io.not_com1:
    cmp r9, CLOCK_LOW_PORT
    je exit_io.clock
    cmp r9, CLOCK_HIGH_PORT
    jne exit_io.result
exit_io.clock:
    mov dx, r9w
    in eax, dx
exit_io.result:
    mov rcx, r8
    and rcx, IO_QUAL_SIZE_MASK               ; size - 1: 0, 1 or 3
    mov rdx, [rbp + HV1_VP_RAX]
    cmp rcx, 0
    jne exit_io.not_byte
    mov dl, al
    mov rax, rdx
    jmp exit_io.store
exit_io.not_byte:
    cmp rcx, 1
    jne exit_io.store                               ; 32-bit IN zero-extends into RAX
    mov dx, ax
    mov rax, rdx
exit_io.store:
    mov [rbp + HV1_VP_RAX], rax
exit_io.done:
    call advance_rip
    jmp resume_vp
exit_io.string:
    mov ebx, EXIT_REASON_IO_INSTRUCTION      ; string I/O is not served: the partition stops
    jmp stop_partition

; Hypercalls: RAX = number, RDI, RSI = arguments, RAX = result (docs/hv1.md).
exit_vmcall:
    mov rax, [rbp + HV1_VP_RAX]
    cmp rax, HC_VERSION
    je exit_vmcall.version
    cmp rax, HC_YIELD
    je exit_vmcall.yield
    cmp rax, HC_CLOCK
    je exit_vmcall.clock
    cmp rax, HC_CONSOLE_WRITE
    je exit_vmcall.console_write
    cmp rax, HC_SET_TIMER
    je exit_vmcall.set_timer
    cmp rax, HC_MAP_PAGE
    je exit_vmcall.map_page
    cmp rax, HC_UNMAP_PAGE
    je exit_vmcall.unmap_page
    mov rax, ENOSYS
    jmp exit_vmcall.result
exit_vmcall.version:
    mov eax, HV1_VERSION
    jmp exit_vmcall.result
exit_vmcall.yield:
    mov qword ptr [rbp + HV1_VP_RAX], 0
    call advance_rip
    jmp schedule
exit_vmcall.clock:
    call read_clock
    jmp exit_vmcall.result
exit_vmcall.console_write:
    mov rdi, [rbp + HV1_VP_RDI]              ; guest-physical buffer
    mov rcx, [rbp + HV1_VP_RSI]              ; length
    mov rax, EINVAL
    cmp rcx, CONSOLE_WRITE_MAX
    ja exit_vmcall.result
    mov rsi, [rbp + HV1_VP_PARTITION]
    mov rdx, [rsi + HV1_PARTITION_MEMORY_SIZE]
    cmp rdi, rdx
    jae exit_vmcall.result
    sub rdx, rdi
    cmp rcx, rdx
    ja exit_vmcall.result                               ; the buffer must lie inside the guest's RAM
    add rdi, [rsi + HV1_PARTITION_MEMORY]
    mov eax, [rsi + HV1_PARTITION_CHANNEL]
    mov dx, CONSOLE_CHANNEL_PORT
    out dx, eax
    mov dx, COM1_BASE
exit_vmcall.byte:
    test rcx, rcx
    jz exit_vmcall.written
    mov al, [rdi]
    out dx, al
    inc rdi
    dec rcx
    jmp exit_vmcall.byte
exit_vmcall.set_timer:
    mov rdi, [rbp + HV1_VP_RDI]              ; period in ticks, 0 to stop
    mov rsi, [rbp + HV1_VP_RSI]              ; vector
    mov rax, EINVAL
    test rdi, rdi
    jz exit_vmcall.timer_checked
    cmp rdi, TIMER_MIN_PERIOD
    jb exit_vmcall.result
    cmp rsi, FIRST_INTERRUPT_VECTOR
    jb exit_vmcall.result
    cmp rsi, LAST_INTERRUPT_VECTOR
    ja exit_vmcall.result
exit_vmcall.timer_checked:
    lea rcx, [rip + lp_timer_vps]
    lea rcx, [rcx + r15 * 8]                 ; this LP's count of running timers
    cmp qword ptr [rbp + HV1_VP_TIMER_PERIOD], 0
    je exit_vmcall.was_stopped
    dec qword ptr [rcx]
exit_vmcall.was_stopped:
    test rdi, rdi
    jz exit_vmcall.counted
    inc qword ptr [rcx]
exit_vmcall.counted:
    mov [rbp + HV1_VP_TIMER_PERIOD], rdi
    mov [rbp + HV1_VP_TIMER_VECTOR], esi
    mov dword ptr [rbp + HV1_VP_TIMER_PENDING], 0
    call read_clock
    add rax, rdi
    mov [rbp + HV1_VP_TIMER_DEADLINE], rax
    jmp exit_vmcall.written
exit_vmcall.map_page:
    lea r12, [rip + map_page]
    jmp exit_vmcall.window
exit_vmcall.unmap_page:
    lea r12, [rip + unmap_page]
exit_vmcall.window:                          ; r12 = map_page or unmap_page
    call window_argument
    jc exit_vmcall.result
    mov rbx, [rbp + HV1_VP_PARTITION]
    call lock_memory
    call r12
    call unlock_memory
    jmp exit_vmcall.result
exit_vmcall.written:
    xor eax, eax
exit_vmcall.result:
    mov [rbp + HV1_VP_RAX], rax
    call advance_rip
    jmp resume_vp

; rbp = VP, ebx = why: its partition stops for good; the LP goes on with other VPs.
stop_partition:
    mov rsi, [rbp + HV1_VP_PARTITION]
    mov eax, PARTITION_RUNNING
    mov ecx, PARTITION_STOPPED
    lock cmpxchg [rsi + HV1_PARTITION_STATE], ecx
    jne schedule                             ; it had ended already (another of its VPs, another LP)
    mov [rsi + HV1_PARTITION_STOP_REASON], ebx
    call partition_ended
    jmp schedule

; rsi = a partition that has just left PARTITION_RUNNING: one partition fewer runs, and the pages of
; its map window go back to the pool.
partition_ended:
    lock dec qword ptr [rip + running_partitions]
    mov rbx, rsi
    call lock_memory
    call release_map_window
    call unlock_memory
    ret

; --- failures of the hypervisor itself --------------------------------------------------------------
panic_interrupt:
panic:
    mov dx, CONSOLE_CHANNEL_PORT
    xor eax, eax
    out dx, eax
    lea rsi, [rip + panic_message]
    mov dx, COM1_BASE
panic.print:
    mov al, [rsi]
    test al, al
    jz panic.stop
    out dx, al
    inc rsi
    jmp panic.print
panic.stop:
    mov al, PANIC_EXIT
    out DEBUG_EXIT_PORT, al
    cli
    hlt

; --- data ----------------------------------------------------------------------------------------------
panic_message:
    .asciz "hv1: panic\n"
.align 16
hv_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF                 ; HV_CODE: 64-bit code
    .quad 0x00CF92000000FFFF                 ; HV_DATA
    .quad 0                                  ; HV_TSS: filled by build_tables (16 bytes)
    .quad 0
hv_gdt_end:
.align 16
hv_gdtr:
    .word hv_gdt_end - hv_gdt - 1
    .quad hv_gdt
.align 16
hv_idtr:
    .word GATE_COUNT * GATE_BYTES - 1
    .quad hv_idt
.align 16
hv_tss:
    .zero 0x68
.align 16
hv_idt:
    .zero GATE_COUNT * GATE_BYTES
.align 8
boot_info: .quad 0
boot_done: .quad 0
hv_cr3: .quad 0                              ; hv1's PML4 (build_page_tables)
heap_next: .quad 0
free_next: .quad 0
free_end: .quad 0
frame_table: .quad 0                         ; the page-ownership database: HV1_FRAME records
frame_count: .quad 0
pool_frame: .quad 0                          ; the split frame the map pool took a page from last
memory_lock: .quad 0                         ; bit 0: held (lock_memory)
partition_count: .quad 0
running_partitions: .quad 0
vp_total: .quad 0
lp_current: .zero MAX_LPS * 8
lp_next: .zero MAX_LPS * 8
lp_timer_vps: .zero MAX_LPS * 8              ; VPs of each LP whose timer runs (the LP's own count)
partitions: .zero MAX_PARTITIONS * HV1_PARTITION_SIZE
vps: .zero MAX_VPS * HV1_VP_SIZE
