; vpstate: the state a hypervisor keeps for a VP beyond the VMCS. Every VP gives XMM0-XMM15, MXCSR,
; the x87 stack and control word, CR2, DR0-DR3 and, by WRMSR, KERNEL_GS_BASE, STAR, LSTAR, CSTAR,
; FMASK, TSC_AUX, PAT, FS_BASE, GS_BASE and EFER.SCE values of its own (different on every VP), then
; spins and checks them all CHECKS times. VP 0 first checks that WRMSR of values a processor refuses,
; and RDMSR/WRMSR of an MSR there is none of, raise #GP(0); at the end it prints, for every VP, what
; changed. Exit code 0 if every refusal came and nothing changed, else 1.

%include "idt.inc"

%define CHECKS 60
%define SPIN 25000                       ; loop iterations between checks (4 instructions each)
%define DATA_BASE 0x400000               ; guest-physical: one VP_AREA per VP
%define VP_AREA 0x1000
%define DONE_COUNT (DATA_BASE - 8)       ; VPs that finished their checks
%define GP_COUNT (DATA_BASE - 16)        ; #GP taken by VP 0's refusal tests
; A VP's area.
%define EXPECTED_FX 0                    ; FXSAVE right after the set-up (16-byte aligned)
%define CURRENT_FX 0x200                 ; FXSAVE at each check
%define MISMATCHES 0x400                 ; one bit per ITEM_* that changed
%define EXPECTED_REGISTERS 0x408         ; CR2, DR0-DR3
%define EXPECTED_MSRS 0x430              ; MSR_COUNT qwords, in msr_indices order
%define XMM_PATTERN 0x500                ; what XMM0-XMM15 are loaded from (256 bytes)
; The FXSAVE image (SDM Vol. 1 Table 10-2): FCW, FSW, FTW at 0-5; MXCSR at 24; ST0-ST7 from 32; XMM from 160.
%define FX_CONTROL_BYTES 6
%define FX_MXCSR 24
%define FX_ST0 32
%define FX_ST_BYTES 128
%define FX_XMM0 160
%define FX_XMM_BYTES 256
%define MXCSR_DEFAULT 0x1F80
%define MXCSR_RC_SHIFT 13                ; rounding control, bits 14:13
%define FCW_INITIAL 0x037F               ; FNINIT's control word (SDM Vol. 1 8.1.5)
%define FCW_PRECISION_53 0x027F          ; the same with 53-bit precision
%define VECTOR_GP 13
; Architectural MSR indices (SDM Vol. 4 Table 2-2).
%define IA32_EFER 0xC0000080
%define IA32_LSTAR 0xC0000082
%define IA32_FMASK 0xC0000084
%define IA32_FS_BASE 0xC0000100
%define IA32_PAT 0x277
%define EFER_SCE 1
%define EFER_LME 0x100
%define NO_SUCH_MSR 0x12345
%define REFUSALS 7                       ; the #GPs VP 0's refusal tests expect
%define MSR_COUNT 10
%define ITEM_NAME_BYTES 16                ; item_names: one NUL-padded name per MISMATCHES bit
%define ITEM_MSR_FIRST 8                 ; bits 0-7: x87, MXCSR, XMM, CR2, DR0-DR3
%define NON_CANONICAL 0x0000800000000000
%define PAT_TYPE_2 2                     ; a reserved memory type
%define HIGH_BIT 0x100000000
%define SEED_MULTIPLIER 0x9E3779B97F4A7C15

start:
    mov rbp, rdi                         ; VP index
    mov r13, rsi                         ; VP count
    imul r14, rbp, VP_AREA
    add r14, DATA_BASE                   ; r14 = this VP's area
    lea r15, [rbp + 1]
    mov rax, SEED_MULTIPLIER
    imul r15, rax                        ; r15 = this VP's seed: distinct values on every VP
    SET_INTERRUPT_GATE VECTOR_GP, general_protection
    LOAD_IDT
    test rbp, rbp
    jnz set_state
    call refusals

set_state:
    ; x87: a stack of three, with this VP's precision and values.
    fninit
    mov eax, FCW_PRECISION_53
    test rbp, 1
    jz x87_precision
    mov eax, FCW_INITIAL                 ; odd VPs keep 64-bit precision
x87_precision:
    mov [r14 + CURRENT_FX], ax
    fldcw [r14 + CURRENT_FX]
    mov [r14 + CURRENT_FX], r15
    fild qword ptr [r14 + CURRENT_FX]
    fldpi
    mov [r14 + CURRENT_FX], rbp
    fild qword ptr [r14 + CURRENT_FX]
    ; MXCSR: rounding control (VP + 1) mod 4.
    lea ecx, [rbp + 1]
    and ecx, 3
    shl ecx, MXCSR_RC_SHIFT
    or ecx, MXCSR_DEFAULT
    mov [r14 + CURRENT_FX], ecx
    ldmxcsr [r14 + CURRENT_FX]
    ; XMM0-XMM15 from a pattern of the seed.
    xor ecx, ecx
xmm_pattern:
    lea rax, [rcx + 1]
    imul rax, r15
    mov [r14 + XMM_PATTERN + rcx * 8], rax
    inc ecx
    cmp ecx, FX_XMM_BYTES / 8
    jb xmm_pattern
    movdqu xmm0, [r14 + XMM_PATTERN + 0x00]
    movdqu xmm1, [r14 + XMM_PATTERN + 0x10]
    movdqu xmm2, [r14 + XMM_PATTERN + 0x20]
    movdqu xmm3, [r14 + XMM_PATTERN + 0x30]
    movdqu xmm4, [r14 + XMM_PATTERN + 0x40]
    movdqu xmm5, [r14 + XMM_PATTERN + 0x50]
    movdqu xmm6, [r14 + XMM_PATTERN + 0x60]
    movdqu xmm7, [r14 + XMM_PATTERN + 0x70]
    movdqu xmm8, [r14 + XMM_PATTERN + 0x80]
    movdqu xmm9, [r14 + XMM_PATTERN + 0x90]
    movdqu xmm10, [r14 + XMM_PATTERN + 0xA0]
    movdqu xmm11, [r14 + XMM_PATTERN + 0xB0]
    movdqu xmm12, [r14 + XMM_PATTERN + 0xC0]
    movdqu xmm13, [r14 + XMM_PATTERN + 0xD0]
    movdqu xmm14, [r14 + XMM_PATTERN + 0xE0]
    movdqu xmm15, [r14 + XMM_PATTERN + 0xF0]
    fxsave [r14 + EXPECTED_FX]
    ; CR2 and DR0-DR3 (DR7 keeps every breakpoint off).
    mov rax, r15
    mov cr2, rax
    mov [r14 + EXPECTED_REGISTERS], rax
    lea rax, [r14 + 0x10]
    mov dr0, rax
    mov [r14 + EXPECTED_REGISTERS + 8], rax
    lea rax, [r14 + 0x20]
    mov dr1, rax
    mov [r14 + EXPECTED_REGISTERS + 16], rax
    lea rax, [r14 + 0x30]
    mov dr2, rax
    mov [r14 + EXPECTED_REGISTERS + 24], rax
    lea rax, [r14 + 0x40]
    mov dr3, rax
    mov [r14 + EXPECTED_REGISTERS + 32], rax
    ; The MSRs: each value valid for its MSR and different on every VP.
    mov rax, 0x00007F0000000000          ; KERNEL_GS_BASE: canonical, low half
    lea rax, [rax + rbp * 8 + 0x1000]
    mov [r14 + EXPECTED_MSRS + 0 * 8], rax
    mov [r14 + EXPECTED_MSRS + 1 * 8], r15   ; STAR: any value
    mov rax, 0xFFFF800000000000          ; LSTAR, CSTAR: canonical, high half
    lea rdx, [rax + rbp * 8 + 0x2000]
    mov [r14 + EXPECTED_MSRS + 2 * 8], rdx
    lea rdx, [rax + rbp * 8 + 0x3000]
    mov [r14 + EXPECTED_MSRS + 3 * 8], rdx
    mov eax, r15d                        ; FMASK, TSC_AUX: 32 bits
    mov [r14 + EXPECTED_MSRS + 4 * 8], rax
    lea eax, [rbp + 0x100]
    mov [r14 + EXPECTED_MSRS + 5 * 8], rax
    mov rax, rbp
    and eax, 3
    lea rdx, [rip + pat_values]
    mov rax, [rdx + rax * 8]
    mov [r14 + EXPECTED_MSRS + 6 * 8], rax   ; PAT
    mov rax, 0x0000500000000000          ; FS_BASE, GS_BASE: canonical
    lea rdx, [rax + rbp * 8 + 0x4000]
    mov [r14 + EXPECTED_MSRS + 7 * 8], rdx
    lea rdx, [rax + rbp * 8 + 0x5000]
    mov [r14 + EXPECTED_MSRS + 8 * 8], rdx
    mov ecx, IA32_EFER
    rdmsr
    shl rdx, 32
    or rax, rdx
    or rax, EFER_SCE
    mov [r14 + EXPECTED_MSRS + 9 * 8], rax   ; EFER with SCE
    xor ebx, ebx
write_msrs:
    lea rax, [rip + msr_indices]
    mov ecx, [rax + rbx * 4]
    mov rax, [r14 + EXPECTED_MSRS + rbx * 8]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    inc ebx
    cmp ebx, MSR_COUNT
    jb write_msrs

    ; CHECKS rounds: spin, then compare everything.
    mov qword ptr [r14 + MISMATCHES], 0
    mov r12d, CHECKS
check_round:
    mov ecx, SPIN
spin:
    add rax, rcx
    xor rax, rdx
    dec ecx
    jnz spin
    call check_state
    dec r12d
    jnz check_round
    mov rax, DONE_COUNT
    lock inc qword ptr [rax]
    test rbp, rbp
    jnz halt_forever                     ; every VP but 0 is done
    ; VP 0: wait for the others, then report each VP.
wait_others:
    pause
    cmp [rax], r13
    jb wait_others
    xor ebx, ebx
    xor r12d, r12d                       ; r12 = 1 once anything was wrong
report_vp:
    lea rsi, [rip + vp_text]
    call print
    mov rax, rbx
    call print_decimal
    imul r14, rbx, VP_AREA
    add r14, DATA_BASE
    mov r8, [r14 + MISMATCHES]
    test r8, r8
    jnz report_changed
    lea rsi, [rip + intact_text]
    call print
    jmp report_next
report_changed:
    mov r12d, 1
    lea rsi, [rip + changed_text]
    call print
    lea r9, [rip + item_names]
report_item:
    test r8, 1
    jz report_item_next
    mov al, ' '
    call putc
    mov rsi, r9
    call print
report_item_next:
    shr r8, 1
    add r9, ITEM_NAME_BYTES
    test r8, r8
    jnz report_item
report_next:
    call print_newline
    inc rbx
    cmp rbx, r13
    jb report_vp
    lea rsi, [rip + refusals_text]
    call print
    mov rax, GP_COUNT
    mov rax, [rax]
    mov rbx, rax
    call print_decimal
    lea rsi, [rip + refusals_of_text]
    call print
    call print_newline
    cmp rbx, REFUSALS
    je report_done
    mov r12d, 1
report_done:
    mov eax, r12d
    jmp exit_guest

; r14 = the VP's area: every item compared with what the VP set; a bit in MISMATCHES for each
; that differs. Clobbers rax, rbx, rcx, rdx, rsi, rdi.
check_state:
    fxsave [r14 + CURRENT_FX]
    xor ebx, ebx                         ; the bits of this round
    lea rsi, [r14 + EXPECTED_FX]
    lea rdi, [r14 + CURRENT_FX]
    mov ecx, FX_CONTROL_BYTES
    cld
    repe cmpsb
    jne check_state.x87_changed
    lea rsi, [r14 + EXPECTED_FX + FX_ST0]
    lea rdi, [r14 + CURRENT_FX + FX_ST0]
    mov ecx, FX_ST_BYTES
    repe cmpsb
    je check_state.mxcsr
check_state.x87_changed:
    or ebx, 1 << 0
check_state.mxcsr:
    mov eax, [r14 + EXPECTED_FX + FX_MXCSR]
    cmp eax, [r14 + CURRENT_FX + FX_MXCSR]
    je check_state.xmm
    or ebx, 1 << 1
check_state.xmm:
    lea rsi, [r14 + EXPECTED_FX + FX_XMM0]
    lea rdi, [r14 + CURRENT_FX + FX_XMM0]
    mov ecx, FX_XMM_BYTES
    repe cmpsb
    je check_state.cr2
    or ebx, 1 << 2
check_state.cr2:
    mov rax, cr2
    cmp rax, [r14 + EXPECTED_REGISTERS]
    je check_state.dr0
    or ebx, 1 << 3
check_state.dr0:
    mov rax, dr0
    cmp rax, [r14 + EXPECTED_REGISTERS + 8]
    je check_state.dr1
    or ebx, 1 << 4
check_state.dr1:
    mov rax, dr1
    cmp rax, [r14 + EXPECTED_REGISTERS + 16]
    je check_state.dr2
    or ebx, 1 << 5
check_state.dr2:
    mov rax, dr2
    cmp rax, [r14 + EXPECTED_REGISTERS + 24]
    je check_state.dr3
    or ebx, 1 << 6
check_state.dr3:
    mov rax, dr3
    cmp rax, [r14 + EXPECTED_REGISTERS + 32]
    je check_state.msrs
    or ebx, 1 << 7
check_state.msrs:
    xor edi, edi
check_state.msr:
    lea rax, [rip + msr_indices]
    mov ecx, [rax + rdi * 4]
    rdmsr
    shl rdx, 32
    or rax, rdx
    cmp rax, [r14 + EXPECTED_MSRS + rdi * 8]
    je check_state.msr_next
    lea ecx, [rdi + ITEM_MSR_FIRST]
    bts ebx, ecx
check_state.msr_next:
    inc edi
    cmp edi, MSR_COUNT
    jb check_state.msr
    or [r14 + MISMATCHES], rbx
    ret

; VP 0: each of these must raise #GP(0) (the handler counts it and skips the 2-byte instruction).
refusals:
    mov ecx, IA32_LSTAR                  ; a non-canonical address
    mov rax, NON_CANONICAL
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, IA32_FS_BASE
    wrmsr
    mov ecx, IA32_PAT                    ; a reserved memory type
    mov eax, PAT_TYPE_2
    xor edx, edx
    wrmsr
    mov ecx, IA32_FMASK                  ; bits 63:32 are reserved
    xor eax, eax
    mov edx, 1
    wrmsr
    mov ecx, NO_SUCH_MSR
    rdmsr
    wrmsr
    mov ecx, IA32_EFER                   ; LME cannot change while paging is on
    rdmsr
    and eax, ~EFER_LME
    wrmsr
    ret

; #GP: counted; the faulting RDMSR or WRMSR (2 bytes) is skipped.
general_protection:
    push rax
    mov rax, GP_COUNT
    lock inc qword ptr [rax]
    pop rax
    add qword ptr [rsp + 8], 2           ; the frame: error code, then RIP
    add rsp, 8
    iretq

%include "console.inc"

.align 8
pat_values:                              ; valid PAT values (types 0, 1, 4-7), none the power-up one
    .quad 0x0007010600070106, 0x0006050400070406, 0x0105040600060504, 0x0001040507060406
msr_indices:                             ; KERNEL_GS_BASE, STAR, LSTAR, CSTAR, FMASK, TSC_AUX, PAT, FS_BASE, GS_BASE, EFER
    .long 0xC0000102, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000103, 0x277, 0xC0000100, 0xC0000101, 0xC0000080
item_names:                              ; one per MISMATCHES bit, ITEM_NAME_BYTES each
    .asciz "x87"
    .zero ITEM_NAME_BYTES - 4
    .asciz "mxcsr"
    .zero ITEM_NAME_BYTES - 6
    .asciz "xmm"
    .zero ITEM_NAME_BYTES - 4
    .asciz "cr2"
    .zero ITEM_NAME_BYTES - 4
    .asciz "dr0"
    .zero ITEM_NAME_BYTES - 4
    .asciz "dr1"
    .zero ITEM_NAME_BYTES - 4
    .asciz "dr2"
    .zero ITEM_NAME_BYTES - 4
    .asciz "dr3"
    .zero ITEM_NAME_BYTES - 4
    .asciz "kernel_gs_base"
    .zero ITEM_NAME_BYTES - 15
    .asciz "star"
    .zero ITEM_NAME_BYTES - 5
    .asciz "lstar"
    .zero ITEM_NAME_BYTES - 6
    .asciz "cstar"
    .zero ITEM_NAME_BYTES - 6
    .asciz "fmask"
    .zero ITEM_NAME_BYTES - 6
    .asciz "tsc_aux"
    .zero ITEM_NAME_BYTES - 8
    .asciz "pat"
    .zero ITEM_NAME_BYTES - 4
    .asciz "fs_base"
    .zero ITEM_NAME_BYTES - 8
    .asciz "gs_base"
    .zero ITEM_NAME_BYTES - 8
    .asciz "efer"
    .zero ITEM_NAME_BYTES - 5
vp_text:
    .asciz "vp "
intact_text:
    .asciz ": intact"
changed_text:
    .asciz ": changed:"
refusals_text:
    .asciz "refused with #GP: "
refusals_of_text:
    .asciz " of 7"                       ; REFUSALS
