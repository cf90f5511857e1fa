; cpustate: the oracle of a VP's processor state. Every VP gives each piece of architectural state a
; CPL-0 long-mode guest can set a value of its own, derived from its VP index, so that VPs sharing an
; LP hold different values: the 15 general registers, the arithmetic flags and DF, XMM0-XMM15, MXCSR,
; the x87 stack with its control, status and tag words, CR2, CR3 (page tables of its own), DR0-DR3,
; DR6, DR7, a GDT, IDT, TSS and LDT of its own, the CS, DS, ES, FS, GS and SS selectors, the FS and GS
; bases, and the MSRs KERNEL_GS_BASE, STAR, LSTAR, CSTAR, FMASK, TSC_AUX, PAT, SYSENTER_CS/ESP/EIP and
; EFER (SCE). It then checks all of it ROUNDS times, yielding between checks, and prints each value
; that changed once (name, expected, found). At the end the VPs print, in VP order,
; "cpustate vp N: all M values intact after K checks" (or how many changed); the last VP exits with 0,
; or 1 if anything changed. An unexpected exception prints its vector and RIP and exits with 2.
; The output holds nothing time-dependent: it is the same with and without a hot restart.
; docs/guests.md, Built-in guests, says what is set, how, and what the machine does not keep.
%define ROUNDS 200
%define SLED_NOPS 4096              ; instructions in each round that change no state: a restart lands here mostly
%define CHANGED_EXIT_CODE 1
%define EXCEPTION_EXIT_CODE 2

; Each VP's own area of guest RAM: VP_AREAS + VP index x VP_AREA_BYTES (identity-mapped).
%define VP_AREAS 0x400000
%define VP_AREA_BYTES 0x10000
%define AREA_PML4 0x0000
%define AREA_PDPT 0x1000
%define AREA_PD 0x2000
%define AREA_GDT 0x3000
%define AREA_LDT 0x3100
%define AREA_TSS 0x3200
%define AREA_IDT 0x4000
%define AREA_FX_EXPECTED 0x5000     ; FXSAVE images (512 bytes, 16-byte aligned)
%define AREA_FX_FOUND 0x5200
%define AREA_EXPECTED 0x5400        ; one qword per SLOT_* value
%define AREA_FOUND 0x5800
%define AREA_REPORTED 0x5C00        ; one byte per check: 1 once its change has been printed
%define AREA_CHANGED 0x5F00         ; qword: values of this VP that changed
%define AREA_SCRATCH 0x5F10         ; SGDT and SIDT store here (10 bytes)
%define AREA_ROUNDS 0x5F20          ; qword: rounds done
%define AREA_LINE 0x6000            ; a console line being built
%define AREA_X87_VALUES 0x6400      ; the eight 80-bit values pushed, 16 bytes apart
%define AREA_FS_TARGET 0x7000       ; the FS base points here, the GS base at AREA_GS_TARGET
%define AREA_GS_TARGET 0x7100

; Value slots (qwords at AREA_EXPECTED and AREA_FOUND). The general registers come first, in the
; order RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8-R15, then RFLAGS: the round pushes and pops them so.
%define GPR_COUNT 15
%define SLOT_RFLAGS 15
%define SLOT_CR2 16
%define SLOT_CR3 17
%define SLOT_DR0 18                 ; DR0-DR3 in slots 18-21
%define SLOT_DR6 22
%define SLOT_DR7 23
%define SLOT_GDTR_BASE 24
%define SLOT_GDTR_LIMIT 25
%define SLOT_IDTR_BASE 26
%define SLOT_IDTR_LIMIT 27
%define SLOT_TR 28
%define SLOT_LDTR 29
%define SLOT_CS 30
%define SLOT_DS 31                  ; DS, ES, FS, GS, SS in slots 31-35
%define SLOT_ES 32
%define SLOT_FS 33
%define SLOT_GS 34
%define SLOT_SS 35
%define SLOT_FS_BASE 36
%define SLOT_GS_BASE 37
%define SLOT_KERNEL_GS_BASE 38
%define SLOT_STAR 39
%define SLOT_LSTAR 40
%define SLOT_CSTAR 41
%define SLOT_FMASK 42
%define SLOT_TSC_AUX 43
%define SLOT_PAT 44
%define SLOT_SYSENTER_CS 45
%define SLOT_SYSENTER_ESP 46
%define SLOT_SYSENTER_EIP 47
%define SLOT_EFER 48
%define SLOT_FS_MARKER 49           ; the qword at FS:0 and GS:0
%define SLOT_GS_MARKER 50
%define SLOT_CR0 51                 ; CR0 and CR4 as the guest found them (it sets neither)
%define SLOT_CR4 52

; MSRs (SDM Vol. 4, Table 2-2).
%define IA32_SYSENTER_CS 0x174
%define IA32_SYSENTER_ESP 0x175
%define IA32_SYSENTER_EIP 0x176
%define IA32_PAT 0x277
%define IA32_EFER 0xC0000080
%define IA32_STAR 0xC0000081
%define IA32_LSTAR 0xC0000082
%define IA32_CSTAR 0xC0000083
%define IA32_FMASK 0xC0000084
%define IA32_FS_BASE 0xC0000100
%define IA32_GS_BASE 0xC0000101
%define IA32_KERNEL_GS_BASE 0xC0000102
%define IA32_TSC_AUX 0xC0000103
%define EFER_SCE 0x1                ; SYSCALL enable: set by odd VPs

; Per-VP value patterns (VP index v): each value below is the pattern with v (and the register's
; number i where there are several) mixed in as the comment says.
%define GPR_PATTERN 0xC0DE0000      ; | i << 48 | v << 40 | i
%define CR2_PATTERN 0xC2C2C2C200000000      ; | v << 16
%define DR_PATTERN 0x00007D0000000000       ; + v << 24 + i << 12 + DR_OFFSET (canonical)
%define DR_OFFSET 0xD0
%define DR6_FIXED_ONES 0xFFFF0FF0           ; DR6 reads its reserved bits as 1 (SDM Vol. 3B 18.2.3)
%define DR6_BS 0x4000                       ; | v & 0xF (B0-B3) | BS for odd v
%define KERNEL_GS_PATTERN 0xFFFF80006B000000 ; | v << 12
%define STAR_PATTERN 0x0033000853540000     ; + v
%define LSTAR_PATTERN 0xFFFF80004C530000    ; + v << 4
%define CSTAR_PATTERN 0x0000000043530000    ; + v << 4
%define FMASK_PATTERN 0x00047700            ; + v (bits 63:32 must be 0)
%define TSC_AUX_PATTERN 0x7A000             ; + v (bits 63:32 must be 0)
%define SYSENTER_CS_PATTERN 0x10            ; + v << 4
%define SYSENTER_ESP_PATTERN 0xFFFF80005E500000     ; + v << 8
%define SYSENTER_EIP_PATTERN 0xFFFF80005E490000     ; + v << 8
%define FS_MARKER 0xF5F5F5F500000000        ; | v: the qword at FS:0
%define GS_MARKER 0x6565656500000000        ; | v: the qword at GS:0
%define XMM_LOW_PATTERN 0x584D4D0000001010  ; | v << 24 | i << 16
%define XMM_HIGH_PATTERN 0x4849474800002020 ; | v << 24 | i << 16
%define X87_SIGNIFICAND 0x80000000C0FFEE00  ; | v << 48 | k << 40 (bit 63: the explicit integer bit)
%define X87_EXPONENT_BIAS 0x3FFF            ; exponent + v << 4 + k; sign set for odd k
%define X87_SIGN 0x8000
%define X87_REGISTERS 8
%define X87_MIN_KEPT 2                      ; a VP keeps 2 + v mod 6 values on the stack
%define X87_KEPT_CHOICES 6
%define MXCSR_MASKED 0x1F80                 ; every exception masked; | RC, FZ = v & 7 << 13 | flags (v + 1) & 0x3F
%define MXCSR_RC_SHIFT 13
%define MXCSR_FLAGS 0x3F
%define FCW_MASKED 0x007F                   ; every exception masked; | PC << 8 | RC << 10
%define FCW_PC_SHIFT 8
%define FCW_RC_SHIFT 10
%define FCW_PC_DOUBLE 2
%define FCW_PC_EXTENDED 3
%define FSW_TOP_SHIFT 11
%define RFLAGS_FIXED 0x2                    ; bit 1 reads as 1; IF stays 0
%define RFLAGS_MIX 0x2D                     ; the flags chosen: bits of v x RFLAGS_MIX + RFLAGS_SEED
%define RFLAGS_SEED 0x35
%define SETTABLE_FLAGS 7                    ; CF PF AF ZF SF DF OF (flag_positions)
%define VP_SELECTOR_CHOICES 8               ; dr7_values and pat_values hold eight values

; FXSAVE image layout, 64-bit format (SDM Vol. 1 10.5.1, Table 10-2).
%define FX_FCW 0
%define FX_FSW 2
%define FX_FTW 4
%define FX_MXCSR 24
%define FX_ST0 32
%define FX_XMM0 160
%define FX_REGISTER_BYTES 16
%define FX_IMAGE_BYTES 512
%define FX_X87_CONTROL_MASK 0x000000FFFFFFFFFF     ; FCW, FSW, FTW, reserved byte (FOP excluded)
%define FX_MXCSR_MASK 0xFFFFFFFF                   ; MXCSR (not MXCSR_MASK)
%define FX_EXPONENT_MASK 0xFFFF                    ; sign and exponent of an 80-bit register
%define FULL_MASK 0xFFFFFFFFFFFFFFFF

; Descriptors (SDM Vol. 3A 3.4.5, 3.5, 8.2.3). GDT: 0 null, 0x08 code, 0x10-0x30 five data
; descriptors, 0x38 TSS (16 bytes), 0x48 LDT (16 bytes), 0x58 a second code descriptor.
%define CODE64_DESCRIPTOR 0x00AF9B000000FFFF
%define DATA_DESCRIPTOR 0x00CF93000000FFFF
%define CODE_SELECTOR 0x08
%define FIRST_DATA_INDEX 2
%define DATA_DESCRIPTORS 5
%define TSS_SELECTOR 0x38
%define LDT_SELECTOR 0x48
%define ODD_CODE_SELECTOR 0x58              ; odd VPs run with CS = 0x58
%define GDT_BYTES 0x60
%define LDT_DATA_SELECTOR 0x0C              ; LDT entry 1, TI = 1, RPL 0: odd VPs' ES
%define LDT_BYTES 16
%define TSS_BYTES 0x68
%define TSS_TYPE 0x89                       ; present, DPL 0, 64-bit TSS (available)
%define LDT_TYPE 0x82                       ; present, DPL 0, LDT
%define SELECTOR_INDEX_SHIFT 3
%define EXCEPTION_VECTORS 32
%define GATE_BYTES 16
%define INTERRUPT_GATE 0x8E00               ; present, DPL 0, 64-bit interrupt gate
%define STUB_BYTES 16                       ; exception stubs are this far apart
%define IDT_LIMIT_MIX 0x3F                  ; IDT limit: 32 gates + (v & 0x3F) gates, less 1

; Paging (SDM Vol. 3A 4.5): PML4[0] -> PDPT; PDPT[0] -> a PD of 2 MiB pages, PDPT[1-511] 1 GiB pages.
%define PAGE_PRESENT_WRITABLE 0x3
%define PAGE_SIZE_BIT 0x80
%define TABLE_ENTRIES 512
%define TWO_MIB 0x200000
%define ONE_GIB 0x40000000

%define ASCII_ZERO_DIGIT 0x30
%define ASCII_NINE_DIGIT 0x39
%define HEX_LETTER_STEP 0x27                ; from '9' + 1 to 'a'
%define HEX_DIGIT_COUNT 16
%define HEX_PREFIX 0x7830                   ; "0x", little-endian
%define LINE_END 0x0A
%define TEN 10

start:
    ; rdi = VP index, rsi = VP count (docs/guests.md). r14 = v, r15 = the VP's area throughout setup.
    mov r14, rdi
    mov [rip + vp_count], rsi
    mov r15, r14
    shl r15, 16                             ; x VP_AREA_BYTES
    add r15, VP_AREAS
    cld

    ; The area starts zeroed (guest RAM is zero but for the image; be sure for the tables).
    mov rdi, r15
    mov ecx, VP_AREA_BYTES / 8
    xor eax, eax
    rep stosq

    call build_page_tables
    call build_descriptor_tables
    call compute_expected
    call load_state
    push r15                                ; [rsp]: the area, for every round

; A round: the general registers and RFLAGS get their values, a sled of NOPs leaves them alone, then
; everything is read back and compared.
round:
    mov rbx, [rsp]
    push qword ptr [rbx + AREA_EXPECTED + SLOT_RFLAGS * 8]
    push qword ptr [rbx + AREA_EXPECTED + 14 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 13 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 12 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 11 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 10 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 9 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 8 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 7 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 6 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 5 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 4 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 3 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 2 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 1 * 8]
    push qword ptr [rbx + AREA_EXPECTED + 0 * 8]
    pop rax
    pop rbx
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    pop rbp
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    popfq
sled:
    .fill SLED_NOPS, 1, 0x90                ; NOP
    pushfq
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
    cld                                     ; DF is one of the values: string instructions need it clear
    mov r15, [rsp + (GPR_COUNT + 1) * 8]
    mov rsi, rsp
    lea rdi, [r15 + AREA_FOUND]
    mov ecx, GPR_COUNT + 1
    rep movsq                               ; the registers and RFLAGS as found, slots 0-15
    add rsp, (GPR_COUNT + 1) * 8
    call read_state
    call compare
    inc qword ptr [r15 + AREA_ROUNDS] ; rounds done
    mov eax, HC_YIELD
    vmcall
    cmp qword ptr [r15 + AREA_ROUNDS], ROUNDS
    jb round

; The VPs print their summaries in VP order; the last one ends the guest.
    mov r14, r15
    sub r14, VP_AREAS
    shr r14, 16                             ; v again
wait_turn:
    cmp [rip + print_turn], r14
    je my_turn
    mov eax, HC_YIELD
    vmcall
    jmp wait_turn
my_turn:
    lea rdi, [r15 + AREA_LINE]
    lea rsi, [rip + vp_text]
    call append_text
    mov rax, r14
    call append_decimal
    cmp qword ptr [r15 + AREA_CHANGED], 0
    jne summary_changed
    lea rsi, [rip + all_text]
    call append_text
    mov rax, [rip + check_count]
    call append_decimal
    lea rsi, [rip + intact_text]
    call append_text
    jmp summary_end
summary_changed:
    mov byte ptr [rip + any_changed], CHANGED_EXIT_CODE
    mov al, 0x3A                            ; ':'
    stosb
    mov al, 0x20
    stosb
    mov rax, [r15 + AREA_CHANGED]
    call append_decimal
    lea rsi, [rip + of_text]
    call append_text
    mov rax, [rip + check_count]
    call append_decimal
    lea rsi, [rip + changed_text]
    call append_text
summary_end:
    lea rsi, [rip + after_text]
    call append_text
    mov eax, ROUNDS
    call append_decimal
    lea rsi, [rip + checks_text]
    call append_text
    lea r9, [r15 + AREA_LINE]
    call flush_line
    lock inc qword ptr [rip + print_turn]
    mov rax, [rip + vp_count]
    dec rax
    cmp r14, rax
    jne halt_forever
    movzx eax, byte ptr [rip + any_changed]
    jmp exit_guest

; --- setup --------------------------------------------------------------------------------------

; The VP's page tables: the identity map of 512 GiB, the first GiB in 2 MiB pages.
build_page_tables:
    lea rax, [r15 + AREA_PDPT + PAGE_PRESENT_WRITABLE]
    mov [r15 + AREA_PML4], rax
    lea rax, [r15 + AREA_PD + PAGE_PRESENT_WRITABLE]
    mov [r15 + AREA_PDPT], rax
    mov eax, PAGE_PRESENT_WRITABLE | PAGE_SIZE_BIT
    xor ecx, ecx
build_page_tables.pd:
    mov [r15 + AREA_PD + rcx * 8], rax
    add rax, TWO_MIB
    inc ecx
    cmp ecx, TABLE_ENTRIES
    jb build_page_tables.pd
    mov rax, ONE_GIB | PAGE_PRESENT_WRITABLE | PAGE_SIZE_BIT
    mov ecx, 1
build_page_tables.pdpt:
    mov [r15 + AREA_PDPT + rcx * 8], rax
    mov rdx, ONE_GIB
    add rax, rdx
    inc ecx
    cmp ecx, TABLE_ENTRIES
    jb build_page_tables.pdpt
    ret

; The GDT, LDT, TSS and IDT of the VP (loaded later by load_state).
build_descriptor_tables:
    lea rdi, [r15 + AREA_GDT]
    mov rax, CODE64_DESCRIPTOR
    mov [rdi + CODE_SELECTOR], rax
    mov [rdi + ODD_CODE_SELECTOR], rax
    mov rax, DATA_DESCRIPTOR
    mov ecx, FIRST_DATA_INDEX
build_descriptor_tables.data:
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, FIRST_DATA_INDEX + DATA_DESCRIPTORS
    jb build_descriptor_tables.data
    mov [r15 + AREA_LDT + LDT_DATA_SELECTOR - 4], rax      ; LDT entry 1
    lea rdi, [r15 + AREA_GDT + TSS_SELECTOR]
    lea rax, [r15 + AREA_TSS]
    mov edx, TSS_BYTES - 1
    mov ecx, TSS_TYPE
    call system_descriptor
    lea rdi, [r15 + AREA_GDT + LDT_SELECTOR]
    lea rax, [r15 + AREA_LDT]
    mov edx, LDT_BYTES - 1
    mov ecx, LDT_TYPE
    call system_descriptor
    ; IDT: the 32 exception vectors, each to its stub.
    lea rax, [rip + exception_stubs]
    lea rdi, [r15 + AREA_IDT]
    mov ecx, EXCEPTION_VECTORS
build_descriptor_tables.gate:
    mov rdx, rax
    mov word ptr [rdi], dx                  ; offset 15:0
    mov word ptr [rdi + 2], CODE_SELECTOR
    mov word ptr [rdi + 4], INTERRUPT_GATE
    shr rdx, 16
    mov word ptr [rdi + 6], dx              ; offset 31:16
    shr rdx, 16
    mov dword ptr [rdi + 8], edx            ; offset 63:32
    add rax, STUB_BYTES
    add rdi, GATE_BYTES
    dec ecx
    jnz build_descriptor_tables.gate
    ret

; A 16-byte system descriptor at rdi: base rax, limit edx (below 64 KiB), type byte ecx. Clobbers rax, r8, r9.
system_descriptor:
    mov r8, rax
    shl r8, 16
    mov r9d, 0xFFFFFF                       ; base 23:0 at bits 39:16
    shl r9, 16
    and r8, r9
    or r8, rdx                              ; limit 15:0
    mov r9, rcx
    shl r9, 40                              ; type, DPL, P at bits 47:40
    or r8, r9
    mov r9, rax
    shr r9, 24
    and r9, 0xFF
    shl r9, 56                              ; base 31:24 at bits 63:56
    or r8, r9
    mov [rdi], r8
    shr rax, 32
    mov [rdi + 8], rax                      ; base 63:32; the rest 0
    ret

; Every expected value of the VP into AREA_EXPECTED and AREA_FX_EXPECTED (v = r14).
compute_expected:
    ; General registers: GPR_PATTERN | i << 48 | v << 40 | i.
    xor ecx, ecx
compute_expected.gpr:
    mov rax, rcx
    shl rax, 48
    mov rdx, r14
    shl rdx, 40
    or rax, rdx
    mov edx, GPR_PATTERN
    or rax, rdx
    or rax, rcx
    mov [r15 + AREA_EXPECTED + rcx * 8], rax
    inc ecx
    cmp ecx, GPR_COUNT
    jb compute_expected.gpr
    ; RFLAGS: the bits of v x RFLAGS_MIX + RFLAGS_SEED pick among CF PF AF ZF SF DF OF.
    imul eax, r14d, RFLAGS_MIX
    add eax, RFLAGS_SEED
    mov edx, RFLAGS_FIXED
    lea r9, [rip + flag_positions]
    xor ecx, ecx
compute_expected.flag:
    bt eax, ecx
    jnc compute_expected.next_flag
    movzx r8d, byte ptr [r9 + rcx]
    bts edx, r8d
compute_expected.next_flag:
    inc ecx
    cmp ecx, SETTABLE_FLAGS
    jb compute_expected.flag
    mov [r15 + AREA_EXPECTED + SLOT_RFLAGS * 8], rdx
    ; CR2, CR3.
    mov rax, r14
    shl rax, 16
    mov rdx, CR2_PATTERN
    or rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_CR2 * 8], rax
    lea rax, [r15 + AREA_PML4]
    mov [r15 + AREA_EXPECTED + SLOT_CR3 * 8], rax
    ; DR0-DR3: DR_PATTERN + v << 24 + i << 12 + DR_OFFSET.
    xor ecx, ecx
compute_expected.dr:
    mov rax, rcx
    shl rax, 12
    mov rdx, r14
    shl rdx, 24
    add rax, rdx
    mov rdx, DR_PATTERN + DR_OFFSET
    add rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_DR0 * 8 + rcx * 8], rax
    inc ecx
    cmp ecx, 4
    jb compute_expected.dr
    ; DR6: the fixed ones, B0-B3 = v & 0xF, BS for odd v.
    mov eax, r14d
    and eax, 0xF
    or eax, DR6_FIXED_ONES
    test r14d, 1
    jz compute_expected.dr6
    or eax, DR6_BS
compute_expected.dr6:
    mov [r15 + AREA_EXPECTED + SLOT_DR6 * 8], rax
    ; DR7 and PAT from their tables of eight.
    mov rcx, r14
    and ecx, VP_SELECTOR_CHOICES - 1
    lea r9, [rip + dr7_values]
    mov rax, [r9 + rcx * 8]
    mov [r15 + AREA_EXPECTED + SLOT_DR7 * 8], rax
    lea r9, [rip + pat_values]
    mov rax, [r9 + rcx * 8]
    mov [r15 + AREA_EXPECTED + SLOT_PAT * 8], rax
    ; Descriptor-table registers.
    lea rax, [r15 + AREA_GDT]
    mov [r15 + AREA_EXPECTED + SLOT_GDTR_BASE * 8], rax
    mov qword ptr [r15 + AREA_EXPECTED + SLOT_GDTR_LIMIT * 8], GDT_BYTES - 1
    lea rax, [r15 + AREA_IDT]
    mov [r15 + AREA_EXPECTED + SLOT_IDTR_BASE * 8], rax
    mov eax, r14d
    and eax, IDT_LIMIT_MIX
    add eax, EXCEPTION_VECTORS
    shl eax, 4                              ; x GATE_BYTES
    dec eax
    mov [r15 + AREA_EXPECTED + SLOT_IDTR_LIMIT * 8], rax
    mov qword ptr [r15 + AREA_EXPECTED + SLOT_TR * 8], TSS_SELECTOR
    mov qword ptr [r15 + AREA_EXPECTED + SLOT_LDTR * 8], LDT_SELECTOR
    ; Selectors: CS 0x08 (even v) or 0x58 (odd v); DS, ES, FS, GS, SS take data descriptors
    ; FIRST_DATA_INDEX + (segment + v) mod 5; odd VPs' ES is the LDT's data descriptor.
    mov eax, CODE_SELECTOR
    test r14d, 1
    jz compute_expected.cs
    mov eax, ODD_CODE_SELECTOR
compute_expected.cs:
    mov [r15 + AREA_EXPECTED + SLOT_CS * 8], rax
    xor ecx, ecx
compute_expected.selector:
    lea eax, [rcx + r14]
    xor edx, edx
    mov r8d, DATA_DESCRIPTORS
    div r8d
    lea eax, [rdx + FIRST_DATA_INDEX]
    shl eax, SELECTOR_INDEX_SHIFT
    mov [r15 + AREA_EXPECTED + SLOT_DS * 8 + rcx * 8], rax
    inc ecx
    cmp ecx, DATA_DESCRIPTORS
    jb compute_expected.selector
    test r14d, 1
    jz compute_expected.msrs
    mov qword ptr [r15 + AREA_EXPECTED + SLOT_ES * 8], LDT_DATA_SELECTOR
compute_expected.msrs:
    ; FS and GS bases point into the area; the markers there.
    lea rax, [r15 + AREA_FS_TARGET]
    mov [r15 + AREA_EXPECTED + SLOT_FS_BASE * 8], rax
    lea rax, [r15 + AREA_GS_TARGET]
    mov [r15 + AREA_EXPECTED + SLOT_GS_BASE * 8], rax
    mov rax, FS_MARKER
    or rax, r14
    mov [r15 + AREA_EXPECTED + SLOT_FS_MARKER * 8], rax
    mov [r15 + AREA_FS_TARGET], rax
    mov rax, GS_MARKER
    or rax, r14
    mov [r15 + AREA_EXPECTED + SLOT_GS_MARKER * 8], rax
    mov [r15 + AREA_GS_TARGET], rax
    mov rax, r14
    shl rax, 12
    mov rdx, KERNEL_GS_PATTERN
    or rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_KERNEL_GS_BASE * 8], rax
    mov rax, STAR_PATTERN
    add rax, r14
    mov [r15 + AREA_EXPECTED + SLOT_STAR * 8], rax
    mov rdx, r14
    shl rdx, 4
    mov rax, LSTAR_PATTERN
    add rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_LSTAR * 8], rax
    mov rax, CSTAR_PATTERN
    add rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_CSTAR * 8], rax
    lea rax, [r14 + FMASK_PATTERN]
    mov [r15 + AREA_EXPECTED + SLOT_FMASK * 8], rax
    lea rax, [r14 + TSC_AUX_PATTERN]
    mov [r15 + AREA_EXPECTED + SLOT_TSC_AUX * 8], rax
    lea rax, [rdx + SYSENTER_CS_PATTERN]
    mov [r15 + AREA_EXPECTED + SLOT_SYSENTER_CS * 8], rax
    mov rdx, r14
    shl rdx, 8
    mov rax, SYSENTER_ESP_PATTERN
    add rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_SYSENTER_ESP * 8], rax
    mov rax, SYSENTER_EIP_PATTERN
    add rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_SYSENTER_EIP * 8], rax
    mov ecx, IA32_EFER
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rdx, r14
    and edx, EFER_SCE
    or rax, rdx
    mov [r15 + AREA_EXPECTED + SLOT_EFER * 8], rax
    mov rax, cr0
    mov [r15 + AREA_EXPECTED + SLOT_CR0 * 8], rax
    mov rax, cr4
    mov [r15 + AREA_EXPECTED + SLOT_CR4 * 8], rax
    ; x87: the eight 80-bit values k = 0-7 (significand, then sign and exponent).
    lea rdi, [r15 + AREA_X87_VALUES]
    xor ecx, ecx
compute_expected.x87_value:
    mov rax, r14
    shl rax, 48
    mov rdx, rcx
    shl rdx, 40
    or rax, rdx
    mov rdx, X87_SIGNIFICAND
    or rax, rdx
    mov [rdi], rax
    mov rax, r14
    shl eax, 4
    lea eax, [rax + rcx + X87_EXPONENT_BIAS]
    test ecx, 1
    jz compute_expected.positive
    or eax, X87_SIGN
compute_expected.positive:
    mov word ptr [rdi + 8], ax
    add rdi, FX_REGISTER_BYTES
    inc ecx
    cmp ecx, X87_REGISTERS
    jb compute_expected.x87_value
    ; The FXSAVE image expected: n = X87_MIN_KEPT + v mod 6 values stay on the stack, TOP = 8 - n.
    mov eax, r14d
    xor edx, edx
    mov r8d, X87_KEPT_CHOICES
    div r8d
    lea r10d, [rdx + X87_MIN_KEPT]          ; r10 = n
    lea rdi, [r15 + AREA_FX_EXPECTED]
    mov r11d, X87_REGISTERS
    sub r11d, r10d                          ; r11 = TOP
    mov eax, r11d
    shl eax, FSW_TOP_SHIFT
    mov word ptr [rdi + FX_FSW], ax
    mov eax, 0xFF
    mov ecx, r11d
    shl eax, cl
    mov byte ptr [rdi + FX_FTW], al         ; abridged tag: physical registers TOP-7 valid
    ; FCW: rounding v & 3, precision double for v & 4, else extended.
    mov eax, r14d
    and eax, 3
    shl eax, FCW_RC_SHIFT
    or eax, FCW_MASKED | (FCW_PC_EXTENDED << FCW_PC_SHIFT)
    test r14d, 4
    jz compute_expected.fcw
    xor eax, (FCW_PC_EXTENDED ^ FCW_PC_DOUBLE) << FCW_PC_SHIFT
compute_expected.fcw:
    mov word ptr [rdi + FX_FCW], ax
    ; MXCSR: rounding control and flush-to-zero from v & 7, sticky flags (v + 1) & 0x3F.
    mov eax, r14d
    and eax, 7
    shl eax, MXCSR_RC_SHIFT
    lea edx, [r14 + 1]
    and edx, MXCSR_FLAGS
    or eax, edx
    or eax, MXCSR_MASKED
    mov dword ptr [rdi + FX_MXCSR], eax
    ; ST(i): value n - 1 - i for i < n, value 7 - i + n for the empty registers below TOP.
    xor ecx, ecx
compute_expected.st:
    lea eax, [r10 - 1]
    sub eax, ecx
    cmp ecx, r10d
    jb compute_expected.st_value
    mov eax, X87_REGISTERS - 1
    sub eax, ecx
    add eax, r10d
compute_expected.st_value:
    shl eax, 4                              ; x FX_REGISTER_BYTES
    lea rsi, [r15 + AREA_X87_VALUES]
    mov rdx, [rsi + rax]
    mov r8, rcx
    shl r8, 4                               ; x FX_REGISTER_BYTES
    mov [rdi + FX_ST0 + r8], rdx
    movzx edx, word ptr [rsi + rax + 8]
    mov word ptr [rdi + FX_ST0 + 8 + r8], dx
    inc ecx
    cmp ecx, X87_REGISTERS
    jb compute_expected.st
    ; XMM i: the patterns | v << 24 | i << 16.
    xor ecx, ecx
    lea rsi, [rdi + FX_XMM0]
compute_expected.xmm:
    mov rax, r14
    shl rax, 24
    mov rdx, rcx
    shl rdx, 16
    or rax, rdx
    mov rdx, XMM_LOW_PATTERN
    or rdx, rax
    mov [rsi], rdx
    mov rdx, XMM_HIGH_PATTERN
    or rdx, rax
    mov [rsi + 8], rdx
    add rsi, FX_REGISTER_BYTES
    inc ecx
    cmp ecx, 16
    jb compute_expected.xmm
    ret

; Gives the VP every expected value (but the general registers and RFLAGS: each round does those).
load_state:
    mov rax, [r15 + AREA_EXPECTED + SLOT_CR3 * 8]
    mov cr3, rax
    ; GDT, then CS by a far return, TR, LDTR, the data segments.
    mov word ptr [r15 + AREA_SCRATCH], GDT_BYTES - 1
    lea rax, [r15 + AREA_GDT]
    mov [r15 + AREA_SCRATCH + 2], rax
    lgdt [r15 + AREA_SCRATCH]
    push qword ptr [r15 + AREA_EXPECTED + SLOT_CS * 8]
    lea rax, [rip + load_state.new_cs]
    push rax
    retfq
load_state.new_cs:
    mov ax, TSS_SELECTOR
    ltr ax
    mov ax, LDT_SELECTOR
    lldt ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DS * 8]
    mov ds, ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_ES * 8]
    mov es, ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_FS * 8]
    mov fs, ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_GS * 8]
    mov gs, ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_SS * 8]
    mov ss, ax
    mov rax, [r15 + AREA_EXPECTED + SLOT_IDTR_LIMIT * 8]
    mov word ptr [r15 + AREA_SCRATCH], ax
    lea rax, [r15 + AREA_IDT]
    mov [r15 + AREA_SCRATCH + 2], rax
    lidt [r15 + AREA_SCRATCH]
    ; MSRs by WRMSR (after the FS and GS selectors, whose loads set the bases from the descriptors).
    lea rsi, [rip + msr_table]
load_state.msr:
    mov ecx, [rsi]
    test ecx, ecx
    jz load_state.control
    mov eax, [rsi + 4]
    mov rax, [r15 + AREA_EXPECTED + rax * 8]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    add rsi, 8
    jmp load_state.msr
load_state.control:
    mov rax, [r15 + AREA_EXPECTED + SLOT_CR2 * 8]
    mov cr2, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR0 * 8]
    mov dr0, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR0 * 8 + 8]
    mov dr1, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR0 * 8 + 16]
    mov dr2, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR0 * 8 + 24]
    mov dr3, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR6 * 8]
    mov dr6, rax
    mov rax, [r15 + AREA_EXPECTED + SLOT_DR7 * 8]
    mov dr7, rax
    ; x87: eight values pushed, 8 - n popped (their registers keep them, empty), then the control word.
    fninit
    lea rsi, [r15 + AREA_X87_VALUES]
    mov ecx, X87_REGISTERS
load_state.push:
    fld tbyte ptr [rsi]
    add rsi, FX_REGISTER_BYTES
    dec ecx
    jnz load_state.push
    movzx ecx, word ptr [r15 + AREA_FX_EXPECTED + FX_FSW]
    shr ecx, FSW_TOP_SHIFT
load_state.pop:
    fstp st(0)
    dec ecx
    jnz load_state.pop
    fldcw word ptr [r15 + AREA_FX_EXPECTED + FX_FCW]
    ldmxcsr dword ptr [r15 + AREA_FX_EXPECTED + FX_MXCSR]
    movdqu xmm0, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 0 * FX_REGISTER_BYTES]
    movdqu xmm1, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 1 * FX_REGISTER_BYTES]
    movdqu xmm2, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 2 * FX_REGISTER_BYTES]
    movdqu xmm3, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 3 * FX_REGISTER_BYTES]
    movdqu xmm4, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 4 * FX_REGISTER_BYTES]
    movdqu xmm5, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 5 * FX_REGISTER_BYTES]
    movdqu xmm6, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 6 * FX_REGISTER_BYTES]
    movdqu xmm7, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 7 * FX_REGISTER_BYTES]
    movdqu xmm8, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 8 * FX_REGISTER_BYTES]
    movdqu xmm9, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 9 * FX_REGISTER_BYTES]
    movdqu xmm10, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 10 * FX_REGISTER_BYTES]
    movdqu xmm11, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 11 * FX_REGISTER_BYTES]
    movdqu xmm12, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 12 * FX_REGISTER_BYTES]
    movdqu xmm13, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 13 * FX_REGISTER_BYTES]
    movdqu xmm14, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 14 * FX_REGISTER_BYTES]
    movdqu xmm15, xmmword ptr [r15 + AREA_FX_EXPECTED + FX_XMM0 + 15 * FX_REGISTER_BYTES]
    ret

; --- each round ---------------------------------------------------------------------------------

; Everything but the general registers and RFLAGS read back into AREA_FOUND and AREA_FX_FOUND.
read_state:
    mov rax, cr2
    mov [r15 + AREA_FOUND + SLOT_CR2 * 8], rax
    mov rax, cr3
    mov [r15 + AREA_FOUND + SLOT_CR3 * 8], rax
    mov rax, cr0
    mov [r15 + AREA_FOUND + SLOT_CR0 * 8], rax
    mov rax, cr4
    mov [r15 + AREA_FOUND + SLOT_CR4 * 8], rax
    mov rax, dr0
    mov [r15 + AREA_FOUND + SLOT_DR0 * 8], rax
    mov rax, dr1
    mov [r15 + AREA_FOUND + SLOT_DR0 * 8 + 8], rax
    mov rax, dr2
    mov [r15 + AREA_FOUND + SLOT_DR0 * 8 + 16], rax
    mov rax, dr3
    mov [r15 + AREA_FOUND + SLOT_DR0 * 8 + 24], rax
    mov rax, dr6
    mov [r15 + AREA_FOUND + SLOT_DR6 * 8], rax
    mov rax, dr7
    mov [r15 + AREA_FOUND + SLOT_DR7 * 8], rax
    sgdt [r15 + AREA_SCRATCH]
    movzx eax, word ptr [r15 + AREA_SCRATCH]
    mov [r15 + AREA_FOUND + SLOT_GDTR_LIMIT * 8], rax
    mov rax, [r15 + AREA_SCRATCH + 2]
    mov [r15 + AREA_FOUND + SLOT_GDTR_BASE * 8], rax
    sidt [r15 + AREA_SCRATCH]
    movzx eax, word ptr [r15 + AREA_SCRATCH]
    mov [r15 + AREA_FOUND + SLOT_IDTR_LIMIT * 8], rax
    mov rax, [r15 + AREA_SCRATCH + 2]
    mov [r15 + AREA_FOUND + SLOT_IDTR_BASE * 8], rax
    xor eax, eax
    str ax
    mov [r15 + AREA_FOUND + SLOT_TR * 8], rax
    sldt ax
    mov [r15 + AREA_FOUND + SLOT_LDTR * 8], rax
    mov ax, cs
    mov [r15 + AREA_FOUND + SLOT_CS * 8], rax
    mov ax, ds
    mov [r15 + AREA_FOUND + SLOT_DS * 8], rax
    mov ax, es
    mov [r15 + AREA_FOUND + SLOT_ES * 8], rax
    mov ax, fs
    mov [r15 + AREA_FOUND + SLOT_FS * 8], rax
    mov ax, gs
    mov [r15 + AREA_FOUND + SLOT_GS * 8], rax
    mov ax, ss
    mov [r15 + AREA_FOUND + SLOT_SS * 8], rax
    xor eax, eax
    mov rax, qword ptr fs:[rax]             ; through the FS base actually in use
    mov [r15 + AREA_FOUND + SLOT_FS_MARKER * 8], rax
    xor eax, eax
    mov rax, qword ptr gs:[rax]
    mov [r15 + AREA_FOUND + SLOT_GS_MARKER * 8], rax
    lea rsi, [rip + msr_table]
read_state.msr:
    mov ecx, [rsi]
    test ecx, ecx
    jz read_state.fx
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov edx, [rsi + 4]
    mov [r15 + AREA_FOUND + rdx * 8], rax
    add rsi, 8
    jmp read_state.msr
read_state.fx:
    fxsave [r15 + AREA_FX_FOUND]
    ret

; Every check of the table: expected and found under the mask; a difference not yet reported is
; printed and counted. Sets check_count.
compare:
    lea rbx, [rip + checks]
    xor r12d, r12d                          ; check number
compare.next:
    movzx eax, word ptr [rbx]
    test eax, eax
    jz compare.done
    movzx edx, word ptr [rbx + 2]
    mov r13, [r15 + rax]                    ; expected
    mov r14, [r15 + rdx]                    ; found
    mov rcx, [rbx + 8]
    and r13, rcx
    and r14, rcx
    cmp r13, r14
    je compare.skip_name
    cmp byte ptr [r15 + AREA_REPORTED + r12], 0
    jne compare.skip_name
    mov byte ptr [r15 + AREA_REPORTED + r12], 1
    inc qword ptr [r15 + AREA_CHANGED]
    call report_change
compare.skip_name:
    add rbx, 16
compare.name:
    inc rbx
    cmp byte ptr [rbx - 1], 0
    jne compare.name
    inc r12
    jmp compare.next
compare.done:
    mov [rip + check_count], r12
    ret

; "cpustate vp N: NAME expected 0x..., found 0x..." for check rbx (expected r13, found r14).
report_change:
    lea rdi, [r15 + AREA_LINE]
    lea rsi, [rip + vp_text]
    call append_text
    mov rax, r15
    sub rax, VP_AREAS
    shr rax, 16
    call append_decimal
    mov al, 0x3A                            ; ':'
    stosb
    mov al, 0x20
    stosb
    lea rsi, [rbx + 16]
    call append_text
    lea rsi, [rip + expected_text]
    call append_text
    mov rax, r13
    call append_hex
    lea rsi, [rip + found_text]
    call append_text
    mov rax, r14
    call append_hex
    lea r9, [r15 + AREA_LINE]
    jmp flush_line

; --- console lines ------------------------------------------------------------------------------

; rsi = NUL-terminated text, appended at rdi. Clobbers rax, rsi.
append_text:
    lodsb
    test al, al
    jz append_text.done
    stosb
    jmp append_text
append_text.done:
    ret

; rax = unsigned number, appended at rdi in decimal. Clobbers rax, rcx, rdx, r8.
append_decimal:
    xor r8d, r8d
    mov ecx, TEN
append_decimal.divide:
    xor edx, edx
    div rcx
    add edx, ASCII_ZERO_DIGIT
    push rdx
    inc r8
    test rax, rax
    jnz append_decimal.divide
append_decimal.emit:
    pop rax
    stosb
    dec r8
    jnz append_decimal.emit
    ret

; rax = value, appended at rdi as 0x and 16 hex digits. Clobbers rax, rcx, rdx.
append_hex:
    mov word ptr [rdi], HEX_PREFIX
    add rdi, 2
    mov ecx, HEX_DIGIT_COUNT
append_hex.digit:
    rol rax, 4
    mov edx, eax
    and edx, 0xF
    add edx, ASCII_ZERO_DIGIT
    cmp edx, ASCII_NINE_DIGIT
    jbe append_hex.store
    add edx, HEX_LETTER_STEP
append_hex.store:
    mov [rdi], dl
    inc rdi
    dec ecx
    jnz append_hex.digit
    ret

; The line from r9 to rdi, and a newline: one console-write hypercall. Clobbers rax, rsi, rdi.
flush_line:
    mov byte ptr [rdi], LINE_END
    inc rdi
    sub rdi, r9
    mov rsi, rdi                            ; length
    mov rdi, r9
    mov eax, HC_CONSOLE_WRITE
    vmcall
    ret

; --- exceptions ---------------------------------------------------------------------------------

; One stub per exception vector, STUB_BYTES apart: each leaves [rsp] = vector, [rsp + 8] = error
; code (0 if the exception has none), [rsp + 16] = RIP.
%macro STUB vector
.align STUB_BYTES
    push 0
    push %vector
    jmp unexpected_exception
%endmacro
%macro STUB_WITH_ERROR vector
.align STUB_BYTES
    push %vector
    jmp unexpected_exception
%endmacro
.align STUB_BYTES
exception_stubs:
    STUB 0
    STUB 1
    STUB 2
    STUB 3
    STUB 4
    STUB 5
    STUB 6
    STUB 7
    STUB_WITH_ERROR 8
    STUB 9
    STUB_WITH_ERROR 10
    STUB_WITH_ERROR 11
    STUB_WITH_ERROR 12
    STUB_WITH_ERROR 13
    STUB_WITH_ERROR 14
    STUB 15
    STUB 16
    STUB_WITH_ERROR 17
    STUB 18
    STUB 19
    STUB 20
    STUB_WITH_ERROR 21
    STUB 22
    STUB 23
    STUB 24
    STUB 25
    STUB 26
    STUB 27
    STUB 28
    STUB_WITH_ERROR 29
    STUB_WITH_ERROR 30
    STUB 31

; "cpustate: exception V at RIP 0x..., error code 0x...", and the guest ends with EXCEPTION_EXIT_CODE.
unexpected_exception:
    cld
    lea rdi, [rip + exception_line]
    lea rsi, [rip + exception_text]
    call append_text
    mov rax, [rsp]
    call append_decimal
    lea rsi, [rip + at_rip_text]
    call append_text
    mov rax, [rsp + 16]
    call append_hex
    lea rsi, [rip + error_code_text]
    call append_text
    mov rax, [rsp + 8]
    call append_hex
    lea r9, [rip + exception_line]
    call flush_line
    mov al, EXCEPTION_EXIT_CODE
exit_guest:
    out EXIT_PORT, al
halt_forever:
    hlt
    jmp halt_forever

; --- data ---------------------------------------------------------------------------------------

; The settable arithmetic flags and DF, by bit number (SDM Vol. 1 3.4.3).
flag_positions:
    .byte 0, 2, 4, 6, 7, 10, 11
; DR7 for v mod 8: no breakpoint enabled; LE for odd v; R/W0-3 among 0, 1, 3 (never 2, I/O) and
; LEN0-3 among 0-3 (SDM Vol. 3B 18.2.4).
.align 8
dr7_values:
    .quad 0x83900400, 0xD4F50500, 0x390B0400, 0x4F5C0500, 0x90B10400, 0xF5C70500, 0x0B180400, 0x5C7D0500
; PAT for v mod 8: every entry one of the memory types 0, 1, 4, 5, 6, 7 (SDM Vol. 3A 12.12.2).
pat_values:
    .quad 0x0506040700010506, 0x0604070001050604, 0x0407000105060407, 0x0700010506040700
    .quad 0x0001050604070001, 0x0105060407000105, 0x0406050100070406, 0x0704060501000704
; MSRs set by WRMSR and read by RDMSR: index, slot (FS and GS bases first); EFER
; last: its expected value is the guest's own with SCE for odd VPs.
msr_table:
    .long IA32_FS_BASE, SLOT_FS_BASE
    .long IA32_GS_BASE, SLOT_GS_BASE
    .long IA32_KERNEL_GS_BASE, SLOT_KERNEL_GS_BASE
    .long IA32_STAR, SLOT_STAR
    .long IA32_LSTAR, SLOT_LSTAR
    .long IA32_CSTAR, SLOT_CSTAR
    .long IA32_FMASK, SLOT_FMASK
    .long IA32_TSC_AUX, SLOT_TSC_AUX
    .long IA32_PAT, SLOT_PAT
    .long IA32_SYSENTER_CS, SLOT_SYSENTER_CS
    .long IA32_SYSENTER_ESP, SLOT_SYSENTER_ESP
    .long IA32_SYSENTER_EIP, SLOT_SYSENTER_EIP
    .long IA32_EFER, SLOT_EFER
    .long 0, 0

; The checks: expected offset, found offset (both in the VP's area; 0 ends the table), a mask of
; the bits compared, the name printed.
%macro CHECK slot, name
    .word AREA_EXPECTED + (%slot) * 8, AREA_FOUND + (%slot) * 8
    .long 0
    .quad FULL_MASK
    .asciz %name
%endmacro
%macro FX_CHECK offset, mask, name
    .word AREA_FX_EXPECTED + %offset, AREA_FX_FOUND + %offset
    .long 0
    .quad %mask
    .asciz %name
%endmacro
%macro ST_CHECK register, significand, exponent
    FX_CHECK FX_ST0 + %register * FX_REGISTER_BYTES, FULL_MASK, %significand
    FX_CHECK FX_ST0 + %register * FX_REGISTER_BYTES + 8, FX_EXPONENT_MASK, %exponent
%endmacro
%macro XMM_CHECK register, low, high
    FX_CHECK FX_XMM0 + %register * FX_REGISTER_BYTES, FULL_MASK, %low
    FX_CHECK FX_XMM0 + %register * FX_REGISTER_BYTES + 8, FULL_MASK, %high
%endmacro
checks:
    CHECK 0, "rax"
    CHECK 1, "rbx"
    CHECK 2, "rcx"
    CHECK 3, "rdx"
    CHECK 4, "rsi"
    CHECK 5, "rdi"
    CHECK 6, "rbp"
    CHECK 7, "r8"
    CHECK 8, "r9"
    CHECK 9, "r10"
    CHECK 10, "r11"
    CHECK 11, "r12"
    CHECK 12, "r13"
    CHECK 13, "r14"
    CHECK 14, "r15"
    CHECK SLOT_RFLAGS, "rflags"
    CHECK SLOT_CR0, "cr0"
    CHECK SLOT_CR2, "cr2"
    CHECK SLOT_CR3, "cr3"
    CHECK SLOT_CR4, "cr4"
    CHECK SLOT_DR0, "dr0"
    CHECK SLOT_DR0 + 1, "dr1"
    CHECK SLOT_DR0 + 2, "dr2"
    CHECK SLOT_DR0 + 3, "dr3"
    CHECK SLOT_DR6, "dr6"
    CHECK SLOT_DR7, "dr7"
    CHECK SLOT_GDTR_BASE, "gdtr base"
    CHECK SLOT_GDTR_LIMIT, "gdtr limit"
    CHECK SLOT_IDTR_BASE, "idtr base"
    CHECK SLOT_IDTR_LIMIT, "idtr limit"
    CHECK SLOT_TR, "tr"
    CHECK SLOT_LDTR, "ldtr"
    CHECK SLOT_CS, "cs"
    CHECK SLOT_DS, "ds"
    CHECK SLOT_ES, "es"
    CHECK SLOT_FS, "fs"
    CHECK SLOT_GS, "gs"
    CHECK SLOT_SS, "ss"
    CHECK SLOT_FS_BASE, "fs base"
    CHECK SLOT_GS_BASE, "gs base"
    CHECK SLOT_FS_MARKER, "qword at fs:0"
    CHECK SLOT_GS_MARKER, "qword at gs:0"
    CHECK SLOT_KERNEL_GS_BASE, "kernel gs base"
    CHECK SLOT_STAR, "star"
    CHECK SLOT_LSTAR, "lstar"
    CHECK SLOT_CSTAR, "cstar"
    CHECK SLOT_FMASK, "fmask"
    CHECK SLOT_TSC_AUX, "tsc aux"
    CHECK SLOT_PAT, "pat"
    CHECK SLOT_SYSENTER_CS, "sysenter cs"
    CHECK SLOT_SYSENTER_ESP, "sysenter esp"
    CHECK SLOT_SYSENTER_EIP, "sysenter eip"
    CHECK SLOT_EFER, "efer"
    FX_CHECK FX_FCW, FX_X87_CONTROL_MASK, "x87 fcw fsw ftw"
    FX_CHECK FX_MXCSR, FX_MXCSR_MASK, "mxcsr"
    ST_CHECK 0, "st0 significand", "st0 exponent"
    ST_CHECK 1, "st1 significand", "st1 exponent"
    ST_CHECK 2, "st2 significand", "st2 exponent"
    ST_CHECK 3, "st3 significand", "st3 exponent"
    ST_CHECK 4, "st4 significand", "st4 exponent"
    ST_CHECK 5, "st5 significand", "st5 exponent"
    ST_CHECK 6, "st6 significand", "st6 exponent"
    ST_CHECK 7, "st7 significand", "st7 exponent"
    XMM_CHECK 0, "xmm0 low", "xmm0 high"
    XMM_CHECK 1, "xmm1 low", "xmm1 high"
    XMM_CHECK 2, "xmm2 low", "xmm2 high"
    XMM_CHECK 3, "xmm3 low", "xmm3 high"
    XMM_CHECK 4, "xmm4 low", "xmm4 high"
    XMM_CHECK 5, "xmm5 low", "xmm5 high"
    XMM_CHECK 6, "xmm6 low", "xmm6 high"
    XMM_CHECK 7, "xmm7 low", "xmm7 high"
    XMM_CHECK 8, "xmm8 low", "xmm8 high"
    XMM_CHECK 9, "xmm9 low", "xmm9 high"
    XMM_CHECK 10, "xmm10 low", "xmm10 high"
    XMM_CHECK 11, "xmm11 low", "xmm11 high"
    XMM_CHECK 12, "xmm12 low", "xmm12 high"
    XMM_CHECK 13, "xmm13 low", "xmm13 high"
    XMM_CHECK 14, "xmm14 low", "xmm14 high"
    XMM_CHECK 15, "xmm15 low", "xmm15 high"
    .word 0

vp_text:
    .asciz "cpustate vp "
all_text:
    .asciz ": all "
of_text:
    .asciz " of "
changed_text:
    .asciz " values changed"
intact_text:
    .asciz " values intact"
after_text:
    .asciz " after "
checks_text:
    .asciz " checks"
expected_text:
    .asciz " expected "
found_text:
    .asciz ", found "
exception_text:
    .asciz "cpustate: exception "
at_rip_text:
    .asciz " at RIP "
error_code_text:
    .asciz ", error code "
.align 8
vp_count:
    .quad 0
print_turn:
    .quad 0
check_count:
    .quad 0
any_changed:
    .quad 0
exception_line:
    .zero 128
