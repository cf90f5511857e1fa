/*
 * A C guest for hhr, written from docs/guests.md alone: counts primes below 50000 with trial
 * division, prints the count on COM1, reads the clock, and exits with code 0 through port 0xF4.
 *
 * Build (gcc on x86-64 Linux):
 *   gcc -O2 -ffreestanding -fno-pie -no-pie -nostdlib -static -mno-red-zone \
 *       -Wl,-Ttext-segment=0x100000 -Wl,--build-id=none -o primes.elf primes.c
 * Run:
 *   hhr run --guest primes.elf
 */
#define COM1 0x3F8
#define EXIT_PORT 0xF4
#define CLOCK_LOW 0x500
#define CLOCK_HIGH 0x504
#define LIMIT 50000

static inline void outb(unsigned short port, unsigned char value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned int inl(unsigned short port) {
    unsigned int value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static void print(const char *text) {
    while (*text) outb(COM1, (unsigned char)*text++);
}

static void print_number(unsigned long value) {
    char digits[24];
    int length = 0;
    do {
        digits[length++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (length) outb(COM1, (unsigned char)digits[--length]);
}

static unsigned long clock(void) {
    unsigned long low = inl(CLOCK_LOW);          /* reading the low half latches the high half */
    return ((unsigned long)inl(CLOCK_HIGH) << 32) | low;
}

static unsigned long counted;                    /* in .bss: the loader zeroes it */

__attribute__((force_align_arg_pointer, noreturn)) void _start(void) {
    unsigned long started = clock();
    for (unsigned long n = 2; n < LIMIT; n++) {
        int prime = 1;
        for (unsigned long d = 2; d * d <= n; d++)
            if (n % d == 0) { prime = 0; break; }
        counted += prime;
    }
    print("C guest: primes below 50000: ");
    print_number(counted);
    print("\n");
    print(clock() > started ? "clock runs\n" : "clock stuck\n");
    outb(EXIT_PORT, 0);
    for (;;) __asm__ volatile("hlt");
}
