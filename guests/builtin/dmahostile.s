; dmahostile: a guest that turns its assigned block device (`--guest dmahostile,device=blkN`) against
; memory that is not its own, and reports what the IOMMU did (docs/machine.md 6.12). Three tries:
; 1. a read from the device into a guest-physical address above its RAM: the IOMMU has no mapping,
;    the entry fails with ENTRY_FAULT and nothing is written anywhere;
; 2. a read into HYPERVISOR_ADDRESS, where the hypervisor's image lies in host-physical memory: the
;    address is translated as the guest's own, so the data land in the guest's RAM there;
; 3. a queue above its RAM: the device cannot read it, stops with DEVICE_QUEUE_FAULT;
; 4. a doorbell FAR_TAIL entries past HEAD (its own queue again): refused whole, DEVICE_DOORBELL_FAULT.
; Prints one line per try; exit code 0 when every try was stopped as above, 1 otherwise.
%define QUEUE_ADDRESS 0x300000
%define OUTSIDE_RAM 0x7F000000           ; above any guest's RAM (docs/guests.md), below the map window
%define HYPERVISOR_ADDRESS 0x200000      ; the hypervisor's load address (docs/boot.md), as a DMA address
%define SOURCE_BLOCK 1
%define MARK 0x4B52414D444E4947          ; what the device's block holds: written first, read back after
%define POLL_DELAY 400                   ; PAUSEs between two looks at HEAD (device.inc wait_head)
%define FAR_TAIL 0xFFFFFFFF              ; 2^32 - 1 entries given at once

start:
    xor r14d, r14d                       ; TAIL
    call find_device
    jc no_device
    mov eax, QUEUE_ADDRESS
    mov ecx, 2
    call set_queue
    ; The block the reads take: MARK, written from the guest's own buffer at QUEUE_ADDRESS + a page.
    mov rdi, QUEUE_ADDRESS + 0x1000
    mov rax, MARK
    mov [rdi], rax
    mov r8d, COMMAND_WRITE
    mov r9, QUEUE_ADDRESS + 0x1000
    call give_entry
    ; 1. Into memory the guest does not have.
    mov r8d, COMMAND_READ
    mov r9, OUTSIDE_RAM
    call give_entry
    lea rsi, [rip + text_outside]
    call report_status
    cmp eax, ENTRY_FAULT
    jne broken
    ; 2. Into the hypervisor's address: its own RAM there gets the block, nothing else does.
    mov r8d, COMMAND_READ
    mov r9, HYPERVISOR_ADDRESS
    call give_entry
    lea rsi, [rip + text_hypervisor]
    call report_status
    cmp eax, ENTRY_DONE
    jne broken
    mov rax, MARK
    mov rbx, HYPERVISOR_ADDRESS
    cmp [rbx], rax
    jne broken
    lea rsi, [rip + text_own_ram]
    call print
    ; 3. A queue the device cannot read.
    mov eax, OUTSIDE_RAM
    mov ecx, 2
    call set_queue
    mov edx, r15d
    add edx, DEVICE_TAIL
    mov eax, 1
    out dx, eax
    mov edx, r15d
    add edx, DEVICE_STATUS
    in eax, dx
    mov ebx, eax
    lea rsi, [rip + text_queue]
    call print
    mov eax, ebx
    call print_decimal
    call print_newline
    cmp ebx, DEVICE_QUEUE_FAULT
    jne broken
    ; 4. More entries than the queue holds.
    mov eax, QUEUE_ADDRESS
    mov ecx, 2
    call set_queue
    mov edx, r15d
    add edx, DEVICE_TAIL
    mov eax, FAR_TAIL
    out dx, eax
    mov edx, r15d
    add edx, DEVICE_STATUS
    in eax, dx
    lea rsi, [rip + text_far_tail]
    call report_status
    cmp eax, DEVICE_DOORBELL_FAULT
    jne broken
    xor eax, eax
    jmp exit_guest

; One entry at the next TAIL (r14d, from 0), given and waited for: command r8d, one block
; (SOURCE_BLOCK), buffer r9. eax = the entry's status afterwards. Clobbers rcx, rdx, rdi.
give_entry:
    mov eax, r14d
    and eax, 1
    imul eax, eax, DMA_ENTRY_SIZE
    lea rdi, [rax + QUEUE_ADDRESS]
    mov [rdi + DMA_ENTRY_COMMAND], r8d
    mov dword ptr [rdi + DMA_ENTRY_STATUS], 0
    mov qword ptr [rdi + DMA_ENTRY_BLOCK], SOURCE_BLOCK
    mov [rdi + DMA_ENTRY_BUFFER], r9
    mov dword ptr [rdi + DMA_ENTRY_COUNT], 1
    inc r14d
    mov edx, r15d
    add edx, DEVICE_TAIL
    mov eax, r14d
    out dx, eax
    call wait_head
    mov eax, [rdi + DMA_ENTRY_STATUS]
    ret

; rsi = a label, eax = a status: "label status". Keeps eax.
report_status:
    push rax
    call print
    mov eax, [rsp]
    call print_decimal
    call print_newline
    pop rax
    ret

no_device:
    lea rsi, [rip + text_no_device]
    call print
broken:
    lea rsi, [rip + text_broken]
    call print
    mov eax, 1
    jmp exit_guest

%include "device.inc"
%include "console.inc"

text_outside:
    .asciz "dmahostile: a read into memory above its RAM, entry status "
text_hypervisor:
    .asciz "dmahostile: a read into the hypervisor's address, entry status "
text_own_ram:
    .asciz "dmahostile: it landed in the guest's own RAM at that address\n"
text_queue:
    .asciz "dmahostile: a queue above its RAM, device status "
text_far_tail:
    .asciz "dmahostile: a doorbell 2^32 - 1 entries ahead, device status "
text_no_device:
    .asciz "dmahostile: no block device assigned\n"
text_broken:
    .asciz "dmahostile: the IOMMU let something through\n"
