/* dot-avx512-k4.h: the AVX-512 Q4_K and Q5_K x Q8_K kernels, included by
 * dot-avx512.c (and so built with and without VNNI) after
 * dot-avx512-q8.h, whose lanes_transpose it shares. Private to it.
 *
 * Each output is summed in one fixed order, whatever the batch. For each
 * super-block b, two exact integers:
 *   sumi(b) = sum over sub-blocks j of scale_j x (integer dot of j),
 *   summ(b) = sum over sub-blocks j of min_j x (sum of j's activations);
 * then four float chains, chain s taking the super-blocks with b % 4 == s
 * in ascending order:
 *   acc_s = fma(sumi(b), d_w * d_x, acc_s);
 *   acc_s = acc_s - summ(b) * (dmin_w * d_x), fused;
 * and y = (acc_0 + acc_1) + (acc_2 + acc_3). Integer sums are exact in
 * any order (|sumi| <= 256 x 31 x 128 x 63 < 2^31), so each kernel adds
 * them however suits its layout; their conversion to float rounds the
 * same way in all.
 * The tiles stream weight rows and vectorise over a super-block; they
 * serve decode (one activation row, where plain streams prefetch best),
 * and everything without VNNI. Rows of one or two super-blocks (a small
 * expert's down projection) go through them in pairs. With VNNI, two or
 * more activation rows go to the weight-lanes kernel (k4_wlanes): 16
 * weight rows of a super-block are transposed into the lanes once for up
 * to 16 activation rows, whose quants are broadcast, so one dpbusd does 16
 * outputs' work with nothing to mask or reduce; on a Zen 4 core it runs
 * 1.5x the tiles' multiply-adds per second at 2 activation rows and 2x at
 * 8 or more. */

#define K4_CHAINS 4

/* The eight scales and eight mins of a Q4_K/Q5_K super-block as bytes
 * (mo_k4_scale_words) in one vector, worked out in its lanes: a store of
 * scalar words and a wider load of them would wait on a failed
 * store-to-load forward. The block's 16 bytes from `s` on are all its own:
 * its quants follow the scales. */
TILE_INLINE __m128i k4_scales_mins(const uint8_t *s)
{
        __m128i w = _mm_loadu_si128((const __m128i *)s);
        /* Lanes [w0, w2, w1, w2]: the low six bits, or the low nibbles. */
        __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(w, _MM_SHUFFLE(2, 1, 2, 0)),
                                                  _mm_setr_epi32(0, 0, 0, 4)),
                                   _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
        /* Lanes [w0, w0, w1, w1]: bits 6-7 become bits 4-5 of lanes 1 and 3. */
        __m128i hi = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(w, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                   _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));

        return _mm_or_si128(lo, hi);
}

/* One super-block of one weight row against NC activation rows: vi[c]
 * holds 16 partial sums of sumi, vm[c] the 8 terms of summ, as int32;
 * *dm the block's d and dmin, read here, in the order of the stream: a
 * read ahead of the stream stalls the row on memory when it misses. */
TILE_INLINE void k4_superblock(const uint8_t *wb, const uint8_t *a, size_t as, int64_t b,
                               const bool five, __m512i vi[NC_MAX], __m256i vm[NC_MAX], int *dm,
                               const int NC)
{
        const block_q4_k *x4 = (const block_q4_k *)wb;
        const block_q5_k *x5 = (const block_q5_k *)wb;
        const uint8_t *qs = five ? x5->qs : x4->qs;
        const __m512i lo4 = _mm512_set1_epi8(0x0F), one8 = _mm512_set1_epi8(1);
        __m512i sumi[NC_MAX], sumi2[NC_MAX], qh = _mm512_setzero_si512(), sc16;
        __m256i mins;
        __m128i scm = k4_scales_mins(x4->scales);

        *dm = (int)mo_load_u32le(wb);

        sc16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(scm));
        mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scm, scm));
        if (five) {
                __m256i h = _mm256_loadu_si256((const __m256i *)x5->qh);

                /* Lanes 0-31 feed the low nibbles (bit 2j), lanes 32-63
                 * the high ones (bit 2j+1). */
                qh = join256(h, _mm256_srli_epi16(h, 1));
        }
        /* Two integer chains: a super-block's latency decides how many
         * rows the core can overlap. */
        for (int c = 0; c < NC; c++)
                sumi[c] = sumi2[c] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
                /* Low nibbles in the low half, high nibbles in the high half. */
                __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * j)));
                __m512i qv = _mm512_and_si512(_mm512_mask_srli_epi16(q, (__mmask32)0xFFFF0000u, q, 4), lo4);
                /* Lanes 0-15 take scale 2j, lanes 16-31 scale 2j + 1. */
                __m512i s = _mm512_permutexvar_epi16(
                        join256(_mm256_set1_epi16((short)(2 * j)), _mm256_set1_epi16((short)(2 * j + 1))),
                        sc16);

                if (five) {
                        __m512i hb = _mm512_and_si512(_mm512_srli_epi16(qh, 2 * j), one8);

                        qv = _mm512_or_si512(qv, _mm512_slli_epi16(hb, 4));
                }
                for (int c = 0; c < NC; c++) {
                        const int8_t *q8 = ((const block_q8_k *)ROW(a, c, as) + b)->qs + 64 * j;

                        __m512i p = _mm512_maddubs_epi16(qv, _mm512_loadu_si512(q8));

                        if (j % 2)
                                sumi2[c] = madd_acc(sumi2[c], p, s);
                        else
                                sumi[c] = madd_acc(sumi[c], p, s);
                }
        }
        for (int c = 0; c < NC; c++) {
                const block_q8_k *ab = (const block_q8_k *)ROW(a, c, as) + b;
                __m256i bs = _mm256_loadu_si256((const __m256i *)ab->bsums);

                vi[c] = _mm512_add_epi32(sumi[c], sumi2[c]);
                vm[c] = _mm256_madd_epi16(bs, mins);
        }
}

/* Pairs of 128-bit chunks of x and y summed: chunks x0 + x1, x2 + x3,
 * y0 + y1, y2 + y3. */
TILE_INLINE __m512i k4_fold(__m512i x, __m512i y)
{
        return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Sums of vi[0..3] and vm[0..3]: [sumi of each | summ of each]. */
TILE_INLINE __m256i k4_reduce(const __m512i vi[4], const __m256i vm[4])
{
        /* Chunks: the halves of vi[0] and of vi[1], then of vi[2], vi[3]. */
        __m512i x01 = k4_fold(vi[0], vi[1]), x23 = k4_fold(vi[2], vi[3]);
        /* Chunks: sumi[0], sumi[1], summ[0], summ[1] in four lanes each. */
        __m512i y01 = k4_fold(x01, join256(vm[0], vm[1]));
        __m512i y23 = k4_fold(x23, join256(vm[2], vm[3]));
        __m512i z = _mm512_add_epi32(_mm512_unpacklo_epi32(y01, y23), _mm512_unpackhi_epi32(y01, y23));

        /* Lane 4k of z now sums chunk k of y01, lane 4k + 1 chunk k of y23. */
        z = _mm512_add_epi32(z, _mm512_shuffle_epi32(z, _MM_SHUFFLE(1, 0, 3, 2)));
        return _mm512_castsi512_si256(_mm512_permutexvar_epi32(
                _mm512_setr_epi32(0, 4, 1, 5, 8, 12, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), z));
}

/* [d of four super-blocks | dmin of them] from their first dwords (the
 * two halves d, dmin), as k4_superblock reads them. */
TILE_INLINE __m256 k4_weight_scales(const int dm[4])
{
        __m128i h = _mm_setr_epi32(dm[0], dm[1], dm[2], dm[3]);

        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

/* The scales of super-blocks b..b+3 of one activation row, 0 past gn. */
TILE_INLINE __m128 k4_act_scales(const block_q8_k *x, int gn)
{
        return _mm_setr_ps(x[0].d, gn > 1 ? x[1].d : 0.0f, gn > 2 ? x[2].d : 0.0f, gn > 3 ? x[3].d : 0.0f);
}

/* Rows of one or two super-blocks (a small expert's down projection)
 * would leave half of each reduction and of the chains' vector empty, so
 * rows go in pairs: slot 2h + b holds row h's super-block b. Each chain
 * sees at most one super-block, and the empty chains add +0 as in the
 * general order. */
TILE_INLINE void k4_pairs_tile(int64_t nsb, const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                               float *y, int64_t ys, const bool five, const int NR, const int NC)
{
        const size_t bsz = five ? sizeof(block_q5_k) : sizeof(block_q4_k);
        const __mmask8 live = nsb == 2 ? 0xF : 0x5;
        __m128 dx[NC_MAX];

        for (int c = 0; c < NC; c++) {
                const block_q8_k *x = (const block_q8_k *)ROW(a, c, as);
                float d1 = nsb == 2 ? x[1].d : 0.0f;

                dx[c] = _mm_setr_ps(x[0].d, d1, x[0].d, d1);
        }
        for (int r = 0; r < NR; r += 2) {
                __m512i vi[NC_MAX][4], ti[NC_MAX];
                __m256i vm[NC_MAX][4], tm[NC_MAX];
                const uint8_t *w0 = ROW(w, r, ws), *w1 = ROW(w, r + 1, ws);
                int dm[4] = { 0, 0, 0, 0 };
                __m256 dw;

#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                        if (i % 2 < nsb)
                                k4_superblock((i < 2 ? w0 : w1) + (i % 2) * bsz, a, as, i % 2, five, ti, tm,
                                              &dm[i], NC);
                        for (int c = 0; c < NC; c++) {
                                vi[c][i] = i % 2 < nsb ? ti[c] : _mm512_setzero_si512();
                                vm[c][i] = i % 2 < nsb ? tm[c] : _mm256_setzero_si256();
                        }
                }
                dw = k4_weight_scales(dm);
                for (int c = 0; c < NC; c++) {
                        __m256 f = _mm256_cvtepi32_ps(k4_reduce(vi[c], vm[c]));
                        __m128 dd = _mm_mul_ps(_mm256_castps256_ps128(dw), dx[c]);
                        __m128 dn = _mm_mul_ps(_mm256_extractf128_ps(dw, 1), dx[c]);
                        __m128 acc = _mm_maskz_fmadd_ps(live, _mm256_castps256_ps128(f), dd, _mm_setzero_ps());
                        __m128 sum;

                        acc = _mm_mask3_fnmadd_ps(_mm256_extractf128_ps(f, 1), dn, acc, live);
                        /* Lane 0: chains 0 + 1 of row r; lane 2: of row r + 1. */
                        sum = _mm_add_ps(acc, _mm_movehdup_ps(acc));
                        y[c * ys + r] = _mm_cvtss_f32(sum) + 0.0f;
                        y[c * ys + r + 1] = _mm_cvtss_f32(_mm_movehl_ps(sum, sum)) + 0.0f;
                }
        }
}

TILE_INLINE void q45k_tile(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                           float *y, int64_t ys, const bool five, const int NR, const int NC)
{
        const size_t bsz = five ? sizeof(block_q5_k) : sizeof(block_q4_k);
        const int64_t nsb = n / QK_K;
        __m128 acc[4][NC_MAX];

        if (NR % 2 == 0 && nsb <= 2 && nsb > 0) {
                k4_pairs_tile(nsb, w, ws, a, as, y, ys, five, NR, NC);
                return;
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        acc[r][c] = _mm_setzero_ps();
        for (int64_t b0 = 0; b0 < nsb; b0 += K4_CHAINS) {
                const int gn = (int)MO_MIN(nsb - b0, K4_CHAINS);
                /* Chains without a super-block here stay as they are. */
                const __mmask8 live = (__mmask8)((1u << gn) - 1);
                __m128 dx[NC_MAX];

                for (int c = 0; c < NC; c++)
                        dx[c] = k4_act_scales((const block_q8_k *)ROW(a, c, as) + b0, gn);
                for (int r = 0; r < NR; r++) {
                        const uint8_t *wr = ROW(w, r, ws) + b0 * bsz;
                        int dm[4] = { 0, 0, 0, 0 };
                        __m256 dw;
                        __m512i vi[NC_MAX][4], ti[NC_MAX];
                        __m256i vm[NC_MAX][4], tm[NC_MAX];

#pragma GCC unroll 4
                        for (int i = 0; i < 4; i++) {
                                if (i < gn)
                                        k4_superblock(wr + i * bsz, a, as, b0 + i, five, ti, tm, &dm[i], NC);
                                for (int c = 0; c < NC; c++) {
                                        vi[c][i] = i < gn ? ti[c] : _mm512_setzero_si512();
                                        vm[c][i] = i < gn ? tm[c] : _mm256_setzero_si256();
                                }
                        }
                        dw = k4_weight_scales(dm);
                        for (int c = 0; c < NC; c++) {
                                __m256 f = _mm256_cvtepi32_ps(k4_reduce(vi[c], vm[c]));
                                __m128 dd = _mm_mul_ps(_mm256_castps256_ps128(dw), dx[c]);
                                __m128 dn = _mm_mul_ps(_mm256_extractf128_ps(dw, 1), dx[c]);

                                acc[r][c] = _mm_mask3_fmadd_ps(_mm256_castps256_ps128(f), dd, acc[r][c], live);
                                acc[r][c] = _mm_mask3_fnmadd_ps(_mm256_extractf128_ps(f, 1), dn, acc[r][c], live);
                        }
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = q8_chains_sum(acc[r][c]);
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

#ifdef __AVX512VNNI__
/* Weight rows in the lanes: 16 weight rows of a super-block are
 * transposed into vectors (nibbles split, the fifth bit joined for Q5_K)
 * once for up to K4_WLANES_COLS activation rows, whose quants are
 * broadcast from memory as dpbusd's signed operand: one dpbusd per four
 * values of 16 outputs, with nothing to mask or reduce. The quants stay in
 * registers, a quarter of the super-block at a time; only the scales are
 * kept (struct k4_wlanes_scales): sc[j] lane r is the scale of sub-block j
 * of row r, mn[k] lane r its mins 2k and 2k + 1 as two int16, d and dmin
 * lane r its super-block scales. */
#define K4_WLANES_COLS 16

struct k4_wlanes_scales {
        __m512i sc[QK_K / 32];
        __m512i mn[QK_K / 64];
        __m512 d, dmin;
};

/* 16 bytes of each of 16 rows in the lanes: out[t] lane r is bytes
 * 4t..4t+3 of row[r]. z[i] holds rows i, i + 4, i + 8, i + 12 in its
 * 128-bit chunks, so two rounds of unpacks within the chunks finish it. */
TILE_INLINE void lanes_transpose16(const void *const row[16], __m512i out[4])
{
        __m512i z[4], t[4];

        for (int i = 0; i < 4; i++) {
                __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(row[i]));

                v = _mm512_inserti32x4(v, _mm_loadu_si128(row[i + 4]), 1);
                v = _mm512_inserti32x4(v, _mm_loadu_si128(row[i + 8]), 2);
                z[i] = _mm512_inserti32x4(v, _mm_loadu_si128(row[i + 12]), 3);
        }
        t[0] = _mm512_unpacklo_epi32(z[0], z[1]);
        t[1] = _mm512_unpackhi_epi32(z[0], z[1]);
        t[2] = _mm512_unpacklo_epi32(z[2], z[3]);
        t[3] = _mm512_unpackhi_epi32(z[2], z[3]);
        out[0] = _mm512_unpacklo_epi64(t[0], t[2]);
        out[1] = _mm512_unpackhi_epi64(t[0], t[2]);
        out[2] = _mm512_unpacklo_epi64(t[1], t[3]);
        out[3] = _mm512_unpackhi_epi64(t[1], t[3]);
}

/* The scales of super-block b of rows [0, rn) at w, ws apart (lanes from
 * rn on read zeros); qh[] gets Q5_K's high bits, qh[t] lane r bytes
 * 4t..4t+3 of the row's qh. */
TILE_INLINE void k4_wlanes_scales(struct k4_wlanes_scales *out, __m512i qh[8], const uint8_t *w, size_t ws,
                                  int rn, int64_t b, const bool five)
{
        static const uint8_t zero[32];
        const size_t bsz = five ? sizeof(block_q5_k) : sizeof(block_q4_k);
        const __m512i m6 = _mm512_set1_epi32(0x3f3f3f3f), m4 = _mm512_set1_epi32(0x0f0f0f0f);
        const __m512i m2 = _mm512_set1_epi32(0x03030303), b0 = _mm512_set1_epi32(0xFF);
        const __m512i b1 = _mm512_set1_epi32(0xFF0000);
        __m512i hd[4], v[4];
        const void *row[16];

        /* [d | dmin] and the 12 scale bytes are the block's first 16. */
        for (int r = 0; r < 16; r++)
                row[r] = r < rn ? (const void *)(w + (size_t)r * ws + (size_t)b * bsz) : (const void *)zero;
        lanes_transpose16(row, hd);
        out->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hd[0]));
        out->dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hd[0], 16)));
        /* mo_k4_scale_words on the lanes */
        v[0] = _mm512_and_si512(hd[1], m6);
        v[1] = _mm512_or_si512(_mm512_and_si512(hd[3], m4),
                               _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hd[1], 6), m2), 4));
        v[2] = _mm512_and_si512(hd[2], m6);
        v[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(hd[3], 4), m4),
                               _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hd[2], 6), m2), 4));
        for (int j = 0; j < QK_K / 32; j++)
                out->sc[j] = _mm512_and_si512(_mm512_srli_epi32(v[j / 4], 8 * (j % 4)), b0);
        for (int k = 0; k < QK_K / 64; k++) {
                __m512i m = _mm512_srli_epi32(v[2 + k / 2], 16 * (k % 2));

                out->mn[k] = _mm512_or_si512(_mm512_and_si512(m, b0),
                                             _mm512_and_si512(_mm512_slli_epi32(m, 8), b1));
        }
        if (five) {
                for (int r = 0; r < 16; r++)
                        row[r] = r < rn ? (const void *)((const block_q5_k *)(w + (size_t)r * ws) + b)->qh :
                                          (const void *)zero;
                lanes_transpose(row, qh);
        }
}

/* Sub-block sums of an activation super-block as int16 pairs: dword k is
 * [sum of sub-block 2k | sum of 2k + 1] (|sum| <= 32 x 127). */
TILE_INLINE __m128i k4_bsum_pairs(const block_q8_k *x)
{
        __m256i s = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)x->bsums), _mm256_set1_epi16(1));

        return _mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* Super-block b of 16 weight rows against NC activation rows (x[c] their
 * super-block b), into the chain vectors acc[c]. */
TILE_INLINE void k4_wlanes_step(const uint8_t *w, size_t ws, int rn, int64_t b, const block_q8_k *const *x,
                                __m512 *const *acc, const bool five, const int NC)
{
        static const uint8_t zero[32];
        const size_t bsz = five ? sizeof(block_q5_k) : sizeof(block_q4_k);
        const size_t qs_off = five ? offsetof(block_q5_k, qs) : offsetof(block_q4_k, qs);
        const __m512i lo4 = _mm512_set1_epi8(0x0F), one8 = _mm512_set1_epi8(1);
        /* Two dpbusd chains per sub-block from 4 columns on: one chain of
         * 8 is latency-bound (4 columns 92 -> 107 GMAC/s on one Zen 4 core);
         * below 4 columns the second chain was slower. */
        const int nch = NC >= 4 ? 2 : 1;
        struct k4_wlanes_scales sc;
        __m512i sumi[K4_WLANES_COLS], qh[8];
        const void *row[16];

        k4_wlanes_scales(&sc, qh, w, ws, rn, b, five);
        for (int c = 0; c < NC; c++)
                sumi[c] = _mm512_setzero_si512();
        /* Quarter p: qs bytes 32p..32p+31, sub-blocks 2p (low nibbles) and 2p + 1. */
        for (int p = 0; p < 4; p++) {
                __m512i q[8], lo[8], hi[8];

                for (int r = 0; r < 16; r++)
                        row[r] = r < rn ? (const void *)(w + (size_t)r * ws + (size_t)b * bsz + qs_off + 32 * p) :
                                          (const void *)zero;
                lanes_transpose(row, q);
                for (int t = 0; t < 8; t++) {
                        lo[t] = _mm512_and_si512(q[t], lo4);
                        hi[t] = _mm512_and_si512(_mm512_srli_epi16(q[t], 4), lo4);
                        /* The fifth bit of low nibbles is bit 2p of qh, of high ones bit 2p + 1. */
                        if (five) {
                                lo[t] = _mm512_or_si512(lo[t], _mm512_slli_epi16(
                                        _mm512_and_si512(_mm512_srli_epi16(qh[t], 2 * p), one8), 4));
                                hi[t] = _mm512_or_si512(hi[t], _mm512_slli_epi16(
                                        _mm512_and_si512(_mm512_srli_epi16(qh[t], 2 * p + 1), one8), 4));
                        }
                }
                for (int c = 0; c < NC; c++) {
                        const uint8_t *xq = (const uint8_t *)x[c]->qs + 64 * p;
                        __m512i sl[2] = { _mm512_setzero_si512(), _mm512_setzero_si512() };
                        __m512i sh[2] = { _mm512_setzero_si512(), _mm512_setzero_si512() };

                        for (int t = 0; t < 8; t++) {
                                sl[t % nch] = _mm512_dpbusd_epi32(sl[t % nch], lo[t],
                                                                  _mm512_set1_epi32((int)mo_load_u32le(xq + 4 * t)));
                                sh[t % nch] = _mm512_dpbusd_epi32(sh[t % nch], hi[t],
                                                                  _mm512_set1_epi32((int)mo_load_u32le(xq + 32 + 4 * t)));
                        }
                        sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(_mm512_add_epi32(sl[0], sl[1]),
                                                                               sc.sc[2 * p]));
                        sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(_mm512_add_epi32(sh[0], sh[1]),
                                                                               sc.sc[2 * p + 1]));
                }
        }
        for (int c = 0; c < NC; c++) {
                __m512i pr = _mm512_castsi128_si512(k4_bsum_pairs(x[c])), summ = _mm512_setzero_si512();
                __m512 dx = _mm512_set1_ps(x[c]->d);

                for (int k = 0; k < QK_K / 64; k++)
                        summ = _mm512_dpwssd_epi32(summ, sc.mn[k], _mm512_permutexvar_epi32(_mm512_set1_epi32(k), pr));
                *acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[c]), _mm512_mul_ps(sc.d, dx), *acc[c]);
                *acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(sc.dmin, dx), *acc[c]);
        }
}
#endif
