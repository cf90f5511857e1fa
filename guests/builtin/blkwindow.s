; blkwindow: the stream of checksummed blocks (blkstream.inc) through the block device assigned to it
; (`--guest blkwindow,device=blkN`), with its buffers in pages of the map window (hypercall map-page,
; docs/guests.md): the write buffer in one page table of the window, and READ_BUFFERS read buffers,
; each in a page table of its own, taken in turn round by round. So the device's DMA lands in mapped
; window pages, and the pages a round reads into were last touched READ_BUFFERS rounds before: after
; a post-copy restart (docs/protocol.md, "Assigned devices") the device, not the CPU, is the first
; to touch them. Each round's completion is awaited by polling HEAD, as blkstream does; the same
; checksum.
%define WINDOW_PAGE_BYTES 4096
%define WINDOW_TABLE_BYTES 0x200000      ; the guest-physical span of one page table of the window
%define BUFFER_PAGES (BATCH * BLOCK_SIZE / WINDOW_PAGE_BYTES)
%define WRITE_BUFFER (MAP_WINDOW_BASE + 100 * WINDOW_TABLE_BYTES)
%define READ_BUFFERS 16
%define READ_BUFFER_BASE (MAP_WINDOW_BASE + 256 * WINDOW_TABLE_BYTES)
%define READ_BUFFER_STRIDE (16 * WINDOW_TABLE_BYTES)
%define READ_BUFFER qword ptr [rip + read_buffer]   ; this round's (begin_round)
%include "blkstream.inc"

no_device:
    lea rsi, [rip + text_no_device]
    jmp failed

; Every buffer mapped, page by page (fresh pages, reading zero), before the first round.
stream_setup:
    mov rdi, WRITE_BUFFER
    call map_buffer
    jc stream_setup.done
    xor edx, edx
stream_setup.read_buffer:
    mov eax, edx
    call read_buffer_address
    call map_buffer
    jc stream_setup.done
    inc edx
    cmp edx, READ_BUFFERS
    jb stream_setup.read_buffer
    clc
stream_setup.done:
    ret

; rdi = a buffer in the window: its pages mapped; CF = 1 with rsi = why if the hypercall refused one.
; Clobbers rax, rcx, rdi.
map_buffer:
    mov ecx, BUFFER_PAGES
map_buffer.page:
    mov eax, HC_MAP_PAGE
    vmcall
    lea rsi, [rip + text_not_mapped]
    test rax, rax
    jnz map_buffer.refused
    add rdi, WINDOW_PAGE_BYTES
    dec ecx
    jnz map_buffer.page
    clc
    ret
map_buffer.refused:
    stc
    ret

; rdi = read buffer eax (0 to READ_BUFFERS - 1). Clobbers rax.
read_buffer_address:
    imul rax, rax, READ_BUFFER_STRIDE
    mov rdi, READ_BUFFER_BASE
    add rdi, rax
    ret

; The round's read buffer: the next in turn.
begin_round:
    mov eax, r12d
    and eax, READ_BUFFERS - 1
    call read_buffer_address
    mov [rip + read_buffer], rdi
    ret

; Nothing to add to the report.
stream_report:
    clc
    ret

wait_round:
    jmp wait_head

%include "device.inc"
%include "console.inc"

.align 8
read_buffer:
    .quad 0
text_name:
    .asciz "blkwindow"
text_not_mapped:
    .asciz ": a buffer's window page was not mapped; round "
