/* cuda-quant: ggml's weight blocks read on the device, eight consecutive
 * values of a row at a time (every block type holds a whole number of such
 * groups), dequantized in registers with the float operations of
 * kernels/quant.c in the same order and without fused multiply-adds, so a
 * device value equals the CPU's bit for bit.
 *
 * Rows must be 2-byte aligned (4 for F32): every block size and field
 * offset is even, so the loads are 16-bit. cuda-matmul.cu checks this. */
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/cuda-internal.cuh"

__device__ __forceinline__ uint16_t q_u16(const uint8_t *p)
{
        return __ldg((const unsigned short *)p);
}

__device__ __forceinline__ float q_half(const uint8_t *p)
{
        return __half2float(__ushort_as_half(q_u16(p)));
}

/* Eight bytes from a 2-aligned address. */
__device__ __forceinline__ void q_bytes8(const uint8_t *p, uint8_t *b)
{
#pragma unroll
        for (int i = 0; i < 4; i++) {
                uint16_t v = q_u16(p + 2 * i);

                b[2 * i] = (uint8_t)(v & 0xff);
                b[2 * i + 1] = (uint8_t)(v >> 8);
        }
}

__device__ __forceinline__ uint8_t q_byte(const uint8_t *p)
{
        return __ldg(p);
}

/* ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j. */
__device__ __forceinline__ void q_k4_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
        if (j < 4) {
                *sc = q_byte(q + j) & 63;
                *m = q_byte(q + j + 4) & 63;
        } else {
                *sc = (q_byte(q + j + 4) & 0x0f) | (q_byte(q + j - 4) >> 6) << 4;
                *m = (q_byte(q + j + 4) >> 4) | (q_byte(q + j) >> 6) << 4;
        }
}

/* v[0..7] = values e0 .. e0+7 of the row (e0 a multiple of 8). */
template <int T>
__device__ __forceinline__ void dq8(const uint8_t *row, int64_t e0, float *v);

template <>
__device__ __forceinline__ void dq8<MO_TYPE_F32>(const uint8_t *row, int64_t e0, float *v)
{
        const float *p = (const float *)row + e0;

#pragma unroll
        for (int j = 0; j < 8; j++)
                v[j] = __ldg(p + j);
}

template <>
__device__ __forceinline__ void dq8<MO_TYPE_F16>(const uint8_t *row, int64_t e0, float *v)
{
#pragma unroll
        for (int j = 0; j < 8; j++)
                v[j] = q_half(row + 2 * (e0 + j));
}

template <>
__device__ __forceinline__ void dq8<MO_TYPE_BF16>(const uint8_t *row, int64_t e0, float *v)
{
#pragma unroll
        for (int j = 0; j < 8; j++)
                v[j] = __uint_as_float((uint32_t)q_u16(row + 2 * (e0 + j)) << 16);
}

/* Q8_0: 34 bytes, half d then 32 int8. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q8_0>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 32) * 34;
        float d = q_half(p);
        uint8_t b[8];

        q_bytes8(p + 2 + e0 % 32, b);
#pragma unroll
        for (int j = 0; j < 8; j++)
                v[j] = __fmul_rn((float)(int8_t)b[j], d);
}

/* Q4_0: 18 bytes, half d then 16 bytes: value j < 16 in the low nibble of
 * byte j, value j + 16 in its high nibble; offset 8. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q4_0>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 32) * 18;
        int o = (int)(e0 % 32);
        float d = q_half(p);
        uint8_t b[8];

        q_bytes8(p + 2 + o % 16, b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int q = o < 16 ? b[j] & 0x0f : b[j] >> 4;
                v[j] = __fmul_rn((float)(q - 8), d);
        }
}

/* Q5_0: 22 bytes, half d, 32 high bits (little-endian), 16 nibble bytes
 * as Q4_0; offset 16. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q5_0>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 32) * 22;
        int o = (int)(e0 % 32);
        float d = q_half(p);
        uint32_t qh = (uint32_t)q_u16(p + 2) | (uint32_t)q_u16(p + 4) << 16;
        uint8_t b[8];

        q_bytes8(p + 6 + o % 16, b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int q = (o < 16 ? b[j] & 0x0f : b[j] >> 4) | (int)((qh >> (o + j)) & 1) << 4;
                v[j] = __fmul_rn((float)(q - 16), d);
        }
}

/* Q4_K: 144 bytes: half d, half dmin, 12 scale bytes, 128 nibble bytes;
 * value i sits in byte 32*(i/64) + i%32, high nibble when i%64 >= 32. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q4_K>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 256) * 144;
        int i = (int)(e0 % 256), sc, m;
        float d = q_half(p), dmin = q_half(p + 2);
        uint8_t b[8];

        q_k4_scale_min(i / 32, p + 4, &sc, &m);
        float d1 = __fmul_rn(d, (float)sc), m1 = __fmul_rn(dmin, (float)m);
        q_bytes8(p + 16 + 32 * (i / 64) + i % 32, b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int q = (i % 64) < 32 ? b[j] & 0x0f : b[j] >> 4;
                v[j] = __fsub_rn(__fmul_rn(d1, (float)q), m1);
        }
}

/* Q5_K: 176 bytes: as Q4_K with 32 bytes of fifth bits after the scales
 * (bit 2*(i/64) + (i%64 >= 32) of byte i%32). */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q5_K>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 256) * 176;
        int i = (int)(e0 % 256), sc, m;
        int hi = (i % 64) >= 32, shift = 2 * (i / 64) + hi;
        float d = q_half(p), dmin = q_half(p + 2);
        uint8_t b[8], h[8];

        q_k4_scale_min(i / 32, p + 4, &sc, &m);
        float d1 = __fmul_rn(d, (float)sc), m1 = __fmul_rn(dmin, (float)m);
        q_bytes8(p + 48 + 32 * (i / 64) + i % 32, b);
        q_bytes8(p + 16 + i % 32, h);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int q = (hi ? b[j] >> 4 : b[j] & 0x0f) | ((h[j] >> shift) & 1) << 4;
                v[j] = __fsub_rn(__fmul_rn(d1, (float)q), m1);
        }
}

/* Q6_K: 210 bytes: 128 low-nibble bytes, 64 bytes of top bits, 16 int8
 * scales, half d. Value i: half n = i/128, quarter k = (i%128)/32,
 * l = i%32: nibble of ql[64n + l + 32(k&1)] (high when k >= 2), two bits of
 * qh[32n + l] at 2k; minus 32. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q6_K>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 256) * 210;
        int i = (int)(e0 % 256), n = i / 128, k = (i % 128) / 32, l = i % 32;
        float d = q_half(p + 208);
        float ds = __fmul_rn(d, (float)(int8_t)q_byte(p + 192 + i / 16));
        uint8_t b[8], h[8];

        q_bytes8(p + 64 * n + l + 32 * (k & 1), b);
        q_bytes8(p + 128 + 32 * n + l, h);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int nib = k < 2 ? b[j] & 0x0f : b[j] >> 4;
                int q = (nib | ((h[j] >> (2 * k)) & 3) << 4) - 32;
                v[j] = __fmul_rn(ds, (float)q);
        }
}

/* Q2_K: 84 bytes: 16 scale bytes (scale low nibble, min high), 64 bytes of
 * 2-bit quants (value i in byte 32*(i/128) + i%32 at bit 2*((i%128)/32)),
 * half d, half dmin. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q2_K>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 256) * 84;
        int i = (int)(e0 % 256), shift = 2 * ((i % 128) / 32);
        int s = q_byte(p + i / 16);
        float d = q_half(p + 80), dmin = q_half(p + 82);
        float dl = __fmul_rn(d, (float)(s & 0x0f)), ml = __fmul_rn(dmin, (float)(s >> 4));
        uint8_t b[8];

        q_bytes8(p + 16 + 32 * (i / 128) + i % 32, b);
#pragma unroll
        for (int j = 0; j < 8; j++)
                v[j] = __fsub_rn(__fmul_rn(dl, (float)((b[j] >> shift) & 3)), ml);
}

/* Q3_K: 110 bytes: 32 bytes hmask, 64 bytes of 2-bit quants (as Q2_K),
 * 12 bytes of 6-bit scales stored +32, half d. A clear hmask bit (byte
 * i%32, bit 4*(i/128) + (i%128)/32) means the value is 4 lower. */
template <>
__device__ __forceinline__ void dq8<MO_TYPE_Q3_K>(const uint8_t *row, int64_t e0, float *v)
{
        const uint8_t *p = row + (e0 / 256) * 110;
        int i = (int)(e0 % 256), k = i / 16;
        int shift = 2 * ((i % 128) / 32), hshift = 4 * (i / 128) + (i % 128) / 32;
        const uint8_t *sp = p + 96;
        int lo = k < 8 ? q_byte(sp + k) & 0x0f : q_byte(sp + k - 8) >> 4;
        int hi = (q_byte(sp + 8 + k % 4) >> (2 * (k / 4))) & 3;
        float dl = __fmul_rn(q_half(p + 108), (float)((lo | hi << 4) - 32));
        uint8_t b[8], h[8];

        q_bytes8(p + 32 + 32 * (i / 128) + i % 32, b);
        q_bytes8(p + i % 32, h);
#pragma unroll
        for (int j = 0; j < 8; j++) {
                int q = ((b[j] >> shift) & 3) - (((h[j] >> hshift) & 1) ? 0 : 4);
                v[j] = __fmul_rn(dl, (float)q);
        }
}

/* One value of an F32/F16/BF16 row (the tails that are not a group of 8). */
template <int T>
__device__ __forceinline__ float q_elem(const uint8_t *row, int64_t k)
{
        if (T == MO_TYPE_F32)
                return __ldg((const float *)row + k);
        if (T == MO_TYPE_F16)
                return q_half(row + 2 * k);
        return __uint_as_float((uint32_t)q_u16(row + 2 * k) << 16);
}

__host__ __device__ constexpr bool q_is_float(int t)
{
        return t == MO_TYPE_F32 || t == MO_TYPE_F16 || t == MO_TYPE_BF16;
}

/* Calls f.template operator()<T>() for a runtime type; false if moed has no
 * device kernel for it. */
template <typename F>
static bool q_dispatch(int type, F &&f)
{
        switch (type) {
        case MO_TYPE_F32: f.template operator()<MO_TYPE_F32>(); return true;
        case MO_TYPE_F16: f.template operator()<MO_TYPE_F16>(); return true;
        case MO_TYPE_BF16: f.template operator()<MO_TYPE_BF16>(); return true;
        case MO_TYPE_Q8_0: f.template operator()<MO_TYPE_Q8_0>(); return true;
        case MO_TYPE_Q4_0: f.template operator()<MO_TYPE_Q4_0>(); return true;
        case MO_TYPE_Q5_0: f.template operator()<MO_TYPE_Q5_0>(); return true;
        case MO_TYPE_Q2_K: f.template operator()<MO_TYPE_Q2_K>(); return true;
        case MO_TYPE_Q3_K: f.template operator()<MO_TYPE_Q3_K>(); return true;
        case MO_TYPE_Q4_K: f.template operator()<MO_TYPE_Q4_K>(); return true;
        case MO_TYPE_Q5_K: f.template operator()<MO_TYPE_Q5_K>(); return true;
        case MO_TYPE_Q6_K: f.template operator()<MO_TYPE_Q6_K>(); return true;
        default: return false;
        }
}
