/*
 * A C guest for hhr: SHA-256 (FIPS 180-4) of a 4 MiB buffer in its bss, which it fills as it hashes
 * from four 32-bit xorshift generators (Marsaglia 2003: x ^= x << 13; x ^= x >> 17; x ^= x << 5)
 * run side by side in one XMM register, the four lanes' words interleaved in little-endian order.
 * The generators' state lives in that register for the whole run, across every compression.
 * Prints the digest in hex; tests/test_c_guests.py checks it against Python's hashlib.
 *
 * Build (gcc on x86-64 Linux; guests/c_examples.py runs this line):
 *   gcc -O2 -ffreestanding -fno-pie -no-pie -nostdlib -static -mno-red-zone \
 *       -Wl,-Ttext-segment=0x100000 -Wl,--build-id=none -o sha256.elf sha256.c
 * Run:
 *   hhr run --guest sha256.elf
 */
#include "hhr_guest.h"

#define BUFFER_BYTES (4UL << 20)
#define BLOCK_BYTES 64
#define DIGEST_WORDS 8
#define SCHEDULE_WORDS 64
#define LENGTH_BYTES 8               /* the message length in bits, big-endian, ends the padding */
#define PADDING_MARK 0x80

typedef unsigned int lanes __attribute__((vector_size(16)));

static const lanes SEEDS = {0x12345678u, 0x9E3779B9u, 0xDEADBEEFu, 0x0BADF00Du};

/* FIPS 180-4 4.2.2: the first 32 bits of the fractional parts of the cube roots of the first 64 primes. */
static const unsigned int ROUND_CONSTANTS[SCHEDULE_WORDS] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

/* FIPS 180-4 5.3.3: the initial hash value. */
static const unsigned int INITIAL_HASH[DIGEST_WORDS] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

static unsigned char buffer[BUFFER_BYTES] __attribute__((aligned(16)));   /* bss: not in the file */

static inline unsigned int rotate_right(unsigned int value, int count) {
    return (value >> count) | (value << (32 - count));
}

/* FIPS 180-4 6.2.2: one 64-byte block into the hash. */
static inline void compress(unsigned int hash[DIGEST_WORDS], const unsigned char *block) {
    unsigned int w[SCHEDULE_WORDS];
    for (int t = 0; t < 16; t++)
        w[t] = (unsigned int)block[4 * t] << 24 | (unsigned int)block[4 * t + 1] << 16 |
               (unsigned int)block[4 * t + 2] << 8 | block[4 * t + 3];
    for (int t = 16; t < SCHEDULE_WORDS; t++) {
        unsigned int s0 = rotate_right(w[t - 15], 7) ^ rotate_right(w[t - 15], 18) ^ (w[t - 15] >> 3);
        unsigned int s1 = rotate_right(w[t - 2], 17) ^ rotate_right(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    unsigned int a = hash[0], b = hash[1], c = hash[2], d = hash[3];
    unsigned int e = hash[4], f = hash[5], g = hash[6], h = hash[7];
    for (int t = 0; t < SCHEDULE_WORDS; t++) {
        unsigned int t1 = h + (rotate_right(e, 6) ^ rotate_right(e, 11) ^ rotate_right(e, 25)) +
                          ((e & f) ^ (~e & g)) + ROUND_CONSTANTS[t] + w[t];
        unsigned int t2 = (rotate_right(a, 2) ^ rotate_right(a, 13) ^ rotate_right(a, 22)) +
                          ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    hash[0] += a; hash[1] += b; hash[2] += c; hash[3] += d;
    hash[4] += e; hash[5] += f; hash[6] += g; hash[7] += h;
}

void hhr_main(void) {
    unsigned int hash[DIGEST_WORDS];
    for (int i = 0; i < DIGEST_WORDS; i++) hash[i] = INITIAL_HASH[i];
    lanes state = SEEDS;
    for (unsigned long offset = 0; offset < BUFFER_BYTES; offset += BLOCK_BYTES) {
        for (int part = 0; part < BLOCK_BYTES; part += sizeof(lanes)) {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *(lanes *)(buffer + offset + part) = state;
        }
        compress(hash, buffer + offset);
    }
    /* The padding of FIPS 180-4 5.1.1: a 1 bit, zeros, the length in bits; one whole block here. */
    unsigned char last[BLOCK_BYTES] = {PADDING_MARK};
    unsigned long bits = BUFFER_BYTES * 8;
    for (int i = 0; i < LENGTH_BYTES; i++)
        last[BLOCK_BYTES - 1 - i] = (unsigned char)(bits >> (8 * i));
    compress(hash, last);
    hhr_print("sha256 of 4 MiB of xorshift lanes: ");
    for (int i = 0; i < DIGEST_WORDS; i++) hhr_print_hex(hash[i], 8);
    hhr_print("\n");
}
