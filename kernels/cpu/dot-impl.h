/* dot-impl: small inline helpers shared by the portable and SIMD dot
 * kernels (block field unpacking). Not part of any module's contract. */
#pragma once
#include <stdint.h>
#include <string.h>

#include "kernels/quant.h"

static inline uint32_t mo_load_u32le(const uint8_t *p)
{
        uint32_t v;

        memcpy(&v, p, sizeof v);
        return v; /* x86-64 and every target moed builds for are little-endian */
}

/* The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, four at a
 * time in 32-bit words: scales 0-3 and mins 0-3 are the low six bits of
 * bytes 0-3 and 4-7; scales and mins 4-7 take their low nibble and high
 * nibble from bytes 8-11 and their top two bits from bits 6-7 of bytes
 * 0-3 and 4-7. The words: scales 0-3, scales 4-7, mins 0-3, mins 4-7,
 * a byte each. */
static inline void mo_k4_scale_words(const uint8_t s[K_SCALE_SIZE], uint32_t v[4])
{
        uint32_t w0 = mo_load_u32le(s), w1 = mo_load_u32le(s + 4), w2 = mo_load_u32le(s + 8);

        v[0] = w0 & 0x3f3f3f3f;
        v[1] = (w2 & 0x0f0f0f0f) | ((w0 >> 6) & 0x03030303) << 4;
        v[2] = w1 & 0x3f3f3f3f;
        v[3] = ((w2 >> 4) & 0x0f0f0f0f) | ((w1 >> 6) & 0x03030303) << 4;
}

static inline void mo_unpack_k4_scales(const uint8_t s[K_SCALE_SIZE],
                                       uint8_t sc[8], uint8_t mn[8])
{
        uint32_t v[4];

        mo_k4_scale_words(s, v);
        memcpy(sc, v, 8);
        memcpy(mn, v + 2, 8);
}
