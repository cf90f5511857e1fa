; blkstream: streams blocks through the block device assigned to it (`--guest blkstream,device=blkN`,
; docs/machine.md 6.11), programming the device directly: its registers are open in the guest's I/O
; bitmap and its DMA goes through the IOMMU with the guest's own EPT, so queue and buffers are
; guest-physical addresses. Each of ROUNDS rounds writes BATCH blocks of a pattern made from the
; round, reads them back into another buffer, checks that both agree, and folds what it read into
; a checksum. Prints the rounds, the blocks moved and the checksum; exit code 0, or 1 with what went
; wrong (no device, an entry that failed, data that came back otherwise).
%define ROUNDS 48
%define BATCH 8                          ; blocks per write and per read
%define QUEUE_ENTRIES 4
%define QUEUE_ADDRESS 0x300000           ; guest-physical, inside the guest's RAM (docs/guests.md)
%define WRITE_BUFFER 0x310000
%define READ_BUFFER 0x320000
%define POLL_DELAY 400                   ; PAUSEs between two looks at HEAD (device.inc wait_head)
%define PATTERN_MULTIPLIER 0x9E3779B97F4A7C15
%define QWORDS_PER_BATCH (BATCH * BLOCK_SIZE / 8)
%define CHECKSUM_ROTATION 13

start:
    call find_device                     ; r15 = the device's first port
    jc no_device
    mov eax, QUEUE_ADDRESS
    mov ecx, QUEUE_ENTRIES
    call set_queue
    xor r12d, r12d                       ; the round
    xor r13d, r13d                       ; the checksum
    xor r14d, r14d                       ; TAIL
round:
    call fill_pattern
    mov eax, r14d                        ; the pattern to the device
    mov r8d, COMMAND_WRITE
    mov r9d, WRITE_BUFFER
    call put_entry
    lea eax, [r14d + 1]                  ; the same blocks back into the read buffer
    mov r8d, COMMAND_READ
    mov r9d, READ_BUFFER
    call put_entry
    add r14d, 2
    mov edx, r15d                        ; the doorbell
    add edx, DEVICE_TAIL
    mov eax, r14d
    out dx, eax
    call wait_head
    call check_entries
    jc entry_failed
    mov rsi, WRITE_BUFFER                ; what came back is what went
    mov rdi, READ_BUFFER
    mov ecx, QWORDS_PER_BATCH
    cld
    repe cmpsq
    jne mismatch
    mov rsi, READ_BUFFER                 ; folded into the checksum
    mov ecx, QWORDS_PER_BATCH
fold:
    rol r13, CHECKSUM_ROTATION
    xor r13, [rsi]
    add rsi, 8
    dec ecx
    jnz fold
    inc r12d
    cmp r12d, ROUNDS
    jb round
    lea rsi, [rip + text_done]
    call print
    mov eax, ROUNDS
    call print_decimal
    lea rsi, [rip + text_blocks]
    call print
    mov eax, ROUNDS * BATCH * 2
    call print_decimal
    lea rsi, [rip + text_checksum]
    call print
    mov rax, r13
    call print_decimal
    call print_newline
    xor eax, eax
    jmp exit_guest

; The write buffer from the round r12: qword i = (r12 << 32 | i) * PATTERN_MULTIPLIER.
fill_pattern:
    mov rdi, WRITE_BUFFER
    xor ecx, ecx
    mov rbx, PATTERN_MULTIPLIER
fill_pattern.qword:
    mov rax, r12
    shl rax, 32
    or rax, rcx
    imul rax, rbx
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, QWORDS_PER_BATCH
    jb fill_pattern.qword
    ret

; The entry of queue index eax (its slot: eax modulo QUEUE_ENTRIES): command r8d, buffer r9, the
; round's blocks, a status of 0 for the device to fill in. Clobbers rax, rdi.
put_entry:
    and eax, QUEUE_ENTRIES - 1
    imul eax, eax, DMA_ENTRY_SIZE
    lea rdi, [rax + QUEUE_ADDRESS]
    mov [rdi + DMA_ENTRY_COMMAND], r8d
    mov dword ptr [rdi + DMA_ENTRY_STATUS], 0
    mov eax, r12d
    imul eax, eax, BATCH
    mov [rdi + DMA_ENTRY_BLOCK], rax
    mov [rdi + DMA_ENTRY_BUFFER], r9
    mov dword ptr [rdi + DMA_ENTRY_COUNT], BATCH
    ret

; CF = 1 unless both entries of the round say ENTRY_DONE.
check_entries:
    lea eax, [r14d - 2]
    call entry_address
    cmp dword ptr [rdi + DMA_ENTRY_STATUS], ENTRY_DONE
    jne check_entries.failed
    lea eax, [r14d - 1]
    call entry_address
    cmp dword ptr [rdi + DMA_ENTRY_STATUS], ENTRY_DONE
    jne check_entries.failed
    clc
    ret
check_entries.failed:
    stc
    ret

; rdi = the address of queue index eax's slot.
entry_address:
    and eax, QUEUE_ENTRIES - 1
    imul eax, eax, DMA_ENTRY_SIZE
    lea rdi, [rax + QUEUE_ADDRESS]
    ret

no_device:
    lea rsi, [rip + text_no_device]
    jmp failed
entry_failed:
    lea rsi, [rip + text_entry_failed]
    jmp failed
mismatch:
    lea rsi, [rip + text_mismatch]
failed:
    call print
    mov eax, r12d
    call print_decimal
    call print_newline
    mov eax, 1
    jmp exit_guest

%include "device.inc"
%include "console.inc"

text_done:
    .asciz "blkstream: rounds "
text_blocks:
    .asciz ", blocks moved "
text_checksum:
    .asciz ", checksum "
text_no_device:
    .asciz "blkstream: no block device assigned; round "
text_entry_failed:
    .asciz "blkstream: an entry failed in round "
text_mismatch:
    .asciz "blkstream: the blocks read back differ in round "
