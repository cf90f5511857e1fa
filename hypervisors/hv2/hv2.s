; hv2: the second hypervisor of hhr, a newer version of hv1 (docs/hv2.md).
;
; It boots like hv1 (common/entry.inc) and runs the same shared code, bound by build.py to its own
; record layouts, which differ from hv1's in shape and content: HV2_VP keeps the registers first and
; adds last_run and runs; HV2_PARTITION is reordered and keeps the guest's name; HV2_PAGE records
; are twice as large (mapped_at) and live in hv2's heap instead of in the frame they describe. Its
; policy differs where guests can tolerate it: the VP of an LP that has waited longest runs next,
; and time slices are longer (build.py).
;
; Registers the code keeps: r15 = this LP's index, rbp = the current VP's record.

%include "defs.inc"
%include "contract.inc"                       ; the labels this file provides to the shared code
%include "entry.inc"

%define RECORD_PAGES_PER_FRAME (PAGES_PER_FRAME * PAGE_RECORD_SIZE / PAGE_SIZE)

; --- hv2's policy ----------------------------------------------------------------------------------

; The VP of this LP that was picked longest ago (least last_run; ties to the lowest number): CF = 1,
; rbp = its record, rdx = its number; CF = 0 if none may run (halted VPs wait for an interrupt).
; Clobbers rax, rcx, rdi, r9, r10.
pick_vp:
    xor ecx, ecx                             ; VP number
    xor ebp, ebp                             ; the best so far (0: none yet)
    mov r9, NO_DEADLINE                      ; its last_run
    mov rdi, [rip + vps]
pick_vp.next:
    cmp rcx, [rip + vp_total]
    jae pick_vp.chosen
    call vp_may_run
    jne pick_vp.skip
    cmp dword ptr [rdi + VP_HALTED], 0       ; a halted VP waits for an interrupt (schedule)
    jne pick_vp.skip
    cmp [rdi + VP_LAST_RUN], r9
    jae pick_vp.skip
    mov r9, [rdi + VP_LAST_RUN]
    mov rbp, rdi
    mov rdx, rcx
pick_vp.skip:
    add rdi, VP_SIZE
    inc rcx
    jmp pick_vp.next
pick_vp.chosen:
    test rbp, rbp
    jz pick_vp.none
    call read_clock
    mov [rbp + VP_LAST_RUN], rax
    inc qword ptr [rbp + VP_RUNS]
    stc
    ret
pick_vp.none:
    clc
    ret

; rsi = a free frame the map pool splits: its 512 HV2_PAGE records come from hv2's heap, so all of
; the frame's pages serve the pool. CF = 1 when the heap is used up. Clobbers rax, rbx, rcx.
split_frame_records:
    mov ecx, RECORD_PAGES_PER_FRAME
    call alloc_pages                         ; zero: heap pages are never given back
    jc split_frame_records.done
    mov [rsi + FRAME_PAGES], rax
    mov word ptr [rsi + FRAME_FREE_PAGES], PAGES_PER_FRAME
    mov word ptr [rsi + FRAME_FIRST_FREE], 0
    clc
split_frame_records.done:
    ret

; rdi = a page record the pool just gave out: when (virtual time of this LP).
page_taken:
    push rax
    call read_clock
    mov [rdi + PAGE_RECORD_MAPPED_AT], rax
    pop rax
    ret

; rbp = a partition just made from the descriptor r13: it keeps the guest's name.
partition_created:
    mov rax, [r13 + GUEST_DESCRIPTOR_NAME]
    mov [rbp + PARTITION_NAME], rax
    mov rax, [r13 + GUEST_DESCRIPTOR_NAME + 8]
    mov [rbp + PARTITION_NAME + 8], rax
    ret

; rsi = a partition, rdi = the TR_PARTITION record being sent: what only hv2 keeps (the name).
partition_to_record:
    mov rax, [rsi + PARTITION_NAME]
    mov [rdi + TR_PARTITION_NAME], rax
    mov rax, [rsi + PARTITION_NAME + 8]
    mov [rdi + TR_PARTITION_NAME + 8], rax
    ret

; rbp = a partition, rdi = a TR_PARTITION record received: what hv2 keeps of it beyond the shared fields.
partition_from_record:
    mov rax, [rdi + TR_PARTITION_NAME]
    mov [rbp + PARTITION_NAME], rax
    mov rax, [rdi + TR_PARTITION_NAME + 8]
    mov [rbp + PARTITION_NAME + 8], rax
    ret

panic_message:
    .asciz "hv2: panic\n"

%include "body.inc"
