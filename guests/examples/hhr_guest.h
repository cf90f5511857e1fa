/*
 * hhr_guest.h: what the C guests of guests/examples share, from the guest ABI (docs/guests.md):
 * the entry point, the console (COM1), the exit port, the clock, hexadecimal and decimal printing,
 * and the memcpy/memset that gcc calls on its own in freestanding code, written with SSE2 vectors.
 *
 * A guest includes it, defines `void hhr_main(void)` and is built with the line in docs/guests.md;
 * no runtime, no libc. hhr_main returning ends the guest with exit code 0.
 */
#ifndef HHR_GUEST_H
#define HHR_GUEST_H

#define HHR_COM1 0x3F8           /* OUT a byte: the guest's console */
#define HHR_EXIT_PORT 0xF4       /* OUT a byte: the guest ends with that exit code */
#define HHR_CLOCK_LOW 0x500      /* IN: virtual time, bits 31:0 (latches the high half) */
#define HHR_CLOCK_HIGH 0x504     /* IN: virtual time, bits 63:32 */

#define HHR_STRINGIFY_VALUE(x) #x
#define HHR_STRINGIFY(x) HHR_STRINGIFY_VALUE(x)

/* 16 bytes in an XMM register; aligned(1) lets them sit anywhere in memory (MOVDQU). */
typedef long long hhr_vector __attribute__((vector_size(16), aligned(1), may_alias));

static inline void hhr_outb(unsigned short port, unsigned char value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned int hhr_inl(unsigned short port) {
    unsigned int value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline unsigned long hhr_clock(void) {
    unsigned long low = hhr_inl(HHR_CLOCK_LOW);
    return ((unsigned long)hhr_inl(HHR_CLOCK_HIGH) << 32) | low;
}

static inline void hhr_print(const char *text) {
    while (*text) hhr_outb(HHR_COM1, (unsigned char)*text++);
}

static inline void hhr_print_unsigned(unsigned long value) {
    char digits[24];
    int length = 0;
    do {
        digits[length++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (length) hhr_outb(HHR_COM1, (unsigned char)digits[--length]);
}

/* `digits` hexadecimal digits of value, most significant first. */
static inline void hhr_print_hex(unsigned long value, int digits) {
    while (digits--) hhr_outb(HHR_COM1, (unsigned char)"0123456789abcdef"[(value >> (4 * digits)) & 0xF]);
}

__attribute__((noreturn)) static inline void hhr_exit(unsigned char code) {
    hhr_outb(HHR_EXIT_PORT, code);
    for (;;) __asm__ volatile("hlt");
}

void hhr_main(void);

/*
 * The entry point. RSP is 16-byte aligned at entry and sits at the top of guest RAM (docs/guests.md),
 * so nothing may be read above it; the CALL leaves RSP at 16n+8, as a called function expects
 * (System V ABI 3.2.2), and the exit port ends the guest when hhr_main returns.
 */
__asm__(".text\n"
        ".globl _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "    call hhr_main\n"
        "    xor %eax, %eax\n"
        "    outb %al, $" HHR_STRINGIFY(HHR_EXIT_PORT) "\n"
        "1:  hlt\n"
        "    jmp 1b\n");

/*
 * gcc may call memcpy and memset in freestanding code (block copies, zeroing); these are them.
 * Single bytes until the destination is 16-byte aligned (as C libraries do; on hhr's machine a
 * store that is not 8-byte aligned costs about five times an aligned one), then 64 bytes per step
 * through four XMM registers, then 16, then single bytes. The byte loops must not be turned back into calls to memcpy/memset: hence
 * no-tree-loop-distribute-patterns.
 */
#define HHR_VECTOR_ALIGNMENT 16
__attribute__((optimize("no-tree-loop-distribute-patterns")))
void *memcpy(void *restrict destination, const void *restrict source, unsigned long count) {
    unsigned char *to = destination;
    const unsigned char *from = source;
    for (; count && (unsigned long)to % HHR_VECTOR_ALIGNMENT; count--) *to++ = *from++;
    for (; count >= 64; count -= 64, to += 64, from += 64) {
        hhr_vector a = ((const hhr_vector *)from)[0], b = ((const hhr_vector *)from)[1];
        hhr_vector c = ((const hhr_vector *)from)[2], d = ((const hhr_vector *)from)[3];
        ((hhr_vector *)to)[0] = a;
        ((hhr_vector *)to)[1] = b;
        ((hhr_vector *)to)[2] = c;
        ((hhr_vector *)to)[3] = d;
    }
    for (; count >= 16; count -= 16, to += 16, from += 16)
        *(hhr_vector *)to = *(const hhr_vector *)from;
    while (count--) *to++ = *from++;
    return destination;
}

__attribute__((optimize("no-tree-loop-distribute-patterns")))
void *memset(void *destination, int value, unsigned long count) {
    unsigned char *to = destination;
    unsigned char byte = (unsigned char)value;
    hhr_vector pattern = (hhr_vector){0, 0} + (long long)(0x0101010101010101ULL * byte);
    for (; count && (unsigned long)to % HHR_VECTOR_ALIGNMENT; count--) *to++ = byte;
    for (; count >= 64; count -= 64, to += 64) {
        ((hhr_vector *)to)[0] = pattern;
        ((hhr_vector *)to)[1] = pattern;
        ((hhr_vector *)to)[2] = pattern;
        ((hhr_vector *)to)[3] = pattern;
    }
    for (; count >= 16; count -= 16, to += 16)
        *(hhr_vector *)to = pattern;
    while (count--) *to++ = byte;
    return destination;
}

#endif
