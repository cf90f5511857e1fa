; timer: on page tables and an IDT of its own, asks the hypervisor for a periodic tick (hypercall
; set-timer), then idles with STI; HLT until TICKS ticks have come. It checks that bad timer arguments are refused, that every wake-up
; from HLT came with a tick at its vector, that no tick came early (at least TICKS x PERIOD ticks of
; virtual time passed), that ticks falling due while interrupts are off wait for STI and come as
; one, and that stopping the timer withdraws a waiting tick. Prints what it saw; exit code 0, or 1 if a check failed.
%define TIMER_VECTOR 0x40
%define TIMER_PERIOD 10000
%define TOO_SHORT_PERIOD 10
%define EXCEPTION_VECTOR 8          ; a vector the set-timer hypercall must refuse
%define TICKS 25
%define OWN_PML4 0x6000
%define OWN_PDPT 0x7000
%define PAGE_PRESENT_WRITABLE 0x3
%define PAGE_SIZE_1G 0x80           ; PDPT entry bit 7: a 1 GiB page
%define IDENTITY_GIBS 4             ; the first 4 GiB map to themselves
%define SAVED_BY_TICK_HANDLER 8     ; tick_handler's push: rax
%include "idt.inc"

start:
    ; Page tables of its own, in place of the hypervisor's: 1 GiB pages mapping the first
    ; IDENTITY_GIBS GiB to themselves (SDM Vol. 3A 4.5).
    mov rdi, OWN_PDPT
    mov eax, PAGE_PRESENT_WRITABLE | PAGE_SIZE_1G
    mov ecx, IDENTITY_GIBS
map_gib:
    mov [rdi], rax
    add rdi, 8
    add rax, 1 << 30
    dec ecx
    jnz map_gib
    mov rdi, OWN_PML4
    mov qword ptr [rdi], OWN_PDPT | PAGE_PRESENT_WRITABLE
    mov cr3, rdi

    ; An IDT with one gate: TIMER_VECTOR -> tick_handler.
    SET_INTERRUPT_GATE TIMER_VECTOR, tick_handler
    LOAD_IDT

    ; Arguments the hypervisor must refuse.
    mov eax, HC_SET_TIMER
    mov edi, TOO_SHORT_PERIOD
    mov esi, TIMER_VECTOR
    vmcall
    cmp rax, EINVAL
    jne failed
    mov eax, HC_SET_TIMER
    mov edi, TIMER_PERIOD
    mov esi, EXCEPTION_VECTOR
    vmcall
    cmp rax, EINVAL
    jne failed

    mov eax, HC_CLOCK
    vmcall
    mov r12, rax                  ; time the timer started (it cannot tick before this)
    mov eax, HC_SET_TIMER
    mov edi, TIMER_PERIOD
    mov esi, TIMER_VECTOR
    vmcall
    test rax, rax
    jnz failed
    xor r13, r13                  ; wake-ups from HLT
idle:
    sti
    hlt                           ; the tick wakes us: its handler runs, then we go on here
    cli
    inc r13
    cmp qword ptr [rip + ticks], TICKS
    jb idle

    mov eax, HC_CLOCK
    vmcall
    sub rax, r12
    mov r14, rax                  ; time the ticks took
    cmp r13, [rip + ticks]
    ja failed                     ; a wake-up without a tick (one may bring two: the VP can lose its
                                  ; LP in the handler, and the next tick is then due at its IRETQ)
    cmp r14, TICKS * TIMER_PERIOD
    jb failed                     ; ticks came early

    ; Interrupts off for two periods: the ticks due meanwhile wait, and come as one after STI.
    mov rbx, [rip + ticks]
    call two_periods
    cmp [rip + ticks], rbx
    jne failed                    ; a tick while interrupts were off
    sti
wait_for_tick:
    cmp [rip + ticks], rbx
    je wait_for_tick
    cli
    inc rbx
    cmp [rip + ticks], rbx
    jne failed                    ; more than one tick

    ; A tick waiting for STI is withdrawn when the timer stops: none comes after STI.
    call two_periods
    mov eax, HC_SET_TIMER
    xor edi, edi                  ; period 0: the timer stops
    vmcall
    test rax, rax
    jnz failed
    sti
    call two_periods
    cli
    cmp [rip + ticks], rbx
    jne failed                    ; a tick after the timer stopped

    lea rsi, [rip + ticks_text]
    call print
    mov rax, r13
    call print_decimal
    lea rsi, [rip + time_text]
    call print
    mov rax, r14
    call print_decimal
    call print_newline
    xor eax, eax
    jmp exit_guest
failed:
    mov al, 1
    jmp exit_guest

two_periods:                      ; runs for two timer periods (two instructions a round)
    mov ecx, TIMER_PERIOD
two_periods.round:
    dec ecx
    jnz two_periods.round
    ret

; A tick: counted. One that comes between STI and HLT returns past the HLT (idt.inc), so it ends
; the wait as a tick that wakes the HLT does: each wake-up still comes with one tick.
tick_handler:
    inc qword ptr [rip + ticks]
    push rax
    RETURN_PAST_HLT SAVED_BY_TICK_HANDLER
    pop rax
    iretq

%include "console.inc"

.align 8
ticks:
    .quad 0
ticks_text:
    .asciz "timer ticks: "
time_text:
    .asciz ", virtual time: "
