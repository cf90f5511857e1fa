; hv1: the first hypervisor of hhr (docs/hv1.md).
;
; Every LP enters at cold_entry (common/entry.inc; firmware hand-off, docs/boot.md). LP 0 builds a
; partition for each guest the boot info names (its RAM, EPT, page tables, GDT and one VMCS per
; virtual processor) while the other LPs wait; then every LP turns on VMX and runs the VPs assigned
; to it, round robin, preempted by the VMX-preemption timer.
;
; Most code is in hypervisors/common/, written against generic record names (VP_RAX, PARTITION_EPTP,
; FRAME_OWNER, PAGE_RECORD_OWNER) that build.py binds to hv1's layouts (HV1_VP, HV1_PARTITION,
; HV1_FRAME, HV1_PAGE). This file holds what is hv1's own: its scheduling policy and where its page
; records live.
;
; Registers the code keeps: r15 = this LP's index, rbp = the current VP's record.
; All structure offsets, VMCS encodings and VMX bits are constants generated from Python.

%include "defs.inc"
%include "contract.inc"                       ; the labels this file provides to the shared code
%include "entry.inc"

; --- hv1's policy ----------------------------------------------------------------------------------

; The next VP to run on this LP, round robin from the one it ran last: CF = 1, rbp = its record,
; rdx = its number; CF = 0 if none may run (halted VPs wait for an interrupt). Clobbers rax, rbx,
; rcx, rdi, r8, r10.
pick_vp:
    mov rcx, [rip + vp_total]
    test rcx, rcx
    jz pick_vp.none
    lea rbx, [rip + lp_next]
    mov rdx, [rbx + r15 * 8]                 ; the VP this LP ran last
    mov r8, rcx                              ; VPs left to look at
pick_vp.look:
    inc rdx
    cmp rdx, rcx
    jb pick_vp.in_range
    xor edx, edx
pick_vp.in_range:
    imul rbp, rdx, VP_SIZE
    mov rax, [rip + vps]
    add rbp, rax
    mov rdi, rbp
    call vp_may_run
    jne pick_vp.skip
    cmp dword ptr [rbp + VP_HALTED], 0       ; a halted VP waits for an interrupt (schedule)
    jne pick_vp.skip
    stc
    ret
pick_vp.skip:
    dec r8
    jnz pick_vp.look
pick_vp.none:
    clc
    ret

; rsi = a free frame the map pool splits: its 512 HV1_PAGE records go in the frame's own first page,
; which is then the hypervisor's. CF = 0. Clobbers rax, rbx, rcx, rdi.
split_frame_records:
    call frame_address
    mov rdi, rax
    push rax
    mov ecx, PAGE_SIZE / 8
    xor eax, eax
    cld
    rep stosq                                ; records start free (the frame may hold anything)
    pop rax
    mov dword ptr [rax + PAGE_RECORD_OWNER], OWNER_HYPERVISOR
    mov [rsi + FRAME_PAGES], rax
    mov word ptr [rsi + FRAME_FREE_PAGES], PAGES_PER_FRAME - 1
    mov word ptr [rsi + FRAME_FIRST_FREE], 1
    clc
    ret

; rdi = a page record the pool just gave out: hv1 keeps nothing more.
page_taken:
    ret

; rbp = a partition just made from the descriptor r13: hv1 keeps nothing more.
partition_created:
    ret

; rsi = a partition, rdi = the TR_PARTITION record being sent: what only hv1 keeps (nothing).
partition_to_record:
    ret

; rbp = a partition, rdi = a TR_PARTITION record received: what hv1 keeps of it beyond the shared fields.
partition_from_record:
    ret

panic_message:
    .asciz "hv1: panic\n"

%include "body.inc"
