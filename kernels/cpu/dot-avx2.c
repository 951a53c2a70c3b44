/* dot-avx2.c: the AVX2 (+FMA, F16C) dot kernels, compiled with those flags
 * and only called after cpuid says the CPU has them.
 * Each kernel is a tile of NR weight rows x NC activation rows that shares
 * the unpacking of a weight block among NC activations; every element keeps
 * one accumulator updated in block order, so the tile shape never changes a
 * result bit. Integer products use maddubs (u8 x s8) with the weights made
 * unsigned and any offset taken off through activation sums. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "common/cleanup.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/dot-impl.h"

#define TILE_INLINE static inline __attribute__((always_inline))
#define NC_MAX 2

TILE_INLINE float hsum8(__m256 v)
{
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
}

TILE_INLINE float half_to_f32(mo_half h)
{
        return _cvtsh_ss(h);
}

/* u8 x s8 products summed in fours to int32 lanes. */
TILE_INLINE __m256i dot_u8s8(__m256i u, __m256i s)
{
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

#define ROW(p, i, stride) ((const uint8_t *)(p) + (i) * (stride))

/* ---- float weights ------------------------------------------------------- */

enum wkind { W_F32, W_F16, W_BF16 };

TILE_INLINE __m256 load_w8(const void *p, enum wkind k)
{
        if (k == W_F32)
                return _mm256_loadu_ps(p);
        if (k == W_F16)
                return _mm256_cvtph_ps(_mm_loadu_si128(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
}

TILE_INLINE void float_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                            size_t as, float *y, int64_t ys, enum wkind k,
                            const int NR, const int NC)
{
        const size_t esz = k == W_F32 ? 4 : 2;
        __m256 acc[4][NC_MAX];
        int64_t i = 0;

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
                __m256 av[NC_MAX];

                for (int c = 0; c < NC; c++)
                        av[c] = _mm256_loadu_ps((const float *)ROW(a, c, as) + i);
                for (int r = 0; r < NR; r++) {
                        __m256 wv = load_w8(ROW(w, r, ws) + i * esz, k);

                        for (int c = 0; c < NC; c++)
                                acc[r][c] = _mm256_fmadd_ps(wv, av[c], acc[r][c]);
                }
        }
        if (i < n) {
                /* The tail goes through zero-padded copies so that it is one
                 * more vector step, the same for every tile shape. */
                float at[NC_MAX][8];
                uint8_t wt[8 * 4];

                for (int c = 0; c < NC; c++) {
                        memset(at[c], 0, sizeof at[c]);
                        memcpy(at[c], (const float *)ROW(a, c, as) + i, (size_t)(n - i) * 4);
                }
                for (int r = 0; r < NR; r++) {
                        __m256 wv;

                        memset(wt, 0, sizeof wt);
                        memcpy(wt, ROW(w, r, ws) + i * esz, (size_t)(n - i) * esz);
                        wv = load_w8(wt, k);
                        for (int c = 0; c < NC; c++)
                                acc[r][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(at[c]),
                                                            acc[r][c]);
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = hsum8(acc[r][c]);
}

#define F_TILE(kind)                                                                   \
        TILE_INLINE void tile_##kind(int64_t n, const uint8_t *w, size_t ws,           \
                                     const uint8_t *a, size_t as, float *y,            \
                                     int64_t ys, const int NR, const int NC)           \
        {                                                                              \
                float_tile(n, w, ws, a, as, y, ys, W_##kind, NR, NC);                  \
        }
F_TILE(F32)
F_TILE(F16)
F_TILE(BF16)

/* ---- Q8_0, Q4_0, Q5_0 weights x Q8_0 activations -------------------------- */

/* Unsigned weight bytes of one 32-block and the bias to take off (0, 8, 16). */
TILE_INLINE __m256i q4_0_bytes(const block_q4_0 *b)
{
        __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
        __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);

        return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

TILE_INLINE __m256i q5_0_bytes(const block_q5_0 *b)
{
        __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
        __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q),
                                     _mm256_set1_epi8(0x0F));
        /* Byte i takes qh byte i/8 and keeps bit i%8: the fifth bit of value i. */
        const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                 0x0101010101010101, 0);
        const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
        __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32((int)mo_load_u32le(b->qh)), spread);

        h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
        return _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
}

enum qkind { Q_8_0, Q_4_0, Q_5_0 };

TILE_INLINE void q32_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                          size_t as, float *y, int64_t ys, enum qkind k,
                          const int NR, const int NC)
{
        const size_t bsz = k == Q_8_0 ? sizeof(block_q8_0) :
                           k == Q_4_0 ? sizeof(block_q4_0) : sizeof(block_q5_0);
        const __m256i bias = _mm256_set1_epi8(k == Q_4_0 ? 8 : 16);
        __m256 acc[4][NC_MAX];

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < n / 32; b++) {
                __m256i av[NC_MAX], off[NC_MAX];
                __m256 ad[NC_MAX];

                for (int c = 0; c < NC; c++) {
                        const block_q8_0 *ab = (const block_q8_0 *)ROW(a, c, as) + b;

                        av[c] = _mm256_loadu_si256((const __m256i *)ab->qs);
                        ad[c] = _mm256_set1_ps(half_to_f32(ab->d));
                        if (k != Q_8_0)
                                off[c] = _mm256_maddubs_epi16(bias, av[c]);
                }
                for (int r = 0; r < NR; r++) {
                        const uint8_t *wb = ROW(w, r, ws) + b * bsz;
                        __m256 wd = _mm256_set1_ps(half_to_f32(*(const mo_half *)wb));
                        __m256i wv, wu;

                        if (k == Q_8_0) {
                                wv = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)wb)->qs);
                                wu = _mm256_abs_epi8(wv);
                        } else if (k == Q_4_0) {
                                wu = q4_0_bytes((const block_q4_0 *)wb);
                        } else {
                                wu = q5_0_bytes((const block_q5_0 *)wb);
                        }
                        for (int c = 0; c < NC; c++) {
                                __m256i p;

                                if (k == Q_8_0) {
                                        p = dot_u8s8(wu, _mm256_sign_epi8(av[c], wv));
                                } else {
                                        p = _mm256_sub_epi16(_mm256_maddubs_epi16(wu, av[c]), off[c]);
                                        p = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
                                }
                                acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(wd, ad[c]),
                                                            _mm256_cvtepi32_ps(p), acc[r][c]);
                        }
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = hsum8(acc[r][c]);
}

#define Q_TILE(kind)                                                                   \
        TILE_INLINE void tile_Q##kind(int64_t n, const uint8_t *w, size_t ws,          \
                                      const uint8_t *a, size_t as, float *y,           \
                                      int64_t ys, const int NR, const int NC)          \
        {                                                                              \
                q32_tile(n, w, ws, a, as, y, ys, Q_##kind, NR, NC);                    \
        }
Q_TILE(8_0)
Q_TILE(4_0)
Q_TILE(5_0)

/* ---- K-quant weights x Q8_K activations ----------------------------------- */

/* Mins of a Q4_K/Q5_K block as [m0 m0 m1 m1 ... m7 m7] int16, to meet the
 * activation sums of each 16. */
TILE_INLINE __m256i k4_mins16(const uint8_t mn[8])
{
        __m128i m = _mm_loadl_epi64((const __m128i *)mn);

        return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
}

TILE_INLINE void q45k_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                           size_t as, float *y, int64_t ys, bool five,
                           const int NR, const int NC)
{
        const size_t bsz = five ? sizeof(block_q5_k) : sizeof(block_q4_k);
        const __m256i lo4 = _mm256_set1_epi8(0x0F), one8 = _mm256_set1_epi8(1);
        __m256 acc[4][NC_MAX];

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < n / QK_K; b++) {
                for (int r = 0; r < NR; r++) {
                        const block_q4_k *x4 = (const block_q4_k *)(ROW(w, r, ws) + b * bsz);
                        const block_q5_k *x5 = (const block_q5_k *)x4;
                        const uint8_t *qs = five ? x5->qs : x4->qs;
                        __m256i sumi[NC_MAX], qh = _mm256_setzero_si256(), mins;
                        uint8_t sc[8], mn[8];
                        float d = half_to_f32(x4->d), dmin = half_to_f32(x4->dmin);

                        mo_unpack_k4_scales(x4->scales, sc, mn);
                        mins = k4_mins16(mn);
                        if (five)
                                qh = _mm256_loadu_si256((const __m256i *)x5->qh);
                        for (int c = 0; c < NC; c++)
                                sumi[c] = _mm256_setzero_si256();
                        for (int j = 0; j < 4; j++) {
                                __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
                                __m256i ql = _mm256_and_si256(q, lo4);
                                __m256i qhi = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
                                __m256i s0 = _mm256_set1_epi16(sc[2 * j]);
                                __m256i s1 = _mm256_set1_epi16(sc[2 * j + 1]);

                                if (five) {
                                        __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one8);
                                        __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one8);

                                        ql = _mm256_or_si256(ql, _mm256_slli_epi16(h0, 4));
                                        qhi = _mm256_or_si256(qhi, _mm256_slli_epi16(h1, 4));
                                }
                                for (int c = 0; c < NC; c++) {
                                        const int8_t *q8 = ((const block_q8_k *)ROW(a, c, as) + b)->qs + 64 * j;
                                        __m256i p0 = _mm256_maddubs_epi16(ql, _mm256_loadu_si256((const __m256i *)q8));
                                        __m256i p1 = _mm256_maddubs_epi16(qhi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));

                                        sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(
                                                _mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1)));
                                }
                        }
                        for (int c = 0; c < NC; c++) {
                                const block_q8_k *ab = (const block_q8_k *)ROW(a, c, as) + b;
                                __m256i bs = _mm256_loadu_si256((const __m256i *)ab->bsums);
                                __m256 m = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins));

                                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab->d),
                                                            _mm256_cvtepi32_ps(sumi[c]), acc[r][c]);
                                acc[r][c] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * ab->d), m, acc[r][c]);
                        }
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = hsum8(acc[r][c]);
}

TILE_INLINE void tile_Q4_K(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                           size_t as, float *y, int64_t ys, const int NR, const int NC)
{
        q45k_tile(n, w, ws, a, as, y, ys, false, NR, NC);
}

TILE_INLINE void tile_Q5_K(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                           size_t as, float *y, int64_t ys, const int NR, const int NC)
{
        q45k_tile(n, w, ws, a, as, y, ys, true, NR, NC);
}

/* Q6_K: values 0..63 against the activations, minus 32 x (scale x sums of
 * each 16), which Q8_K carries as bsums. */
TILE_INLINE void tile_Q6_K(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                           size_t as, float *y, int64_t ys, const int NR, const int NC)
{
        const __m256i lo4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
        __m256 acc[4][NC_MAX];

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < n / QK_K; b++) {
                for (int r = 0; r < NR; r++) {
                        const block_q6_k *x = (const block_q6_k *)ROW(w, r, ws) + b;
                        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x->scales));
                        __m256i sumi[NC_MAX];
                        float d = half_to_f32(x->d);

                        for (int c = 0; c < NC; c++) {
                                const block_q8_k *ab = (const block_q8_k *)ROW(a, c, as) + b;
                                __m256i bs = _mm256_loadu_si256((const __m256i *)ab->bsums);

                                sumi[c] = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
                                sumi[c] = _mm256_sub_epi32(_mm256_setzero_si256(), sumi[c]);
                        }
                        for (int h = 0; h < 2; h++) {
                                __m256i l0 = _mm256_loadu_si256((const __m256i *)(x->ql + 64 * h));
                                __m256i l1 = _mm256_loadu_si256((const __m256i *)(x->ql + 64 * h + 32));
                                __m256i hb = _mm256_loadu_si256((const __m256i *)(x->qh + 32 * h));
                                __m256i q[4];

                                q[0] = _mm256_or_si256(_mm256_and_si256(l0, lo4),
                                                       _mm256_slli_epi16(_mm256_and_si256(hb, three), 4));
                                q[1] = _mm256_or_si256(_mm256_and_si256(l1, lo4),
                                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), three), 4));
                                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4),
                                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), three), 4));
                                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4),
                                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), three), 4));
                                for (int k = 0; k < 4; k++) {
                                        int g = 8 * h + 2 * k;
                                        __m256i s = _mm256_set_m128i(_mm_set1_epi16(x->scales[g + 1]),
                                                                     _mm_set1_epi16(x->scales[g]));

                                        for (int c = 0; c < NC; c++) {
                                                const int8_t *q8 = ((const block_q8_k *)ROW(a, c, as) + b)->qs + 32 * (g / 2);
                                                __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)q8));

                                                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_madd_epi16(p, s));
                                        }
                                }
                        }
                        for (int c = 0; c < NC; c++) {
                                const block_q8_k *ab = (const block_q8_k *)ROW(a, c, as) + b;

                                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab->d),
                                                            _mm256_cvtepi32_ps(sumi[c]), acc[r][c]);
                        }
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = hsum8(acc[r][c]);
}

/* ---- activation quantizers ---------------------------------------------------
 * Same operations as quant.c in the same IEEE order (max of |x|, one
 * division, one multiply per value, the same rounding), so the bytes are
 * identical; blocks holding NaN or infinity go to the reference, whose
 * handling of them is a policy rather than arithmetic. */

TILE_INLINE float hmax8(__m256 v)
{
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
}

/* |x| of n floats (n a multiple of 8); false if any is not finite. */
TILE_INLINE bool absmax_finite(const float *x, int n, float *amax)
{
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256 inf = _mm256_set1_ps(INFINITY);
        __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();

        for (int i = 0; i < n; i += 8) {
                __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);

                /* NaN compares false to everything: "not < inf" catches both. */
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
                m = _mm256_max_ps(m, a);
        }
        *amax = hmax8(m);
        return _mm256_movemask_ps(bad) == 0;
}

/* Eight int32 vectors of values in [-128, 127] to 32 int8 in order. */
TILE_INLINE void store_i8x32(int8_t *dst, __m256i a, __m256i b, __m256i c, __m256i d)
{
        __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
        __m256i v = _mm256_packs_epi16(ab, cd);

        /* The packs interleave 128-bit lanes; put the dwords back in order. */
        v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)dst, v);
}

/* roundf: to nearest, ties away from zero. */
TILE_INLINE __m256 round_away(__m256 v)
{
        const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
        __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256 f = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
        __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(sign, v));

        return _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ), one));
}

void mo_quantize_q8_0_avx2(const float *x, block_q8_0 *y, int64_t n)
{
        const __m256 lim = _mm256_set1_ps(127.0f);

        for (int64_t b = 0; b < n / QK8_0; b++) {
                const float *xb = x + b * QK8_0;
                __m256i q[4];
                float amax, d, id;

                if (!absmax_finite(xb, QK8_0, &amax)) {
                        mo_quantize_row_q8_0(xb, &y[b], QK8_0);
                        continue;
                }
                d = amax / 127.0f;
                id = d != 0.0f ? 1.0f / d : 0.0f;
                if (isinf(id)) { /* tiny block: 0 * inf = NaN cases */
                        mo_quantize_row_q8_0(xb, &y[b], QK8_0);
                        continue;
                }
                y[b].d = (mo_half)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
                for (int k = 0; k < 4; k++) {
                        __m256 v = round_away(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k),
                                                            _mm256_set1_ps(id)));

                        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
                        q[k] = _mm256_cvttps_epi32(v);
                }
                store_i8x32(y[b].qs, q[0], q[1], q[2], q[3]);
        }
}

/* The value of largest magnitude, first one on ties (its sign matters). */
static float first_signed_max(const float *x, float amax)
{
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        const __m256 target = _mm256_set1_ps(amax);

        for (int i = 0; i < QK_K; i += 8) {
                int m = _mm256_movemask_ps(_mm256_cmp_ps(
                        _mm256_and_ps(_mm256_loadu_ps(x + i), absmask), target, _CMP_EQ_OQ));

                if (m)
                        return x[i + __builtin_ctz((unsigned)m)];
        }
        return amax; /* unreachable: amax is one of the |x| */
}

static void quant_q8_k_block(const float *x, block_q8_k *y)
{
        float amax, iscale;
        __m256 is;

        if (!absmax_finite(x, QK_K, &amax)) {
                mo_quantize_row_q8_k(x, y, QK_K);
                return;
        }
        if (amax == 0.0f) {
                memset(y, 0, sizeof *y);
                return;
        }
        iscale = -127.0f / first_signed_max(x, amax);
        if (isinf(iscale)) { /* tiny block: saturation cases */
                mo_quantize_row_q8_k(x, y, QK_K);
                return;
        }
        is = _mm256_set1_ps(iscale);
        for (int k = 0; k < QK_K; k += 32) {
                __m256i q[4];

                for (int j = 0; j < 4; j++) {
                        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * j), is),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);

                        q[j] = _mm256_min_epi32(_mm256_cvttps_epi32(v), _mm256_set1_epi32(127));
                }
                store_i8x32(y->qs + k, q[0], q[1], q[2], q[3]);
        }
        for (int g = 0; g < QK_K / 32; g++) {
                __m256i s = dot_u8s8(_mm256_set1_epi8(1),
                                     _mm256_loadu_si256((const __m256i *)(y->qs + 32 * g)));
                __m128i lo = _mm256_castsi256_si128(s), hi = _mm256_extracti128_si256(s, 1);

                /* Lanes 0-3 sum values 0-15 of the 32, lanes 4-7 values 16-31. */
                lo = _mm_hadd_epi32(lo, hi);
                lo = _mm_hadd_epi32(lo, lo);
                y->bsums[2 * g] = (int16_t)_mm_cvtsi128_si32(lo);
                y->bsums[2 * g + 1] = (int16_t)_mm_extract_epi32(lo, 1);
        }
        y->d = 1.0f / iscale;
}

void mo_quantize_q8_k_avx2(const float *x, block_q8_k *y, int64_t n)
{
        for (int64_t b = 0; b < n / QK_K; b++)
                quant_q8_k_block(x + b * QK_K, &y[b]);
}

/* ---- drivers -------------------------------------------------------------- */

/* Rows in fours and activations in NC_MAX at a time; the four weight rows
 * stay in L1 while the activations sweep past. */
/* As in dot-avx512.c: four rows at a time only when NC_MAX activation
 * rows reuse each weight load; fewer stream one row at a time, the only
 * pattern the hardware prefetchers follow at full speed. */
#define GEMM_ROWS(kind, R)                                                               \
        for (; r + (R) <= nr; r += (R)) {                                                \
                for (c = 0; c + NC_MAX <= nc; c += NC_MAX)                               \
                        tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as,             \
                                    y + c * ys + r, ys, R, NC_MAX);                      \
                for (; c < nc; c++)                                                      \
                        tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as,             \
                                    y + c * ys + r, ys, R, 1);                           \
        }

#define GEMM(kind)                                                                       \
        static void gemm_##kind(int64_t n, const void *w, size_t ws, int64_t nr,         \
                                const void *a, size_t as, int64_t nc, float *y,          \
                                int64_t ys)                                              \
        {                                                                                \
                int64_t r = 0, c;                                                        \
                if (nc >= NC_MAX)                                                        \
                        GEMM_ROWS(kind, 4)                                               \
                GEMM_ROWS(kind, 1)                                                       \
        }

GEMM(F32)
GEMM(F16)
GEMM(BF16)
GEMM(Q8_0)
GEMM(Q4_0)
GEMM(Q5_0)
GEMM(Q4_K)
GEMM(Q5_K)
GEMM(Q6_K)

/* ---- element-wise kernels that need e^x --------------------------------------
 * SwiGLU and softmax, for the AVX2 and AVX-512 tables alike. glibc's expf,
 * one lane at a time, took about 18 cycles an element: SwiGLU over a
 * batch's experts and the attention's softmax cost more than some of the
 * matrix products around them. Every element is computed the same way
 * wherever it falls in the array (the tail is a masked vector, not a
 * scalar loop), so a result does not depend on how the pool cut the range
 * or on what was batched with it. */

/* Lanes [0, n) of eight, n <= 8, as the sign bits maskload wants. */
TILE_INLINE __m256i lanes_below(int64_t n)
{
        return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* e^x within 2 ulp of the true value over the whole float range: x =
 * n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for e^r (Cephes'
 * expf coefficients), then 2^n applied in two halves, each a normal
 * float, so that a result below FLT_MIN rounds once into the denormals
 * and one above FLT_MAX becomes inf. NaN stays NaN: max and min return
 * their second operand when either is NaN. */
TILE_INLINE __m256 exp8(__m256 x)
{
        const __m256 one = _mm256_set1_ps(1.0f);
        __m256 n, r, p;
        __m256i ni, n1;

        /* e^-104 is below half the smallest denormal, e^88.8 above FLT_MAX. */
        x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
        n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* ln2 in two parts; n x the first is exact. */
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one);
        /* n is in [-150, 128]: its halves in [-75, 64]. */
        ni = _mm256_cvtps_epi32(n);
        n1 = _mm256_srai_epi32(ni, 1);
        p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23)));
        return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
                                        _mm256_add_epi32(_mm256_sub_epi32(ni, n1), _mm256_set1_epi32(127)), 23)));
}

/* g / (1 + e^-g) * u, in the scalar kernel's order of operations. */
TILE_INLINE __m256 swiglu8(__m256 g, __m256 u)
{
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));

        return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

void mo_swiglu_avx2(const float *gate, const float *up, float *out, int64_t n)
{
        int64_t i = 0;

        for (; i + 8 <= n; i += 8)
                _mm256_storeu_ps(out + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
        if (i < n) {
                __m256i m = lanes_below(n - i);

                _mm256_maskstore_ps(out + i, m, swiglu8(_mm256_maskload_ps(gate + i, m),
                                                        _mm256_maskload_ps(up + i, m)));
        }
}

float mo_softmax_avx2(float *s, int64_t n, float scale)
{
        const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
        __m256 mx = ninf, sum = _mm256_setzero_ps(), vmx;
        int64_t i;

        for (i = 0; i + 8 <= n; i += 8) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + i), vs);

                _mm256_storeu_ps(s + i, v);
                mx = _mm256_max_ps(mx, v);
        }
        if (i < n) {
                __m256i m = lanes_below(n - i);
                __m256 v = _mm256_mul_ps(_mm256_maskload_ps(s + i, m), vs);

                _mm256_maskstore_ps(s + i, m, v);
                mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(m)));
        }
        vmx = _mm256_set1_ps(hmax8(mx));
        for (i = 0; i + 8 <= n; i += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmx));

                _mm256_storeu_ps(s + i, e);
                sum = _mm256_add_ps(sum, e);
        }
        if (i < n) {
                __m256i m = lanes_below(n - i);
                __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(s + i, m), vmx));

                _mm256_maskstore_ps(s + i, m, e);
                sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
        }
        return hsum8(sum);
}

/* ---- the attention's weighted sum of cached rows ---------------------------
 * TN tokens at a time: one head's TN weights stay in registers while its
 * output row takes the tokens' rows in token order, one fma each, so the
 * output row is read and written once per TN tokens, and the TN rows
 * (16 KB at kv_lora 512) stay in L1 for every head. The plain C loop this
 * replaces (SSE as gcc made it) ran at about 7 GMAC/s a core and was three
 * quarters of a long context's attention. */

#define MIX_TOKENS 8

/* Values [k, k + 8 SN) of one head's output, TN tokens; masked only
 * where the row ends inside them (a masked store costs many cycles on
 * AMD). Each slice is a chain of TN fmas in token order; SN of them
 * side by side keep the unit busy while each waits on its last. */
TILE_INLINE void mix_slice(const __m256 *pw, const float *const *rows, int64_t k, float *o, __m256i m,
                           const bool full, const int TN, const int SN)
{
        __m256 acc[4];

        for (int j = 0; j < SN; j++)
                acc[j] = full ? _mm256_loadu_ps(o + k + 8 * j) : _mm256_maskload_ps(o + k, m);
        for (int i = 0; i < TN; i++)
                for (int j = 0; j < SN; j++)
                        acc[j] = _mm256_fmadd_ps(pw[i], full ? _mm256_loadu_ps(rows[i] + k + 8 * j) :
                                                               _mm256_maskload_ps(rows[i] + k, m), acc[j]);
        for (int j = 0; j < SN; j++)
                if (full)
                        _mm256_storeu_ps(o + k + 8 * j, acc[j]);
                else
                        _mm256_maskstore_ps(o + k, m, acc[j]);
}

TILE_INLINE void mix_tokens(int64_t g, const float *p, int64_t ps, const float *const *rows, int64_t n,
                            float *out, int64_t os, const int TN)
{
        for (int64_t h = 0; h < g; h++) {
                float *o = out + h * os;
                __m256 pw[MIX_TOKENS];
                int64_t k = 0;

                for (int i = 0; i < TN; i++)
                        pw[i] = _mm256_broadcast_ss(p + h * ps + i);
                for (; k + 32 <= n; k += 32)
                        mix_slice(pw, rows, k, o, _mm256_setzero_si256(), true, TN, 4);
                for (; k + 8 <= n; k += 8)
                        mix_slice(pw, rows, k, o, _mm256_setzero_si256(), true, TN, 1);
                if (k < n)
                        mix_slice(pw, rows, k, o, lanes_below(n - k), false, TN, 1);
        }
}

void mo_mix_rows_avx2(int64_t g, int64_t nt, const float *p, int64_t p_stride, const float *const *rows,
                      int64_t n, float *out, int64_t out_stride)
{
        int64_t t = 0;

        for (; t + MIX_TOKENS <= nt; t += MIX_TOKENS)
                mix_tokens(g, p + t, p_stride, rows + t, n, out, out_stride, MIX_TOKENS);
        for (; t < nt; t++)
                mix_tokens(g, p + t, p_stride, rows + t, n, out, out_stride, 1);
}

void mo_cpu_kernels_avx2(struct mo_cpu_kernels *k)
{
        memset(k, 0, sizeof *k);
        k->level = MO_SIMD_AVX2;
        k->gemm[MO_TYPE_F32] = gemm_F32;
        k->gemm[MO_TYPE_F16] = gemm_F16;
        k->gemm[MO_TYPE_BF16] = gemm_BF16;
        k->gemm[MO_TYPE_Q8_0] = gemm_Q8_0;
        k->gemm[MO_TYPE_Q4_0] = gemm_Q4_0;
        k->gemm[MO_TYPE_Q5_0] = gemm_Q5_0;
        k->gemm[MO_TYPE_Q4_K] = gemm_Q4_K;
        k->gemm[MO_TYPE_Q5_K] = gemm_Q5_K;
        k->gemm[MO_TYPE_Q6_K] = gemm_Q6_K;
        k->quant_q8_0 = mo_quantize_q8_0_avx2;
        k->quant_q8_k = mo_quantize_q8_k_avx2;
        k->swiglu = mo_swiglu_avx2;
        k->softmax = mo_softmax_avx2;
        k->mix_rows = mo_mix_rows_avx2;
}
