/* What both C files of the library share: the element kinds (`_native.FINGERPRINT_KINDS`),
 * run-time CPU dispatch, and exact conversions of bit patterns to float. */
#ifndef CKPTPARITY_COMMON_H
#define CKPTPARITY_COMMON_H

#include <stdint.h>
#include <string.h>

/* AVX-512, AVX2 and baseline builds of a function, chosen when the library loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* Element kinds; K_NONE: no cast (compare.c). */
enum kind { K_NONE = -1, K_FLOAT32 = 0, K_FLOAT64 = 1, K_BFLOAT16 = 2, K_FLOAT16 = 3 };

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half to float: exact (and so to double). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) { /* zero or subnormal: man * 2**-24, exact in float */
        float v = (float)man * 5.9604644775390625e-8f;
        return bits_to_float(float_to_bits(v) | sign);
    }
    if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

#endif
