/*
 * A C guest for hhr: double-precision arithmetic that gcc keeps in XMM registers for its whole run.
 * The Lorenz system integrated with classical Runge-Kutta (RK4), the Leibniz series for pi/4 and
 * the logistic map, printed at checkpoints as IEEE-754 bit patterns and in decimal. Only + - * /
 * in a fixed order, no libm: Python's floats (IEEE doubles) replay it bit for bit
 * (tests/test_c_guests.py). The Lorenz system and the logistic map are chaotic: a single changed
 * bit anywhere in the run changes every later checkpoint.
 *
 * Build (gcc on x86-64 Linux; guests/c_examples.py runs this line):
 *   gcc -O2 -ffreestanding -fno-pie -no-pie -nostdlib -static -mno-red-zone \
 *       -Wl,-Ttext-segment=0x100000 -Wl,--build-id=none -o numeric.elf numeric.c
 * Run:
 *   hhr run --guest numeric.elf
 */
#include "hhr_guest.h"

#define LORENZ_STEPS 1000000
#define LORENZ_CHECKPOINT 200000
#define SIGMA 10.0
#define RHO 28.0
#define BETA (8.0 / 3.0)
#define DT 0.001
#define LEIBNIZ_TERMS 2000000
#define LOGISTIC_STEPS 1000000
#define LOGISTIC_RATE 3.9
#define FRACTION_DIGITS 15

/* The bits of a double, as the processor stores them. */
static unsigned long bits(double value) {
    union { double real; unsigned long word; } both = { .real = value };
    return both.word;
}

/*
 * A decimal rendering: sign, whole part, then FRACTION_DIGITS digits taken one at a time by
 * multiplying the remaining fraction by ten (each step rounds as IEEE does; Python replays it).
 */
static void print_decimal(double value) {
    if (value < 0) {
        hhr_print("-");
        value = -value;
    }
    unsigned long whole = (unsigned long)value;
    hhr_print_unsigned(whole);
    hhr_print(".");
    double fraction = value - (double)whole;
    for (int digit = 0; digit < FRACTION_DIGITS; digit++) {
        fraction *= 10.0;
        int figure = (int)fraction;
        hhr_outb(HHR_COM1, (unsigned char)('0' + figure));
        fraction -= figure;
    }
}

/* " name=<16 hex digits> <decimal>" */
static void print_value(const char *name, double value) {
    hhr_print(" ");
    hhr_print(name);
    hhr_print("=");
    hhr_print_hex(bits(value), 16);
    hhr_print(" ");
    print_decimal(value);
}

/* The Lorenz equations' right-hand side at (x, y, z). */
#define LORENZ(dx, dy, dz, x, y, z) \
    double dx = SIGMA * ((y) - (x)); \
    double dy = (x) * (RHO - (z)) - (y); \
    double dz = (x) * (y) - BETA * (z)

static void lorenz(void) {
    double x = 1.0, y = 1.0, z = 1.0;
    const double half = DT * 0.5, sixth = DT / 6.0;
    for (long step = 1; step <= LORENZ_STEPS; step++) {
        LORENZ(k1x, k1y, k1z, x, y, z);
        double ax = x + half * k1x, ay = y + half * k1y, az = z + half * k1z;
        LORENZ(k2x, k2y, k2z, ax, ay, az);
        double bx = x + half * k2x, by = y + half * k2y, bz = z + half * k2z;
        LORENZ(k3x, k3y, k3z, bx, by, bz);
        double cx = x + DT * k3x, cy = y + DT * k3y, cz = z + DT * k3z;
        LORENZ(k4x, k4y, k4z, cx, cy, cz);
        x = x + sixth * (k1x + 2.0 * k2x + 2.0 * k3x + k4x);
        y = y + sixth * (k1y + 2.0 * k2y + 2.0 * k3y + k4y);
        z = z + sixth * (k1z + 2.0 * k2z + 2.0 * k3z + k4z);
        if (step % LORENZ_CHECKPOINT == 0) {
            hhr_print("lorenz step ");
            hhr_print_unsigned((unsigned long)step);
            print_value("x", x);
            print_value("y", y);
            print_value("z", z);
            hhr_print("\n");
        }
    }
}

static void leibniz(void) {
    double sum = 0.0, denominator = 1.0, sign = 1.0;
    for (long term = 0; term < LEIBNIZ_TERMS; term++) {
        sum += sign / denominator;
        denominator += 2.0;
        sign = -sign;
    }
    hhr_print("leibniz terms ");
    hhr_print_unsigned(LEIBNIZ_TERMS);
    print_value("pi", 4.0 * sum);
    hhr_print("\n");
}

static void logistic(void) {
    double x = 0.5;
    for (long step = 0; step < LOGISTIC_STEPS; step++)
        x = LOGISTIC_RATE * x * (1.0 - x);
    hhr_print("logistic steps ");
    hhr_print_unsigned(LOGISTIC_STEPS);
    print_value("x", x);
    hhr_print("\n");
}

void hhr_main(void) {
    lorenz();
    leibniz();
    logistic();
}
