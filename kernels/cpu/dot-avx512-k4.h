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
 * serve decode, a batch's experts, and Q5_K. Rows of one or two
 * super-blocks (a small expert's down projection) go through them in
 * pairs. The lanes kernel (VNNI, Q4_K only) puts 16 activation rows in
 * the lanes of a vector and broadcasts each weight dword, so one dpbusd
 * does 16 rows' work and the scales are applied once per 16 outputs; it
 * serves batches and prefill, at 1.7-1.9x the multiply-adds per second of
 * the 4 x 4 tiles on a Zen 4 core. */

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
#define K4_LANES 16
/* Fewer activation rows than this go through the tiles. */
#define K4_LANES_MIN 9
/* The pack covers this many super-blocks (about 18 KiB of stack) and the
 * kept chains this many weight rows (16 KiB). */
#define K4_PACK_SB K4_CHAINS
#define K4_PACK_ROWS 64

/* One super-block of up to 16 activation rows with the rows in the lanes:
 * q[t] lane c is activations 4t..4t+3 of row c, bs[k] lane c the sums of
 * row c's sub-blocks 2k and 2k + 1 as two int16 (|sum| <= 32 x 127), so
 * one dpwssd takes two mins; d lane c the row's scale.
 * Lanes past the last row hold zeros. */
struct k4_lanes_block {
        __m512i q[QK_K / 4];
        __m512i bs[QK_K / 64];
        __m512 d;
};

static void k4_pack_block(struct k4_lanes_block *out, const uint8_t *a, size_t as, int nt,
                          int64_t b, __m512i gidx, __mmask16 live)
{
        static const int8_t zero[32];
        const __m512i one16 = _mm512_set1_epi16(1);
        __m512i bs[QK_K / 32];
        const void *row[16];

        for (int part = 0; part < QK_K / 32; part++) {
                for (int c = 0; c < 16; c++)
                        row[c] = c < nt ? ((const block_q8_k *)(a + (size_t)c * as) + b)->qs + 32 * part :
                                          (const void *)zero;
                lanes_transpose(row, out->q + 8 * part);
        }
        for (int c = 0; c < 16; c++)
                row[c] = c < nt ? (const void *)((const block_q8_k *)(a + (size_t)c * as) + b)->bsums :
                                  (const void *)zero;
        lanes_transpose(row, bs);
        for (int k = 0; k < QK_K / 64; k++) {
                __m512i s0 = _mm512_madd_epi16(bs[2 * k], one16), s1 = _mm512_madd_epi16(bs[2 * k + 1], one16);

                out->bs[k] = _mm512_mask_blend_epi16(0xAAAAAAAAu, s0, _mm512_slli_epi32(s1, 16));
        }
        out->d = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, gidx,
                                          a + (size_t)b * sizeof(block_q8_k) + offsetof(block_q8_k, d), 1);
}

/* One super-block of `rows` (1 or 2) weight rows at w, ws apart, against
 * every lane, into chain acc0 (and acc1). Each weight dword is broadcast
 * once: its low nibbles meet sub-block 2j, its high nibbles (16 x the
 * value, shifted back down after the sums, exactly) sub-block 2j + 1. */
TILE_INLINE void k4_lanes_step(const block_q4_k *w, size_t ws, const struct k4_lanes_block *x,
                               __m512 *acc0, __m512 *acc1, const int rows)
{
        const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0);
        const block_q4_k *wb[2] = { w, (const block_q4_k *)((const uint8_t *)w + ws) };
        __m512 *acc[2] = { acc0, acc1 };
        __m512i sumi[2], summ[2];
        uint32_t sc[2][8], mn[2][4];

        for (int r = 0; r < rows; r++) {
                uint32_t v[4];

                mo_k4_scale_words(wb[r]->scales, v);
                for (int j = 0; j < 8; j++)
                        sc[r][j] = v[j / 4] >> (8 * (j % 4)) & 0xFF;
                /* mins 2k and 2k + 1 as the two words of a dword */
                for (int k = 0; k < 4; k++) {
                        uint32_t m = v[2 + k / 2] >> (16 * (k % 2));

                        mn[r][k] = (m & 0xFF) | (m & 0xFF00) << 8;
                }
                sumi[r] = _mm512_setzero_si512();
                summ[r] = _mm512_setzero_si512();
        }
        for (int j = 0; j < 4; j++) {
                __m512i lo[2][2], hi[2][2];

                for (int r = 0; r < rows; r++)
                        lo[r][0] = lo[r][1] = hi[r][0] = hi[r][1] = _mm512_setzero_si512();
                for (int t = 0; t < 8; t++) {
                        __m512i xl = _mm512_load_si512(&x->q[16 * j + t]);
                        __m512i xh = _mm512_load_si512(&x->q[16 * j + 8 + t]);

                        for (int r = 0; r < rows; r++) {
                                __m512i q = _mm512_set1_epi32((int)mo_load_u32le(wb[r]->qs + 32 * j + 4 * t));

                                lo[r][t & 1] = _mm512_dpbusd_epi32(lo[r][t & 1], _mm512_and_si512(q, lo4), xl);
                                hi[r][t & 1] = _mm512_dpbusd_epi32(hi[r][t & 1], _mm512_and_si512(q, hi4), xh);
                        }
                }
                for (int r = 0; r < rows; r++) {
                        __m512i il = _mm512_add_epi32(lo[r][0], lo[r][1]);
                        __m512i ih = _mm512_srai_epi32(_mm512_add_epi32(hi[r][0], hi[r][1]), 4);

                        sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(il, _mm512_set1_epi32((int)sc[r][2 * j])));
                        sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(ih, _mm512_set1_epi32((int)sc[r][2 * j + 1])));
                }
        }
        for (int r = 0; r < rows; r++) {
                for (int k = 0; k < QK_K / 64; k++)
                        summ[r] = _mm512_dpwssd_epi32(summ[r], _mm512_load_si512(&x->bs[k]),
                                                      _mm512_set1_epi32((int)mn[r][k]));
                *acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]),
                                          _mm512_mul_ps(_mm512_set1_ps(half_to_f32(wb[r]->d)), x->d), *acc[r]);
                *acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ[r]),
                                           _mm512_mul_ps(_mm512_set1_ps(half_to_f32(wb[r]->dmin)), x->d), *acc[r]);
        }
}

/* nr weight rows against nt <= K4_LANES activation rows, over nsb
 * super-blocks: the pack is refilled every K4_PACK_SB super-blocks and
 * every K4_PACK_ROWS rows, the chains kept across packs. */
static void k4_lanes(int64_t nsb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a,
                     size_t as, int nt, float *y, int64_t ys)
{
        struct k4_lanes_block pk[K4_PACK_SB];
        __m512 keep[K4_PACK_ROWS][K4_CHAINS];
        const __m512i gidx = lanes_offsets(as);
        const __mmask16 live = (__mmask16)((1u << nt) - 1);

        for (int64_t r0 = 0; r0 < nr; r0 += K4_PACK_ROWS) {
                int64_t rn = MO_MIN(nr - r0, K4_PACK_ROWS);

                for (int64_t b0 = 0; b0 < nsb; b0 += K4_PACK_SB) {
                        int64_t bn = MO_MIN(nsb - b0, K4_PACK_SB);

                        for (int64_t b = 0; b < bn; b++)
                                k4_pack_block(&pk[b], a, as, nt, b0 + b, gidx, live);
                        for (int64_t r = 0; r < rn; r += 2) {
                                const block_q4_k *wr = (const block_q4_k *)(w + (size_t)(r0 + r) * ws) + b0;
                                const int rows = rn - r >= 2 ? 2 : 1;
                                __m512 acc[2][K4_CHAINS];

                                lanes_chains_begin(acc, keep, r, rows, b0 == 0);
                                /* The pack starts on a multiple of 4, so super-block b is chain b. */
                                for (int64_t b = 0; b < bn; b++) {
                                        if (rows == 2)
                                                k4_lanes_step(wr + b, ws, &pk[b], &acc[0][b], &acc[1][b], 2);
                                        else
                                                k4_lanes_step(wr + b, ws, &pk[b], &acc[0][b], &acc[1][b], 1);
                                }
                                lanes_chains_end(acc, keep, r, rows, b0 + bn == nsb, y + r0, ys, nt);
                        }
                }
        }
}
#endif
