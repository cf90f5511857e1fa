/*
 * A C guest for hhr: a memset/memcpy walk over a 32 MiB array in its bss (the file stays a few KiB:
 * the loader stages file bytes only, docs/guests.md). It checks that the array starts zero, fills it
 * block by block with memset, then runs rounds of copies between its halves at places and lengths
 * an LCG chooses (unaligned, any length) with a small memset after each, folding the first 16 bytes
 * each copy lands into a trail that stays in an XMM register for the whole walk; at the end a
 * Fletcher-style checksum over the array in two 64-bit lanes. memcpy and memset are hhr_guest.h's,
 * in SSE2. tests/test_c_guests.py replays the walk in Python on a bytearray.
 *
 * Build (gcc on x86-64 Linux; guests/c_examples.py runs this line):
 *   gcc -O2 -ffreestanding -fno-pie -no-pie -nostdlib -static -mno-red-zone \
 *       -Wl,-Ttext-segment=0x100000 -Wl,--build-id=none -o memwalk.elf memwalk.c
 * Run:
 *   hhr run --guest memwalk.elf
 */
#include "hhr_guest.h"

#define ARENA_BYTES (32UL << 20)
#define HALF_BYTES (ARENA_BYTES / 2)
#define FILL_BLOCK (64UL << 10)
#define FILL_MULTIPLIER 37           /* block b is filled with (b * 37 + 11) & 0xFF */
#define FILL_OFFSET 11
#define ROUNDS 1024
#define MAX_COPY (256UL << 10)
#define MAX_STIR 4096
#define LCG_MULTIPLIER 6364136223846793005UL    /* Knuth's MMIX LCG */
#define LCG_INCREMENT 1442695040888963407UL
#define LCG_SEED 0x2545F4914F6CDD1DUL
#define LCG_SHIFT 24                 /* the low bits of an LCG are weak: use the high ones */

typedef unsigned long long quads __attribute__((vector_size(16)));

static unsigned char arena[ARENA_BYTES] __attribute__((aligned(16)));    /* bss: not in the file */
static unsigned long lcg_state = LCG_SEED;

static unsigned long next_random(void) {
    lcg_state = lcg_state * LCG_MULTIPLIER + LCG_INCREMENT;
    return lcg_state >> LCG_SHIFT;
}

static void print_quads(const char *name, quads value) {
    hhr_print(" ");
    hhr_print(name);
    hhr_print("=");
    hhr_print_hex(value[0], 16);
    hhr_print(":");
    hhr_print_hex(value[1], 16);
}

void hhr_main(void) {
    const quads *chunks = (const quads *)arena;
    quads seen = {0, 0};
    for (unsigned long i = 0; i < ARENA_BYTES / sizeof(quads); i++) seen |= chunks[i];
    hhr_print("arena of ");
    hhr_print_unsigned(ARENA_BYTES);
    hhr_print(" bytes in bss: ");
    hhr_print(seen[0] | seen[1] ? "not zero\n" : "zero\n");

    for (unsigned long block = 0; block < ARENA_BYTES / FILL_BLOCK; block++)
        memset(arena + block * FILL_BLOCK, (int)((block * FILL_MULTIPLIER + FILL_OFFSET) & 0xFF), FILL_BLOCK);

    quads trail = {0, 0};
    for (unsigned long round = 0; round < ROUNDS; round++) {
        unsigned long length = 1 + next_random() % MAX_COPY;
        unsigned long low = next_random() % (HALF_BYTES - MAX_COPY);          /* copies stay in their halves */
        unsigned long high = HALF_BYTES + next_random() % (HALF_BYTES - MAX_COPY);
        unsigned long to = round & 1 ? low : high, from = round & 1 ? high : low;
        memcpy(arena + to, arena + from, length);
        quads landed = (quads)*(const hhr_vector *)(arena + to);
        trail = (trail ^ landed) + (quads){round, length};
        unsigned long stir = 1 + next_random() % MAX_STIR;
        memset(arena + next_random() % (ARENA_BYTES - stir), (int)(round & 0xFF), stir);
    }

    quads sum = {0, 0}, sum_of_sums = {0, 0};
    for (unsigned long i = 0; i < ARENA_BYTES / sizeof(quads); i++) {
        sum += chunks[i];
        sum_of_sums += sum;
    }
    hhr_print("walk of ");
    hhr_print_unsigned(ROUNDS);
    hhr_print(" rounds:");
    print_quads("trail", trail);
    print_quads("sum", sum);
    print_quads("sum_of_sums", sum_of_sums);
    hhr_print("\n");
}
