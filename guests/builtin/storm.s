; storm: maps and unmaps pages of the map window by hypercall, in a loop (docs/guests.md, Map
; window). Each VP owns SLOTS_PER_VP slots, a page each, scattered over the window. ROUNDS times it
; picks one of its slots with a xorshift64 generator: a free slot is mapped, must read all zero, and
; gets a tag in its first qword (its complement in the last); a mapped slot must still hold its tag,
; and is unmapped. VP 0 also checks the errors of bad arguments first; at the end it waits for the
; other VPs, maps pages from the top of the window until the partition's quota says ENOMEM, and
; prints a line per VP (maps, unmaps, slots left mapped, the sum of their tags) and the quota line.
; The test recomputes every figure. Exit code 0 when every check passed, else the number of the
; first failed check. Pages left mapped go back to the pool when the partition ends.
%define ROUNDS 1500
%define SLOTS_PER_VP 200
%define MAX_STORM_VPS 8
%define SLOT_STRIDE_PAGES 4099         ; odd, so slot pages are distinct (the window has 2^18 pages)
%define WINDOW_PAGE_MASK (MAP_WINDOW_SIZE / PAGE_BYTES - 1)
%define PAGE_BYTES 4096
%define PAGE_QWORDS 512
%define LAST_QWORD (PAGE_BYTES - 8)
%define SEED 0x9E3779B97F4A7C15
%define TAG_SLOT_SHIFT 32              ; tag = global slot number << 32 | round (from 1)
%define PROBE_PAGE (MAP_WINDOW_BASE + MAP_WINDOW_SIZE - PAGE_BYTES)   ; no VP's slot
%define RESULT_BYTES 32                ; maps, unmaps, mapped, tag sum
%define WRONG_VP_COUNT 99
; check numbers (the exit code of the first that fails)
%define CHECK_MAP 1
%define CHECK_ZERO 2
%define CHECK_TAG 3
%define CHECK_UNMAP 4
%define CHECK_PROBE_MAP 5
%define CHECK_EEXIST 6
%define CHECK_PROBE_UNMAP 7
%define CHECK_ENOENT 8
%define CHECK_UNALIGNED 9
%define CHECK_IN_RAM 10
%define CHECK_PAST_WINDOW 11
%define CHECK_BELOW_WINDOW 12
%define CHECK_QUOTA 13

start:
    cmp rsi, MAX_STORM_VPS
    ja wrong_vp_count
    mov r12, rdi                       ; VP index
    mov [rip + vp_count], rsi
    test r12, r12
    jnz storm
    call check_errors

; --- the storm: ROUNDS picks of this VP's slots --------------------------------------------------
storm:
    imul r13, r12, SLOTS_PER_VP * 8
    lea rax, [rip + tags]
    add r13, rax                       ; r13 = this VP's tags, one qword per slot (0: not mapped)
    imul r14, r12, RESULT_BYTES
    lea rax, [rip + results]
    add r14, rax                       ; r14 = this VP's result: maps, unmaps, mapped, tag sum
    mov rbx, SEED
    add rbx, r12                       ; rbx = the generator's state
    mov r15, 1                         ; round
storm.round:
    ; xorshift64 (Marsaglia 2003: 13, 7, 17)
    mov rax, rbx
    shl rax, 13
    xor rbx, rax
    mov rax, rbx
    shr rax, 7
    xor rbx, rax
    mov rax, rbx
    shl rax, 17
    xor rbx, rax
    mov rax, rbx
    xor edx, edx
    mov ecx, SLOTS_PER_VP
    div rcx                            ; rdx = the slot in this VP's set
    mov rbp, rdx
    imul rdi, r12, SLOTS_PER_VP
    add rdi, rbp                       ; the global slot number
    call slot_page                     ; rdi = its guest-physical page
    cmp qword ptr [r13 + rbp * 8], 0
    jne storm.unmap
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_MAP
    test rax, rax
    jnz fail
    mov rsi, rdi                       ; a fresh page reads zero
    mov ecx, PAGE_QWORDS
    xor eax, eax
    cld
    repe scasq
    mov ecx, CHECK_ZERO
    jne fail
    imul rax, r12, SLOTS_PER_VP
    add rax, rbp
    shl rax, TAG_SLOT_SHIFT
    or rax, r15                        ; the tag
    mov [rsi], rax
    not rax
    mov [rsi + LAST_QWORD], rax
    not rax
    mov [r13 + rbp * 8], rax
    inc qword ptr [r14]
    jmp storm.next
storm.unmap:
    mov rax, [r13 + rbp * 8]
    mov ecx, CHECK_TAG
    cmp [rdi], rax
    jne fail
    not rax
    cmp [rdi + LAST_QWORD], rax
    jne fail
    mov eax, HC_UNMAP_PAGE
    vmcall
    mov ecx, CHECK_UNMAP
    test rax, rax
    jnz fail
    mov qword ptr [r13 + rbp * 8], 0
    inc qword ptr [r14 + 8]
storm.next:
    inc r15
    cmp r15, ROUNDS
    jbe storm.round
    ; the slots left mapped and the sum of their tags
    xor ecx, ecx
storm.count:
    mov rax, [r13 + rcx * 8]
    test rax, rax
    jz storm.count_next
    inc qword ptr [r14 + 16]
    add [r14 + 24], rax
storm.count_next:
    inc rcx
    cmp rcx, SLOTS_PER_VP
    jb storm.count
    lock inc qword ptr [rip + vps_done]
    test r12, r12
    jnz halt_forever                   ; VP 0 goes on to the report

; --- VP 0: the report, after every VP's storm -------------------------------------------------------
report:
    mov rax, [rip + vps_done]
    cmp rax, [rip + vp_count]
    jae report.quota
    pause
    jmp report
report.quota:
    call fill_quota
    xor r12d, r12d
report.vp:
    lea rsi, [rip + vp_text]
    call print
    mov rax, r12
    call print_decimal
    imul r14, r12, RESULT_BYTES
    lea rax, [rip + results]
    add r14, rax
    lea rsi, [rip + maps_text]
    call print
    mov rax, [r14]
    call print_decimal
    lea rsi, [rip + unmaps_text]
    call print
    mov rax, [r14 + 8]
    call print_decimal
    lea rsi, [rip + mapped_text]
    call print
    mov rax, [r14 + 16]
    call print_decimal
    lea rsi, [rip + sum_text]
    call print
    mov rax, [r14 + 24]
    call print_decimal
    call print_newline
    inc r12
    cmp r12, [rip + vp_count]
    jb report.vp
    lea rsi, [rip + quota_text]
    call print
    mov rax, [rip + quota_maps]
    call print_decimal
    lea rsi, [rip + quota_end_text]
    call print
    xor eax, eax
    jmp exit_guest

; Maps pages down from the top of the window until ENOMEM: with the slots left mapped, exactly
; MAP_QUOTA_PAGES. Pages of slots answer EEXIST and are passed over.
fill_quota:
    xor r13d, r13d                     ; mapped here
    xor r14d, r14d                     ; slots left mapped, all VPs
    xor ecx, ecx
fill_quota.sum:
    imul rax, rcx, RESULT_BYTES
    lea rdx, [rip + results]
    add r14, [rdx + rax + 16]
    inc rcx
    cmp rcx, [rip + vp_count]
    jb fill_quota.sum
    mov rdi, PROBE_PAGE
fill_quota.page:
    mov eax, HC_MAP_PAGE
    vmcall
    cmp rax, ENOMEM
    je fill_quota.full
    cmp rax, EEXIST
    je fill_quota.next
    mov ecx, CHECK_QUOTA
    test rax, rax
    jnz fail
    inc r13
fill_quota.next:
    sub rdi, PAGE_BYTES
    jmp fill_quota.page
fill_quota.full:
    mov [rip + quota_maps], r13
    add r13, r14
    mov ecx, CHECK_QUOTA
    cmp r13, MAP_QUOTA_PAGES
    jne fail
    ret

; rdi = a global slot number: rdi = its page, SLOT_STRIDE_PAGES pages after the last slot's,
; around the window. Clobbers rax.
slot_page:
    imul rdi, rdi, SLOT_STRIDE_PAGES
    and rdi, WINDOW_PAGE_MASK
    shl rdi, 12
    mov rax, MAP_WINDOW_BASE
    add rdi, rax
    ret

; The errors of docs/guests.md, and a map that a second map and unmap see.
check_errors:
    mov rdi, PROBE_PAGE
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_PROBE_MAP
    test rax, rax
    jnz fail
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_EEXIST
    cmp rax, EEXIST
    jne fail
    mov eax, HC_UNMAP_PAGE
    vmcall
    mov ecx, CHECK_PROBE_UNMAP
    test rax, rax
    jnz fail
    mov eax, HC_UNMAP_PAGE
    vmcall
    mov ecx, CHECK_ENOENT
    cmp rax, ENOENT
    jne fail
    inc rdi                            ; not page aligned
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_UNALIGNED
    cmp rax, EINVAL
    jne fail
    lea rdi, [rip + start]             ; guest RAM is not the window
    and rdi, -PAGE_BYTES
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_IN_RAM
    cmp rax, EINVAL
    jne fail
    mov rdi, MAP_WINDOW_BASE + MAP_WINDOW_SIZE
    mov eax, HC_MAP_PAGE
    vmcall
    mov ecx, CHECK_PAST_WINDOW
    cmp rax, EINVAL
    jne fail
    mov rdi, MAP_WINDOW_BASE - PAGE_BYTES
    mov eax, HC_UNMAP_PAGE
    vmcall
    mov ecx, CHECK_BELOW_WINDOW
    cmp rax, EINVAL
    jne fail
    ret

; ecx = the failed check: its number is the exit code.
fail:
    mov eax, ecx
    jmp exit_guest
wrong_vp_count:
    mov al, WRONG_VP_COUNT
    jmp exit_guest

%include "console.inc"

vp_text:
    .asciz "storm vp "
maps_text:
    .asciz ": maps "
unmaps_text:
    .asciz " unmaps "
mapped_text:
    .asciz " mapped "
sum_text:
    .asciz " tag sum "
quota_text:
    .asciz "storm quota: "
quota_end_text:
    .asciz " more pages, then ENOMEM\n"
.align 8
vp_count:
    .quad 0
vps_done:
    .quad 0
quota_maps:
    .quad 0
results:
    .zero MAX_STORM_VPS * RESULT_BYTES
tags:
    .zero MAX_STORM_VPS * SLOTS_PER_VP * 8
