/* quant: ggml's weight types (ids, block sizes), exact half/bf16 conversion,
 * and the scalar reference dequantizers, quantizers and dot products that
 * every SIMD or device kernel is checked against. Bit layouts are ggml's. */
#include "kernels/quant.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common/cleanup.h"

/* Every id ggml has assigned (gguf-py GGML_QUANT_SIZES); gaps are ids ggml
 * removed, which files must not use. Q8_1 is 36 bytes (ggml_half2 ds + 32
 * int8): older gguf-py tables said 40, ggml itself never did. */
static const struct mo_type_info type_table[MO_TYPE_COUNT] = {
        [MO_TYPE_F32] = { "F32", 1, 4, true },
        [MO_TYPE_F16] = { "F16", 1, 2, true },
        [MO_TYPE_Q4_0] = { "Q4_0", 32, 18, true },
        [MO_TYPE_Q4_1] = { "Q4_1", 32, 20, false },
        [MO_TYPE_Q5_0] = { "Q5_0", 32, 22, true },
        [MO_TYPE_Q5_1] = { "Q5_1", 32, 24, false },
        [MO_TYPE_Q8_0] = { "Q8_0", 32, 34, true },
        [MO_TYPE_Q8_1] = { "Q8_1", 32, 36, false },
        [MO_TYPE_Q2_K] = { "Q2_K", 256, 84, true },
        [MO_TYPE_Q3_K] = { "Q3_K", 256, 110, true },
        [MO_TYPE_Q4_K] = { "Q4_K", 256, 144, true },
        [MO_TYPE_Q5_K] = { "Q5_K", 256, 176, true },
        [MO_TYPE_Q6_K] = { "Q6_K", 256, 210, true },
        [MO_TYPE_Q8_K] = { "Q8_K", 256, 292, false },
        [16] = { "IQ2_XXS", 256, 66, false },
        [17] = { "IQ2_XS", 256, 74, false },
        [18] = { "IQ3_XXS", 256, 98, false },
        [19] = { "IQ1_S", 256, 50, false },
        [20] = { "IQ4_NL", 32, 18, false },
        [21] = { "IQ3_S", 256, 110, false },
        [22] = { "IQ2_S", 256, 82, false },
        [23] = { "IQ4_XS", 256, 136, false },
        [24] = { "I8", 1, 1, false },
        [25] = { "I16", 1, 2, false },
        [26] = { "I32", 1, 4, false },
        [27] = { "I64", 1, 8, false },
        [28] = { "F64", 1, 8, false },
        [29] = { "IQ1_M", 256, 56, false },
        [MO_TYPE_BF16] = { "BF16", 1, 2, true },
        [34] = { "TQ1_0", 256, 54, false },
        [35] = { "TQ2_0", 256, 66, false },
        [39] = { "MXFP4", 32, 17, false },
        [40] = { "NVFP4", 64, 36, false },
        [41] = { "Q1_0", 128, 18, false },
};

const struct mo_type_info *mo_type_get(int type)
{
        if (type < 0 || type >= MO_TYPE_COUNT || !type_table[type].name)
                return NULL;
        return &type_table[type];
}

const char *mo_type_name(int type)
{
        /* Per thread so that two threads naming unknown ids do not race. */
        static _Thread_local char unknown[24];
        const struct mo_type_info *ti = mo_type_get(type);

        if (ti)
                return ti->name;
        snprintf(unknown, sizeof unknown, "type %d", type);
        return unknown;
}

size_t mo_row_bytes(int type, int64_t n)
{
        const struct mo_type_info *ti = mo_type_get(type);

        if (!ti || n < 0 || n % ti->block)
                return 0;
        if ((uint64_t)(n / ti->block) > SIZE_MAX / ti->block_bytes)
                return 0;
        return (size_t)(n / ti->block) * ti->block_bytes;
}

/* ---- half and bfloat16 ---- */

static inline uint32_t f32_bits(float f)
{
        uint32_t u;

        memcpy(&u, &f, sizeof u);
        return u;
}

static inline float f32_from_bits(uint32_t u)
{
        float f;

        memcpy(&f, &u, sizeof f);
        return f;
}

float mo_half_to_float(mo_half h)
{
        uint32_t sign = (uint32_t)(h & 0x8000) << 16;
        uint32_t exp = (h >> 10) & 0x1f;
        uint32_t mant = h & 0x3ff;

        if (exp == 0) {
                /* Zero or subnormal: mant * 2^-24 is exact in binary32. */
                float v = (float)mant * 0x1p-24f;
                return sign ? -v : v;
        }
        if (exp == 31)
                return f32_from_bits(sign | 0x7f800000 | mant << 13);
        return f32_from_bits(sign | (exp + 112) << 23 | mant << 13);
}

/* Rounds v >> shift to nearest, ties to even. */
static inline uint32_t shift_rne(uint32_t v, unsigned shift)
{
        uint32_t q = v >> shift;
        uint32_t rem = v & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);

        if (rem > half || (rem == half && (q & 1)))
                q++;
        return q;
}

mo_half mo_float_to_half(float f)
{
        uint32_t x = f32_bits(f);
        uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
        uint32_t exp;

        x &= 0x7fffffff;
        if (x > 0x7f800000) /* NaN: keep the top payload bits, force quiet */
                return sign | 0x7e00 | (uint16_t)((x >> 13) & 0x3ff);
        if (x >= 0x477ff000) /* >= 65520 rounds past 65504 to infinity */
                return sign | 0x7c00;
        if (x >= 0x38800000) /* normal half: rebias the exponent by 112 */
                return sign | (uint16_t)shift_rne(x - 0x38000000, 13);
        exp = x >> 23;
        if (exp < 102) /* below 2^-25 (the tie at 2^-25 itself goes to 0) */
                return sign;
        /* Subnormal half: count units of 2^-24; a carry into 0x400 is the
         * smallest normal, which is the right answer. */
        return sign | (uint16_t)shift_rne((x & 0x7fffff) | 0x800000, 126 - exp);
}

float mo_bf16_to_float(uint16_t b)
{
        return f32_from_bits((uint32_t)b << 16);
}

uint16_t mo_float_to_bf16(float f)
{
        uint32_t x = f32_bits(f);

        if ((x & 0x7fffffff) > 0x7f800000) /* truncating could make it inf */
                return (uint16_t)((x >> 16) | 0x40);
        return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

/* ---- helpers shared by the quantizers ---- */

static inline float h2f(mo_half h) { return mo_half_to_float(h); }
static inline mo_half f2h(float f) { return mo_float_to_half(f); }

/* Round to nearest, ties to even, like ggml's nearest_int. Out-of-range
 * and NaN inputs (only from degenerate scales) saturate instead of being
 * undefined conversions. */
static inline int nearest_int(float x)
{
        if (isnan(x))
                return 0;
        x = fminf(fmaxf(x, -0x1p30f), 0x1p30f);
        return (int)lrintf(x);
}

/* ggml's (int8_t)(v) truncation for the Q4_0/Q5_0 offsets, clamped to
 * 0..hi first so that a NaN or huge v is not an undefined conversion. */
static inline int trunc_clamp(float v, int hi)
{
        if (!(v > 0.0f))
                return 0;
        return v >= (float)hi ? hi : (int)v;
}

static inline int clampi(int v, int lo, int hi)
{
        return v < lo ? lo : v > hi ? hi : v;
}

/* The value of largest magnitude (sign kept) and that magnitude. */
static float signed_absmax(const float *x, int n, float *amax)
{
        float max = 0.0f, a = 0.0f;

        for (int i = 0; i < n; i++) {
                if (fabsf(x[i]) > a) {
                        a = fabsf(x[i]);
                        max = x[i];
                }
        }
        *amax = a;
        return max;
}

static inline uint32_t load_le32(const uint8_t *p)
{
        return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
               (uint32_t)p[3] << 24;
}

static inline void store_le32(uint8_t *p, uint32_t v)
{
        for (int i = 0; i < 4; i++)
                p[i] = (uint8_t)(v >> (8 * i));
}

/* ---- Q4_0, Q5_0, Q8_0: 32 values, one half scale ---- */

static void dequant_q4_0(const block_q4_0 *b, float *y)
{
        float d = h2f(b->d);

        for (int j = 0; j < QK4_0 / 2; j++) {
                y[j] = (float)((b->qs[j] & 0x0f) - 8) * d;
                y[j + QK4_0 / 2] = (float)((b->qs[j] >> 4) - 8) * d;
        }
}

/* ggml's convention: the value of largest magnitude maps to -8, so the
 * other sign gets only up to +7 steps. */
static void quant_q4_0(const float *x, block_q4_0 *b)
{
        float amax, max = signed_absmax(x, QK4_0, &amax);
        float d = max / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;

        b->d = f2h(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
                int lo = trunc_clamp(x[j] * id + 8.5f, 15);
                int hi = trunc_clamp(x[j + QK4_0 / 2] * id + 8.5f, 15);
                b->qs[j] = (uint8_t)(lo | hi << 4);
        }
}

static void dequant_q5_0(const block_q5_0 *b, float *y)
{
        float d = h2f(b->d);
        uint32_t qh = load_le32(b->qh);

        for (int j = 0; j < QK5_0 / 2; j++) {
                int lo = (b->qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
                int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
                y[j] = (float)(lo - 16) * d;
                y[j + QK5_0 / 2] = (float)(hi - 16) * d;
        }
}

static void quant_q5_0(const float *x, block_q5_0 *b)
{
        float amax, max = signed_absmax(x, QK5_0, &amax);
        float d = max / -16.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0;

        b->d = f2h(d);
        for (int j = 0; j < QK5_0 / 2; j++) {
                int lo = trunc_clamp(x[j] * id + 16.5f, 31);
                int hi = trunc_clamp(x[j + QK5_0 / 2] * id + 16.5f, 31);
                b->qs[j] = (uint8_t)((lo & 0x0f) | (hi & 0x0f) << 4);
                qh |= (uint32_t)(lo >> 4) << j;
                qh |= (uint32_t)(hi >> 4) << (j + 16);
        }
        store_le32(b->qh, qh);
}

static void dequant_q8_0(const block_q8_0 *b, float *y)
{
        float d = h2f(b->d);

        for (int j = 0; j < QK8_0; j++)
                y[j] = (float)b->qs[j] * d;
}

static void quant_q8_0(const float *x, block_q8_0 *b)
{
        float amax;
        float d, id;

        signed_absmax(x, QK8_0, &amax);
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = f2h(d);
        /* roundf: ties away from zero, as ggml's Q8_0 (not Q8_K) does. */
        for (int j = 0; j < QK8_0; j++) {
                float v = roundf(x[j] * id);
                b->qs[j] = (int8_t)(isnan(v) ? 0 : fminf(fmaxf(v, -127.0f), 127.0f));
        }
}

/* ---- K-quants: 256 values in sub-blocks with quantized scales ---- */

/* The 6-bit scale and min of sub-block j from the 12 packed bytes
 * (ggml's get_scale_min_k4). */
static inline void k4_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
        if (j < 4) {
                *sc = q[j] & 63;
                *m = q[j + 4] & 63;
        } else {
                *sc = (q[j + 4] & 0x0f) | (q[j - 4] >> 6) << 4;
                *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
        }
}

static void k4_pack_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t *q)
{
        memset(q, 0, K_SCALE_SIZE);
        for (int j = 0; j < 4; j++) {
                q[j] = sc[j];
                q[j + 4] = m[j];
        }
        for (int j = 4; j < 8; j++) {
                q[j + 4] = (uint8_t)((sc[j] & 0x0f) | (m[j] & 0x0f) << 4);
                q[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
                q[j] |= (uint8_t)((m[j] >> 4) << 6);
        }
}

/* The 256 unsigned quants of a Q4_K/Q5_K block in natural order. */
static void q45k_unpack(const uint8_t *qs, const uint8_t *qh, uint8_t *q)
{
        for (int c = 0; c < 4; c++) {
                for (int l = 0; l < 32; l++) {
                        int lo = qs[32 * c + l] & 0x0f, hi = qs[32 * c + l] >> 4;
                        if (qh) {
                                lo += (qh[l] >> (2 * c) & 1) << 4;
                                hi += (qh[l] >> (2 * c + 1) & 1) << 4;
                        }
                        q[64 * c + l] = (uint8_t)lo;
                        q[64 * c + 32 + l] = (uint8_t)hi;
                }
        }
}

static void q45k_pack(const uint8_t *q, uint8_t *qs, uint8_t *qh)
{
        if (qh)
                memset(qh, 0, QK_K / 8);
        for (int c = 0; c < 4; c++) {
                for (int l = 0; l < 32; l++) {
                        int lo = q[64 * c + l], hi = q[64 * c + 32 + l];
                        if (qh)
                                qh[l] |= (uint8_t)((lo >> 4) << (2 * c) |
                                                   (hi >> 4) << (2 * c + 1));
                        qs[32 * c + l] = (uint8_t)((lo & 0x0f) | (hi & 0x0f) << 4);
                }
        }
}

/* Mirrors ggml's evaluation order (d*sc first, then *q - dmin*m) so the
 * floats match llama.cpp's bit for bit. */
static void q45k_dequant(mo_half dh, mo_half dminh, const uint8_t *scales,
                         const uint8_t *q, float *y)
{
        float d = h2f(dh), dmin = h2f(dminh);

        for (int b = 0; b < 8; b++) {
                int sc, m;
                k4_scale_min(b, scales, &sc, &m);
                float d1 = d * (float)sc, m1 = dmin * (float)m;
                for (int l = 0; l < 32; l++)
                        y[32 * b + l] = d1 * (float)q[32 * b + l] - m1;
        }
}

static void dequant_q4_k(const block_q4_k *b, float *y)
{
        uint8_t q[QK_K];

        q45k_unpack(b->qs, NULL, q);
        q45k_dequant(b->d, b->dmin, b->scales, q, y);
}

static void dequant_q5_k(const block_q5_k *b, float *y)
{
        uint8_t q[QK_K];

        q45k_unpack(b->qs, b->qh, q);
        q45k_dequant(b->d, b->dmin, b->scales, q, y);
}

/* Squared error of one affine sub-block y = ds*q - dm, q in 0..nmax,
 * writing the chosen quants. */
static float affine_fit(const float *x, int n, int nmax, float ds, float dm, uint8_t *q)
{
        float id = ds != 0.0f ? 1.0f / ds : 0.0f, err = 0.0f;

        for (int i = 0; i < n; i++) {
                int v = clampi(nearest_int((x[i] + dm) * id), 0, nmax);
                float e = ds * (float)v - dm - x[i];
                q[i] = (uint8_t)v;
                err += e * e;
        }
        return err;
}

/* Chooses the quantized scale and min of one sub-block (0..smax each) near
 * their unrounded values, a few neighbours each, keeping the pair with the
 * least error: cheap, and it repairs the worst cases of rounding the range
 * to the coarse grid. */
static void affine_search(const float *x, int n, int nmax, int smax, float d, float dmin,
                          float scale, float min, uint8_t *sc, uint8_t *m, uint8_t *q)
{
        int sc0 = d > 0.0f ? clampi(nearest_int(scale / d), 0, smax) : 0;
        int m0 = dmin > 0.0f ? clampi(nearest_int(min / dmin), 0, smax) : 0;
        /* Start from the rounded pair so that NaN errors still leave a
         * fully written result. */
        float best = affine_fit(x, n, nmax, d * (float)sc0, dmin * (float)m0, q);
        uint8_t tmp[32];

        *sc = (uint8_t)sc0;
        *m = (uint8_t)m0;

        for (int s = MO_MAX(0, sc0 - 2); s <= MO_MIN(smax, sc0 + 2); s++) {
                for (int mm = MO_MAX(0, m0 - 1); mm <= MO_MIN(smax, m0 + 2); mm++) {
                        float err = affine_fit(x, n, nmax, d * (float)s, dmin * (float)mm, tmp);
                        if (err < best) {
                                best = err;
                                *sc = (uint8_t)s;
                                *m = (uint8_t)mm;
                                memcpy(q, tmp, (size_t)n);
                        }
                }
        }
}

/* The unquantized step and min of a sub-block spanning [min(0, lo), hi]:
 * the stored min is an offset below zero, so a range never starts above
 * zero (ggml's K-quants make the same choice). */
static void affine_range(const float *x, int n, int nmax, float *scale, float *min)
{
        float lo = 0.0f, hi = -INFINITY;

        for (int i = 0; i < n; i++) {
                lo = fminf(lo, x[i]);
                hi = fmaxf(hi, x[i]);
        }
        *scale = hi > lo ? (hi - lo) / (float)nmax : 0.0f;
        *min = -lo;
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): per sub-block of 32 its
 * range, then the super-block d and dmin so that the largest scale and
 * min land on 63. */
static void q45k_quant(const float *x, int nmax, mo_half *dh, mo_half *dminh,
                       uint8_t *scales, uint8_t *q)
{
        float scale[8], min[8], max_scale = 0.0f, max_min = 0.0f;
        uint8_t sc[8], m[8];

        for (int b = 0; b < 8; b++) {
                affine_range(x + 32 * b, 32, nmax, &scale[b], &min[b]);
                max_scale = fmaxf(max_scale, scale[b]);
                max_min = fmaxf(max_min, min[b]);
        }
        *dh = f2h(max_scale / 63.0f);
        *dminh = f2h(max_min / 63.0f);
        for (int b = 0; b < 8; b++)
                affine_search(x + 32 * b, 32, nmax, 63, h2f(*dh), h2f(*dminh),
                              scale[b], min[b], &sc[b], &m[b], q + 32 * b);
        k4_pack_scales(sc, m, scales);
}

static void quant_q4_k(const float *x, block_q4_k *b)
{
        uint8_t q[QK_K];

        q45k_quant(x, 15, &b->d, &b->dmin, b->scales, q);
        q45k_pack(q, b->qs, NULL);
}

static void quant_q5_k(const float *x, block_q5_k *b)
{
        uint8_t q[QK_K];

        q45k_quant(x, 31, &b->d, &b->dmin, b->scales, q);
        q45k_pack(q, b->qs, b->qh);
}

/* Q6_K: signed quants q-32 in natural order; 16 sub-blocks of 16 share an
 * int8 scale. Value i sits in half n = i/128, quarter k = (i%128)/32: low
 * nibble from ql[64n + l + 32(k&1)] (high nibble when k >= 2), top two bits
 * from qh[32n + l] at bit 2k. */
static void q6k_unpack(const block_q6_k *b, int8_t *q)
{
        for (int n = 0; n < 2; n++) {
                const uint8_t *ql = b->ql + 64 * n, *qh = b->qh + 32 * n;
                for (int l = 0; l < 32; l++) {
                        for (int k = 0; k < 4; k++) {
                                int nib = k < 2 ? ql[l + 32 * k] & 0x0f : ql[l + 32 * (k - 2)] >> 4;
                                int v = nib | ((qh[l] >> (2 * k)) & 3) << 4;
                                q[128 * n + 32 * k + l] = (int8_t)(v - 32);
                        }
                }
        }
}

static void q6k_pack(const int8_t *q, block_q6_k *b)
{
        memset(b->ql, 0, sizeof b->ql);
        memset(b->qh, 0, sizeof b->qh);
        for (int n = 0; n < 2; n++) {
                uint8_t *ql = b->ql + 64 * n, *qh = b->qh + 32 * n;
                for (int l = 0; l < 32; l++) {
                        for (int k = 0; k < 4; k++) {
                                int v = q[128 * n + 32 * k + l] + 32;
                                if (k < 2)
                                        ql[l + 32 * k] |= (uint8_t)(v & 0x0f);
                                else
                                        ql[l + 32 * (k - 2)] |= (uint8_t)((v & 0x0f) << 4);
                                qh[l] |= (uint8_t)((v >> 4) << (2 * k));
                        }
                }
        }
}

static void dequant_q6_k(const block_q6_k *b, float *y)
{
        float d = h2f(b->d);
        int8_t q[QK_K];

        q6k_unpack(b, q);
        for (int i = 0; i < QK_K; i++)
                y[i] = d * (float)b->scales[i / 16] * (float)q[i];
}

/* The signed two-level scale search of Q6_K and Q3_K (ggml's convention):
 * each sub-block of 16 gets scale = its largest-magnitude value / -qmax,
 * and the largest-magnitude of those scales maps to -smax. Returns the
 * inverse super-block scale (0 for an all-zero block). */
static float signed_subblock_scales(const float *x, float qmax, float smax, float scale[16])
{
        float max_scale = 0.0f, amax_scale = 0.0f;

        for (int s = 0; s < 16; s++) {
                float amax, max = signed_absmax(x + 16 * s, 16, &amax);
                scale[s] = max / -qmax;
                if (fabsf(scale[s]) > amax_scale) {
                        amax_scale = fabsf(scale[s]);
                        max_scale = scale[s];
                }
        }
        return max_scale != 0.0f ? -smax / max_scale : 0.0f;
}

/* ggml's sign convention at both levels: the largest-magnitude value of a
 * sub-block maps to -32 and the largest-magnitude sub-block scale to -128,
 * so the asymmetric ranges are used in full. */
static void quant_q6_k(const float *x, block_q6_k *b)
{
        float scale[16];
        int8_t q[QK_K];
        float iscale = signed_subblock_scales(x, 32.0f, 128.0f, scale);
        b->d = f2h(iscale != 0.0f ? 1.0f / iscale : 0.0f);
        float d = h2f(b->d);
        for (int s = 0; s < 16; s++) {
                b->scales[s] = (int8_t)MO_MIN(127, nearest_int(iscale * scale[s]));
                float ds = d * (float)b->scales[s];
                float id = ds != 0.0f ? 1.0f / ds : 0.0f;
                for (int i = 16 * s; i < 16 * s + 16; i++)
                        q[i] = (int8_t)clampi(nearest_int(x[i] * id), -32, 31);
        }
        q6k_pack(q, b);
}

/* Q2_K and Q3_K share one packing of 2-bit fields: value i (half n = i/128,
 * quarter j = (i%128)/32, l = i%32) sits in qs[32n + l] at bits 2j..2j+1.
 * Q3_K's third bit is hmask[l] bit 4n + j. */
static void q2bits_unpack(const uint8_t *qs, uint8_t *q)
{
        for (int i = 0; i < QK_K; i++)
                q[i] = (uint8_t)((qs[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3);
}

static void q2bits_pack(const uint8_t *q, uint8_t *qs)
{
        memset(qs, 0, QK_K / 4);
        for (int i = 0; i < QK_K; i++)
                qs[32 * (i / 128) + i % 32] |= (uint8_t)((q[i] & 3) << (2 * ((i % 128) / 32)));
}

static void dequant_q2_k(const block_q2_k *b, float *y)
{
        float d = h2f(b->d), dmin = h2f(b->dmin);
        uint8_t q[QK_K];

        q2bits_unpack(b->qs, q);
        for (int s = 0; s < 16; s++) {
                float dl = d * (float)(b->scales[s] & 0x0f), ml = dmin * (float)(b->scales[s] >> 4);
                for (int l = 0; l < 16; l++)
                        y[16 * s + l] = dl * (float)q[16 * s + l] - ml;
        }
}

/* Like Q4_K with 16-value sub-blocks, 2-bit quants and 4-bit scales/mins. */
static void quant_q2_k(const float *x, block_q2_k *b)
{
        float scale[16], min[16], max_scale = 0.0f, max_min = 0.0f;
        uint8_t sc[16], m[16], q[QK_K];

        for (int s = 0; s < 16; s++) {
                affine_range(x + 16 * s, 16, 3, &scale[s], &min[s]);
                max_scale = fmaxf(max_scale, scale[s]);
                max_min = fmaxf(max_min, min[s]);
        }
        b->d = f2h(max_scale / 15.0f);
        b->dmin = f2h(max_min / 15.0f);
        for (int s = 0; s < 16; s++) {
                affine_search(x + 16 * s, 16, 3, 15, h2f(b->d), h2f(b->dmin), scale[s], min[s],
                              &sc[s], &m[s], q + 16 * s);
                b->scales[s] = (uint8_t)(sc[s] | m[s] << 4);
        }
        q2bits_pack(q, b->qs);
}

/* Q3_K's 16 six-bit scales, stored +32: low nibbles in bytes 0-7 (scales
 * 0-7 low half, 8-15 high half), top two bits of scale k in byte 8 + k%4
 * at bit 2(k/4). Returned signed. */
static void q3k_scales(const uint8_t *p, int *sc)
{
        for (int k = 0; k < 16; k++) {
                int lo = k < 8 ? p[k] & 0x0f : p[k - 8] >> 4;
                int hi = (p[8 + k % 4] >> (2 * (k / 4))) & 3;
                sc[k] = (lo | hi << 4) - 32;
        }
}

static void q3k_pack_scales(const int *sc, uint8_t *p)
{
        memset(p, 0, K_SCALE_SIZE);
        for (int k = 0; k < 16; k++) {
                int v = sc[k] + 32;
                p[k < 8 ? k : k - 8] |= (uint8_t)((v & 0x0f) << (k < 8 ? 0 : 4));
                p[8 + k % 4] |= (uint8_t)((v >> 4) << (2 * (k / 4)));
        }
}

/* Signed quants -4..3: a clear hmask bit means the value is 4 lower. */
static void q3k_unpack(const block_q3_k *b, int8_t *q)
{
        uint8_t low[QK_K];

        q2bits_unpack(b->qs, low);
        for (int i = 0; i < QK_K; i++) {
                int hbit = (b->hmask[i % 32] >> (4 * (i / 128) + (i % 128) / 32)) & 1;
                q[i] = (int8_t)(low[i] - (hbit ? 0 : 4));
        }
}

static void dequant_q3_k(const block_q3_k *b, float *y)
{
        float d = h2f(b->d);
        int sc[16];
        int8_t q[QK_K];

        q3k_scales(b->scales, sc);
        q3k_unpack(b, q);
        for (int s = 0; s < 16; s++) {
                float dl = d * (float)sc[s];
                for (int l = 0; l < 16; l++)
                        y[16 * s + l] = dl * (float)q[16 * s + l];
        }
}

/* ggml's sign convention at both levels, as in Q6_K: the largest-magnitude
 * value of a sub-block maps to -4, the largest-magnitude scale to -32. */
static void quant_q3_k(const float *x, block_q3_k *b)
{
        float scale[16];
        int sc[16];
        uint8_t u[QK_K];
        float iscale = signed_subblock_scales(x, 4.0f, 32.0f, scale);
        b->d = f2h(iscale != 0.0f ? 1.0f / iscale : 0.0f);
        float d = h2f(b->d);
        memset(b->hmask, 0, sizeof b->hmask);
        for (int s = 0; s < 16; s++) {
                sc[s] = clampi(nearest_int(iscale * scale[s]), -32, 31);
                float ds = d * (float)sc[s];
                float id = ds != 0.0f ? 1.0f / ds : 0.0f;
                for (int i = 16 * s; i < 16 * s + 16; i++) {
                        int v = clampi(nearest_int(x[i] * id), -4, 3) + 4;
                        u[i] = (uint8_t)(v & 3);
                        if (v & 4)
                                b->hmask[i % 32] |= (uint8_t)(1 << (4 * (i / 128) + (i % 128) / 32));
                }
        }
        q3k_pack_scales(sc, b->scales);
        q2bits_pack(u, b->qs);
}

/* ---- activations ---- */

void mo_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n)
{
        for (int64_t i = 0; i < n / QK8_0; i++)
                quant_q8_0(x + i * QK8_0, &y[i]);
}

/* ggml's Q8_K: the largest-magnitude value maps to -127 (so d carries the
 * opposite sign), rounding to nearest even; d stays a float. */
static void quant_q8_k(const float *x, block_q8_k *y)
{
        float amax, max = signed_absmax(x, QK_K, &amax);
        float iscale;

        if (amax == 0.0f) {
                memset(y, 0, sizeof *y);
                return;
        }
        iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++)
                y->qs[j] = (int8_t)MO_MIN(127, nearest_int(iscale * x[j]));
        for (int s = 0; s < QK_K / 16; s++) {
                int sum = 0;
                for (int j = 0; j < 16; j++)
                        sum += y->qs[16 * s + j];
                y->bsums[s] = (int16_t)sum;
        }
        y->d = 1.0f / iscale;
}

void mo_quantize_row_q8_k(const float *x, block_q8_k *y, int64_t n)
{
        for (int64_t i = 0; i < n / QK_K; i++)
                quant_q8_k(x + i * QK_K, &y[i]);
}

/* ---- row dispatch ---- */

static bool row_ok(int type, int64_t n)
{
        const struct mo_type_info *ti = mo_type_get(type);

        return ti && ti->computable && n >= 0 && n % ti->block == 0;
}

static void dequant_block(int type, const void *src, float *y)
{
        switch (type) {
        case MO_TYPE_Q4_0: dequant_q4_0(src, y); break;
        case MO_TYPE_Q5_0: dequant_q5_0(src, y); break;
        case MO_TYPE_Q8_0: dequant_q8_0(src, y); break;
        case MO_TYPE_Q2_K: dequant_q2_k(src, y); break;
        case MO_TYPE_Q3_K: dequant_q3_k(src, y); break;
        case MO_TYPE_Q4_K: dequant_q4_k(src, y); break;
        case MO_TYPE_Q5_K: dequant_q5_k(src, y); break;
        case MO_TYPE_Q6_K: dequant_q6_k(src, y); break;
        }
}

static void quant_block(int type, const float *x, void *dst)
{
        switch (type) {
        case MO_TYPE_Q4_0: quant_q4_0(x, dst); break;
        case MO_TYPE_Q5_0: quant_q5_0(x, dst); break;
        case MO_TYPE_Q8_0: quant_q8_0(x, dst); break;
        case MO_TYPE_Q2_K: quant_q2_k(x, dst); break;
        case MO_TYPE_Q3_K: quant_q3_k(x, dst); break;
        case MO_TYPE_Q4_K: quant_q4_k(x, dst); break;
        case MO_TYPE_Q5_K: quant_q5_k(x, dst); break;
        case MO_TYPE_Q6_K: quant_q6_k(x, dst); break;
        }
}

/* Misuse (a type that is not computable, a partial block) writes NaN so
 * that it shows in any result rather than passing as plausible numbers. */
void mo_dequantize_row(int type, const void *src, float *dst, int64_t n)
{
        const struct mo_type_info *ti = mo_type_get(type);
        const uint8_t *p = src;

        if (!row_ok(type, n)) {
                for (int64_t i = 0; i < n; i++)
                        dst[i] = NAN;
                return;
        }
        switch (type) {
        case MO_TYPE_F32:
                memcpy(dst, src, (size_t)n * sizeof(float));
                return;
        case MO_TYPE_F16:
        case MO_TYPE_BF16:
                for (int64_t i = 0; i < n; i++) {
                        uint16_t h;
                        memcpy(&h, p + 2 * i, 2);
                        dst[i] = type == MO_TYPE_F16 ? mo_half_to_float(h) : mo_bf16_to_float(h);
                }
                return;
        }
        for (int64_t i = 0; i < n / ti->block; i++)
                dequant_block(type, p + i * ti->block_bytes, dst + i * ti->block);
}

void mo_quantize_row(int type, const float *src, void *dst, int64_t n)
{
        const struct mo_type_info *ti = mo_type_get(type);
        uint8_t *p = dst;

        if (!row_ok(type, n))
                return;
        switch (type) {
        case MO_TYPE_F32:
                memcpy(dst, src, (size_t)n * sizeof(float));
                return;
        case MO_TYPE_F16:
        case MO_TYPE_BF16:
                for (int64_t i = 0; i < n; i++) {
                        uint16_t h = type == MO_TYPE_F16 ? mo_float_to_half(src[i])
                                                         : mo_float_to_bf16(src[i]);
                        memcpy(p + 2 * i, &h, 2);
                }
                return;
        }
        for (int64_t i = 0; i < n / ti->block; i++)
                quant_block(type, src + i * ti->block, p + i * ti->block_bytes);
}

int mo_vec_dot_type(int weight_type)
{
        switch (weight_type) {
        case MO_TYPE_F32:
        case MO_TYPE_F16:
        case MO_TYPE_BF16:
                return MO_TYPE_F32;
        case MO_TYPE_Q4_0:
        case MO_TYPE_Q5_0:
        case MO_TYPE_Q8_0:
                return MO_TYPE_Q8_0;
        case MO_TYPE_Q2_K:
        case MO_TYPE_Q3_K:
        case MO_TYPE_Q4_K:
        case MO_TYPE_Q5_K:
        case MO_TYPE_Q6_K:
                return MO_TYPE_Q8_K;
        default:
                return -EINVAL;
        }
}

/* ---- reference dot products ----
 * Within a block the sums are exact integers, as in the SIMD kernels; the
 * block's float scale product is formed in float as they do; only the sum
 * over blocks is kept in double, so the reference carries no accumulation
 * error of its own and a SIMD result differs from it by float rounding. */

static float dot_float(int type, int64_t n, const uint8_t *w, const float *a)
{
        double sum = 0.0;

        for (int64_t i = 0; i < n; i++) {
                float v;
                if (type == MO_TYPE_F32) {
                        memcpy(&v, w + 4 * i, 4);
                } else {
                        uint16_t h;
                        memcpy(&h, w + 2 * i, 2);
                        v = type == MO_TYPE_F16 ? mo_half_to_float(h) : mo_bf16_to_float(h);
                }
                sum += (double)v * (double)a[i];
        }
        return (float)sum;
}

/* Signed quants of one 32-value block of Q4_0/Q5_0/Q8_0 and its scale. */
static float q32_unpack(int type, const uint8_t *blk, int *q)
{
        if (type == MO_TYPE_Q8_0) {
                const block_q8_0 *b = (const block_q8_0 *)blk;
                for (int j = 0; j < QK8_0; j++)
                        q[j] = b->qs[j];
                return h2f(b->d);
        }
        if (type == MO_TYPE_Q4_0) {
                const block_q4_0 *b = (const block_q4_0 *)blk;
                for (int j = 0; j < 16; j++) {
                        q[j] = (b->qs[j] & 0x0f) - 8;
                        q[j + 16] = (b->qs[j] >> 4) - 8;
                }
                return h2f(b->d);
        }
        const block_q5_0 *b = (const block_q5_0 *)blk;
        uint32_t qh = load_le32(b->qh);
        for (int j = 0; j < 16; j++) {
                q[j] = ((b->qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4) - 16;
                q[j + 16] = ((b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4) - 16;
        }
        return h2f(b->d);
}

static float dot_q8_0_act(int type, int64_t n, const uint8_t *w, const block_q8_0 *a)
{
        size_t bytes = type_table[type].block_bytes;
        double sum = 0.0;
        int q[32];

        for (int64_t i = 0; i < n / 32; i++) {
                float dw = q32_unpack(type, w + i * bytes, q);
                int32_t isum = 0;
                for (int j = 0; j < 32; j++)
                        isum += q[j] * a[i].qs[j];
                sum += (double)((float)isum * (dw * h2f(a[i].d)));
        }
        return (float)sum;
}

/* Q4_K/Q5_K: d·da·Σ_b sc_b·Σ q·a  −  dmin·da·Σ_b m_b·(bsums of its two 16s). */
static float dot_q45k_block(mo_half dh, mo_half dminh, const uint8_t *scales,
                            const uint8_t *q, const block_q8_k *a)
{
        int32_t isum = 0, msum = 0;

        for (int b = 0; b < 8; b++) {
                int sc, m, s = 0;
                k4_scale_min(b, scales, &sc, &m);
                for (int l = 0; l < 32; l++)
                        s += q[32 * b + l] * a->qs[32 * b + l];
                isum += sc * s;
                msum += m * (a->bsums[2 * b] + a->bsums[2 * b + 1]);
        }
        return h2f(dh) * a->d * (float)isum - h2f(dminh) * a->d * (float)msum;
}

static float dot_q6k_block(const block_q6_k *w, const block_q8_k *a)
{
        int8_t q[QK_K];
        int32_t isum = 0;

        q6k_unpack(w, q);
        for (int s = 0; s < 16; s++) {
                int sub = 0;
                for (int l = 0; l < 16; l++)
                        sub += q[16 * s + l] * a->qs[16 * s + l];
                isum += w->scales[s] * sub;
        }
        return h2f(w->d) * a->d * (float)isum;
}

/* Q2_K: d·da·Σ_s sc_s·Σ q·a  −  dmin·da·Σ_s m_s·bsums_s (sub-blocks of 16
 * line up with the bsums). */
static float dot_q2k_block(const block_q2_k *w, const block_q8_k *a)
{
        uint8_t q[QK_K];
        int32_t isum = 0, msum = 0;

        q2bits_unpack(w->qs, q);
        for (int s = 0; s < 16; s++) {
                int sub = 0;
                for (int l = 0; l < 16; l++)
                        sub += q[16 * s + l] * a->qs[16 * s + l];
                isum += (w->scales[s] & 0x0f) * sub;
                msum += (w->scales[s] >> 4) * a->bsums[s];
        }
        return h2f(w->d) * a->d * (float)isum - h2f(w->dmin) * a->d * (float)msum;
}

static float dot_q3k_block(const block_q3_k *w, const block_q8_k *a)
{
        int8_t q[QK_K];
        int sc[16];
        int32_t isum = 0;

        q3k_scales(w->scales, sc);
        q3k_unpack(w, q);
        for (int s = 0; s < 16; s++) {
                int sub = 0;
                for (int l = 0; l < 16; l++)
                        sub += q[16 * s + l] * a->qs[16 * s + l];
                isum += sc[s] * sub;
        }
        return h2f(w->d) * a->d * (float)isum;
}

static float dot_kquant_block(int type, const uint8_t *blk, const block_q8_k *a)
{
        uint8_t q[QK_K];

        switch (type) {
        case MO_TYPE_Q2_K:
                return dot_q2k_block((const block_q2_k *)blk, a);
        case MO_TYPE_Q3_K:
                return dot_q3k_block((const block_q3_k *)blk, a);
        case MO_TYPE_Q4_K: {
                const block_q4_k *b = (const block_q4_k *)blk;
                q45k_unpack(b->qs, NULL, q);
                return dot_q45k_block(b->d, b->dmin, b->scales, q, a);
        }
        case MO_TYPE_Q5_K: {
                const block_q5_k *b = (const block_q5_k *)blk;
                q45k_unpack(b->qs, b->qh, q);
                return dot_q45k_block(b->d, b->dmin, b->scales, q, a);
        }
        default:
                return dot_q6k_block((const block_q6_k *)blk, a);
        }
}

static float dot_q8_k_act(int type, int64_t n, const uint8_t *w, const block_q8_k *a)
{
        size_t bytes = type_table[type].block_bytes;
        double sum = 0.0;

        for (int64_t i = 0; i < n / QK_K; i++)
                sum += (double)dot_kquant_block(type, w + i * bytes, &a[i]);
        return (float)sum;
}

float mo_vec_dot_ref(int type, int64_t n, const void *w, const void *act)
{
        if (!row_ok(type, n))
                return NAN;
        switch (mo_vec_dot_type(type)) {
        case MO_TYPE_F32:
                return dot_float(type, n, w, act);
        case MO_TYPE_Q8_0:
                return dot_q8_0_act(type, n, w, act);
        case MO_TYPE_Q8_K:
                return dot_q8_k_act(type, n, w, act);
        default:
                return NAN;
        }
}
