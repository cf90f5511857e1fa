; blkirq: the stream of checksummed blocks (blkstream.inc) through the block device assigned to it
; (`--guest blkirq,device=blkN`), each round's completion awaited by STI; HLT instead of polling. It
; asks the hypervisor for its device's completion interrupt at COMPLETION_VECTOR (hypercall
; set-device-interrupt) and sends that vector to a handler of its IDT that counts it and reads HEAD.
; A round ends when the handler has seen HEAD reach the round's TAIL: the interrupt alone wakes it.
; Checks that a vector of an exception is refused (and, without a device, that the hypercall says
; ENODEV), that no interrupt came without a completion since the one before (none spurious), and
; that one came per round (a doorbell's last entry raises it). Prints blkstream's line and the
; interrupts; exit code 0, or 1 with what went wrong.
%define COMPLETION_VECTOR 0x50
%define EXCEPTION_VECTOR 8               ; a vector the hypercall must refuse
%define SAVED_BY_HANDLER 16              ; completion_handler's pushes: rax, rdx
%include "idt.inc"
%include "blkbuffers.inc"
%include "blkstream.inc"

; Without a device the hypercall must say so.
no_device:
    mov eax, HC_SET_DEVICE_INTERRUPT
    mov edi, COMPLETION_VECTOR
    vmcall
    lea rsi, [rip + text_no_enodev]
    cmp rax, ENODEV
    jne failed
    lea rsi, [rip + text_no_device]
    jmp failed

; The IDT, a refused vector, then the completions at COMPLETION_VECTOR.
stream_setup:
    SET_INTERRUPT_GATE COMPLETION_VECTOR, completion_handler
    LOAD_IDT
    mov eax, HC_SET_DEVICE_INTERRUPT
    mov edi, EXCEPTION_VECTOR
    vmcall
    lea rsi, [rip + text_not_refused]
    cmp rax, EINVAL
    jne stream_setup.failed
    mov eax, HC_SET_DEVICE_INTERRUPT
    mov edi, COMPLETION_VECTOR
    vmcall
    lea rsi, [rip + text_refused]
    test rax, rax
    jnz stream_setup.failed
    clc
    ret
stream_setup.failed:
    stc
    ret

; The same buffers every round.
begin_round:
    ret

; Until the completion handler has seen HEAD = r14d: with interrupts off a look at what it saw,
; then STI; HLT, which an interrupt ends.
wait_round:
    cmp [rip + head_seen], r14d
    je wait_round.done
    sti
    hlt                                  ; (the handler returns past it if it came just before)
    cli
    jmp wait_round
wait_round.done:
    ret

; The completion interrupt (r15 = the device's first port, as the rounds keep it): counted, and HEAD
; read; one that finds HEAD where the one before left it is spurious. Taken between STI and HLT, it
; returns past the HLT (idt.inc RETURN_PAST_HLT), so that wait_round looks again instead of
; sleeping through the completion it waits for.
completion_handler:
    push rax
    push rdx
    inc qword ptr [rip + interrupts]
    mov edx, r15d
    add edx, DEVICE_HEAD
    in eax, dx
    cmp eax, [rip + head_seen]
    jne completion_handler.moved
    inc qword ptr [rip + spurious]
completion_handler.moved:
    mov [rip + head_seen], eax
    RETURN_PAST_HLT SAVED_BY_HANDLER
    pop rdx
    pop rax
    iretq

; After the checksum: the interrupts; CF = 1 (rsi = what) unless one came per round, none spurious.
stream_report:
    lea rsi, [rip + text_interrupts]
    call print
    mov rax, [rip + interrupts]
    call print_decimal
    lea rsi, [rip + text_spurious]
    cmp qword ptr [rip + spurious], 0
    jne stream_report.failed
    lea rsi, [rip + text_not_one_per_round]
    cmp qword ptr [rip + interrupts], ROUNDS
    jne stream_report.failed
    clc
    ret
stream_report.failed:
    stc
    ret

%include "device.inc"
%include "console.inc"

text_name:
    .asciz "blkirq"
text_interrupts:
    .asciz ", interrupts "
text_no_enodev:
    .asciz ": no block device, and set-device-interrupt did not say ENODEV; round "
text_not_refused:
    .asciz ": set-device-interrupt took an exception's vector; round "
text_refused:
    .asciz ": set-device-interrupt refused its vector; round "
text_spurious:
    .asciz ": an interrupt came with no completion since the one before, by round "
text_not_one_per_round:
    .asciz ": not one interrupt per round, by round "
.align 8
interrupts:
    .quad 0
spurious:
    .quad 0
head_seen:
    .long 0
