/* dot-impl: small inline helpers shared by the portable and SIMD dot
 * kernels (block field unpacking). Not part of any module's contract. */
#pragma once
#include <stdint.h>
#include <string.h>

#include "kernels/quant.h"

/* The eight 6-bit scales and mins of a Q4_K/Q5_K super-block. */
static inline void mo_unpack_k4_scales(const uint8_t s[K_SCALE_SIZE],
                                       uint8_t sc[8], uint8_t mn[8])
{
        for (int j = 0; j < 4; j++) {
                sc[j] = s[j] & 63;
                mn[j] = s[j + 4] & 63;
        }
        for (int j = 4; j < 8; j++) {
                sc[j] = (uint8_t)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
                mn[j] = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        }
}

static inline uint32_t mo_load_u32le(const uint8_t *p)
{
        uint32_t v;

        memcpy(&v, p, sizeof v);
        return v; /* x86-64 and every target moed builds for are little-endian */
}
