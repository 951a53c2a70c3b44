/* dot-avx512.c: the AVX-512 (F, BW, VL, DQ) dot kernels, compiled with
 * those flags and only called after cpuid says the CPU has them.
 * Same tile scheme as dot-avx2.c with 512-bit vectors: 32-blocks go two at a
 * time, K-quant sub-blocks 64 values at a time, and 32 registers allow
 * 4 x 4 tiles for prefill. Q8_0 and Q4_K weights, those of the common
 * 8- and 4-bit files, have their own kernels in dot-avx512-q8.h and
 * dot-avx512-k4.h. dot-avx512-vnni.c compiles this file again
 * with VNNI, whose dpbusd/dpwssd fuse two or three steps of the integer
 * dot; both builds give the same bits. */
#include <immintrin.h>
#include <string.h>

#include "common/cleanup.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/dot-impl.h"

#define TILE_INLINE static inline __attribute__((always_inline))
#define NC_MAX 4

#define ROW(p, i, stride) ((const uint8_t *)(p) + (i) * (stride))

TILE_INLINE float half_to_f32(mo_half h)
{
        return _cvtsh_ss(h);
}

/* len bytes from p into L2, for weights that a kernel takes in an order
 * the hardware's prefetchers do not follow. */
TILE_INLINE void prefetch_l2(const void *p, size_t len)
{
        for (size_t o = 0; o < len; o += 64)
                _mm_prefetch((const char *)p + o, _MM_HINT_T1);
        _mm_prefetch((const char *)p + len - 1, _MM_HINT_T1);
}

TILE_INLINE __m512i join256(__m256i lo, __m256i hi)
{
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* acc + pairwise int16 products summed to int32 lanes (one dpwssd with
 * VNNI; the same wrapping arithmetic either way). */
TILE_INLINE __m512i madd_acc(__m512i acc, __m512i x, __m512i y)
{
#ifdef __AVX512VNNI__
        return _mm512_dpwssd_epi32(acc, x, y);
#else
        return _mm512_add_epi32(acc, _mm512_madd_epi16(x, y));
#endif
}

/* u8 x s8 products summed in fours to int32 lanes. */
TILE_INLINE __m512i dot_u8s8(__m512i u, __m512i s)
{
        return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

/* ---- float weights ------------------------------------------------------- */

enum wkind { W_F32, W_F16, W_BF16 };

TILE_INLINE __m512 load_w16(const void *p, enum wkind k, __mmask16 m)
{
        if (k == W_F32)
                return _mm512_maskz_loadu_ps(m, p);
        if (k == W_F16)
                return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

TILE_INLINE void float_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                            size_t as, float *y, int64_t ys, enum wkind k,
                            const int NR, const int NC)
{
        const size_t esz = k == W_F32 ? 4 : 2;
        __m512 acc[4][NC_MAX];

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
                /* Masked loads make the tail one more step of the same kind. */
                __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF :
                              (__mmask16)((1u << (n - i)) - 1);
                __m512 av[NC_MAX];

                for (int c = 0; c < NC; c++)
                        av[c] = _mm512_maskz_loadu_ps(m, (const float *)ROW(a, c, as) + i);
                for (int r = 0; r < NR; r++) {
                        __m512 wv = load_w16(ROW(w, r, ws) + i * esz, k, m);

                        for (int c = 0; c < NC; c++)
                                acc[r][c] = _mm512_fmadd_ps(wv, av[c], acc[r][c]);
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = _mm512_reduce_add_ps(acc[r][c]);
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

/* ---- Q4_0, Q5_0 weights x Q8_0 activations, two blocks a step ------------ */

enum qkind { Q_4_0, Q_5_0 };

/* 16 bytes of nibbles as 32 values: low nibbles first. */
TILE_INLINE __m256i nibbles32(const uint8_t *qs)
{
        __m128i q = _mm_loadu_si128((const __m128i *)qs);

        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q),
                                _mm256_set1_epi8(0x0F));
}

TILE_INLINE __m256i q5_0_bytes(const block_q5_0 *b)
{
        __mmask32 h = mo_load_u32le(b->qh);

        /* The fifth bit of value i is bit i of qh: a mask register already. */
        return _mm256_or_si256(nibbles32(b->qs),
                               _mm256_maskz_mov_epi8(h, _mm256_set1_epi8(0x10)));
}

TILE_INLINE __m256i q32_weight(const uint8_t *wb, enum qkind k)
{
        if (k == Q_4_0)
                return nibbles32(((const block_q4_0 *)wb)->qs);
        return q5_0_bytes((const block_q5_0 *)wb);
}

/* Two half scales (the second 0 when absent) as [d0 x8, d1 x8]: one
 * conversion and one permute instead of two of each. */
TILE_INLINE __m512 scale_pair_f32(const uint8_t *blk0, size_t bsz, const bool two)
{
        uint32_t h = *(const mo_half *)blk0;
        __m128 f;

        if (two)
                h |= (uint32_t)*(const mo_half *)(blk0 + bsz) << 16;
        f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h));
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0,
                                                       1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castps128_ps512(f));
}

/* One step of two blocks (or one, when `two` is false, paired with zeros of
 * scale 0). The integer lanes are exact sums of four products either way:
 * with VNNI, dpbusd on unsigned weight x activation with -bias x sum(a)
 * preloaded; without, maddubs/madd as in the AVX2 kernels. The lanes group
 * the same four values in both, so the bits agree. */
TILE_INLINE void q32_step(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                          int64_t b, enum qkind k, const bool two, __m512 acc[4][NC_MAX],
                          const int NR, const int NC)
{
        const size_t bsz = k == Q_4_0 ? sizeof(block_q4_0) : sizeof(block_q5_0);
        const __m512i bias = _mm512_set1_epi8(k == Q_4_0 ? 8 : 16);
        __m512i av[NC_MAX], off[NC_MAX];
        __m512 ad[NC_MAX];

        for (int c = 0; c < NC; c++) {
                const block_q8_0 *ab = (const block_q8_0 *)ROW(a, c, as) + b;
                __m256i a0 = _mm256_loadu_si256((const __m256i *)ab[0].qs);
                __m256i a1 = two ? _mm256_loadu_si256((const __m256i *)ab[1].qs) :
                                   _mm256_setzero_si256();

                av[c] = join256(a0, a1);
                ad[c] = scale_pair_f32((const uint8_t *)ab, sizeof *ab, two);
#ifdef __AVX512VNNI__
                off[c] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, av[c]));
#else
                off[c] = _mm512_maddubs_epi16(bias, av[c]);
#endif
        }
        for (int r = 0; r < NR; r++) {
                const uint8_t *wb = ROW(w, r, ws) + b * bsz;
                __m512 wd = scale_pair_f32(wb, bsz, two);
                __m512i wv = join256(q32_weight(wb, k),
                                     two ? q32_weight(wb + bsz, k) : _mm256_setzero_si256());
                for (int c = 0; c < NC; c++) {
                        __m512i p;
#ifdef __AVX512VNNI__
                        p = _mm512_dpbusd_epi32(off[c], wv, av[c]);
#else
                        p = _mm512_sub_epi16(_mm512_maddubs_epi16(wv, av[c]), off[c]);
                        p = _mm512_madd_epi16(p, _mm512_set1_epi16(1));
#endif
                        acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, ad[c]),
                                                    _mm512_cvtepi32_ps(p), acc[r][c]);
                }
        }
}

TILE_INLINE void q32_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                          size_t as, float *y, int64_t ys, enum qkind k,
                          const int NR, const int NC)
{
        const int64_t nb = n / 32;
        __m512 acc[4][NC_MAX];
        int64_t b = 0;

        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm512_setzero_ps();
        for (; b + 1 < nb; b += 2)
                q32_step(w, ws, a, as, b, k, true, acc, NR, NC);
        if (b < nb)
                q32_step(w, ws, a, as, b, k, false, acc, NR, NC);
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = _mm512_reduce_add_ps(acc[r][c]);
}

#define Q_TILE(kind)                                                                   \
        TILE_INLINE void tile_Q##kind(int64_t n, const uint8_t *w, size_t ws,          \
                                      const uint8_t *a, size_t as, float *y,           \
                                      int64_t ys, const int NR, const int NC)          \
        {                                                                              \
                q32_tile(n, w, ws, a, as, y, ys, Q_##kind, NR, NC);                    \
        }
Q_TILE(4_0)
Q_TILE(5_0)

#include "kernels/cpu/dot-avx512-q8.h"

/* ---- K-quant weights x Q8_K activations ----------------------------------- */

#include "kernels/cpu/dot-avx512-k4.h"

#include "kernels/cpu/dot-avx512-k6.h"

/* ---- drivers -------------------------------------------------------------- */

/* The activation rows left over after full NC_MAX tiles go as one tile
 * of 1-3 columns, not column by column: a batch's experts mostly see 1-4
 * tokens, and each extra pass over the weight rows costs a full pass of
 * unpacking. Every output's sum order is the same whatever the tile. */
#define GEMM_TAIL(kind, R)                                                               \
        switch (nc - c) {                                                                \
        case 3:                                                                          \
                tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as, y + c * ys + r, ys, \
                            R, 3);                                                       \
                break;                                                                   \
        case 2:                                                                          \
                tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as, y + c * ys + r, ys, \
                            R, 2);                                                       \
                break;                                                                   \
        case 1:                                                                          \
                tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as, y + c * ys + r, ys, \
                            R, 1);                                                       \
                break;                                                                   \
        default:                                                                         \
                break;                                                                   \
        }

/* Rows go four at a time only when there are at least NC_MAX activation
 * rows to reuse each weight load against. With fewer (decode, and the
 * experts of a batch) the kernel streams weights from memory, and four
 * interleaved row streams read at half the speed of two on the Zen 4 and
 * Xeon parts measured (tools/moed-bench, bench/results): the hardware
 * prefetchers follow two short streams, not four. */
#define GEMM_ROWS(kind, R)                                                               \
        for (; r + (R) <= nr; r += (R)) {                                                \
                for (c = 0; c + NC_MAX <= nc; c += NC_MAX)                               \
                        tile_##kind(n, ROW(w, r, ws), ws, ROW(a, c, as), as,             \
                                    y + c * ys + r, ys, R, NC_MAX);                      \
                GEMM_TAIL(kind, R)                                                       \
        }

#define GEMM_NAMED(name, kind)                                                           \
        static void name(int64_t n, const void *w, size_t ws, int64_t nr,                \
                                const void *a, size_t as, int64_t nc, float *y,          \
                                int64_t ys)                                              \
        {                                                                                \
                int64_t r = 0, c;                                                        \
                if (nc >= NC_MAX)                                                        \
                        GEMM_ROWS(kind, 4)                                               \
                GEMM_ROWS(kind, 1)                                                       \
        }

#define GEMM(kind) GEMM_NAMED(gemm_##kind, kind)

/* K-quant rows of at most two super-blocks also go in pairs
 * (k4_pairs_tile). */
#define GEMM_K(name, kind)                                                               \
        static void name(int64_t n, const void *w, size_t ws, int64_t nr,                \
                         const void *a, size_t as, int64_t nc, float *y, int64_t ys)     \
        {                                                                                \
                int64_t r = 0, c;                                                        \
                if (nc >= NC_MAX)                                                        \
                        GEMM_ROWS(kind, 4)                                               \
                if (n <= 2 * QK_K)                                                       \
                        GEMM_ROWS(kind, 2)                                               \
                GEMM_ROWS(kind, 1)                                                       \
        }

GEMM(F32)
GEMM(F16)
GEMM(BF16)
GEMM(Q4_0)
GEMM(Q5_0)
GEMM_K(gemm_tiles_Q4_K, Q4_K)
GEMM_K(gemm_tiles_Q5_K, Q5_K)
GEMM_NAMED(gemm_tiles_Q6_K, Q6_K)

/* With VNNI, batches (two activation rows or more; four for Q6_K) put the
 * weight rows in the lanes; one row, a decode's, streams through the
 * tiles, whose reads the hardware prefetches best. Both keep the same
 * order, for every K-quant. */
TILE_INLINE void gemm_kq(enum kq_kind kind, int64_t n, const void *w, size_t ws, int64_t nr, const void *a,
                         size_t as, int64_t nc, float *y, int64_t ys)
{
#ifdef __AVX512VNNI__
        if (nc >= (kind == KQ_6 ? K6_WLANES_MIN : 2) && ws <= (size_t)INT32_MAX / 16) {
                kq_wlanes(n / QK_K, w, ws, nr, a, as, nc, y, ys, kind);
                return;
        }
#endif
        if (kind == KQ_4)
                gemm_tiles_Q4_K(n, w, ws, nr, a, as, nc, y, ys);
        else if (kind == KQ_5)
                gemm_tiles_Q5_K(n, w, ws, nr, a, as, nc, y, ys);
        else
                gemm_tiles_Q6_K(n, w, ws, nr, a, as, nc, y, ys);
}

static void gemm_Q4_K(int64_t n, const void *w, size_t ws, int64_t nr, const void *a, size_t as, int64_t nc,
                      float *y, int64_t ys)
{
        gemm_kq(KQ_4, n, w, ws, nr, a, as, nc, y, ys);
}

static void gemm_Q5_K(int64_t n, const void *w, size_t ws, int64_t nr, const void *a, size_t as, int64_t nc,
                      float *y, int64_t ys)
{
        gemm_kq(KQ_5, n, w, ws, nr, a, as, nc, y, ys);
}

static void gemm_Q6_K(int64_t n, const void *w, size_t ws, int64_t nr, const void *a, size_t as, int64_t nc,
                      float *y, int64_t ys)
{
        gemm_kq(KQ_6, n, w, ws, nr, a, as, nc, y, ys);
}

#ifdef __AVX512VNNI__
void mo_cpu_kernels_avx512_vnni(struct mo_cpu_kernels *k)
#else
void mo_cpu_kernels_avx512(struct mo_cpu_kernels *k)
#endif
{
        memset(k, 0, sizeof *k);
        k->level = MO_SIMD_AVX512;
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
