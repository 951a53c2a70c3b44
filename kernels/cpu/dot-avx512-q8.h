/* dot-avx512-q8.h: the AVX-512 Q8_0 x Q8_0 kernels, included by
 * dot-avx512.c (and so built with and without VNNI). Private to it.
 *
 * Each output is summed in one fixed order, whatever the batch:
 *   idot(b)  = the exact integer dot of block b (32 products);
 *   chain s  = for each group of 16 blocks in turn, blocks 4s..4s+3 of the
 *              group in ascending order: acc_s = fma(idot, d_w * d_x, acc_s);
 *   y        = (acc_0 + acc_1) + (acc_2 + acc_3).
 * Two kernels compute it. The row kernel streams one weight row at a time
 * and vectorises over the 16 blocks of a group; it serves decode and any
 * handful of activation rows. The weight-lanes kernel puts 16 weight rows
 * in the lanes of a vector, transposed once for every activation row, and
 * broadcasts the activations, so that a block's dot lands in one lane
 * with nothing to reduce; it takes rows shorter than a group (the
 * attention's per-head products) at every batch size and, with VNNI,
 * full rows from Q8_WL_MIN activation rows on (decode batches, prefill).
 * All give the same bits, so a sequence's logits do not depend on what it
 * is batched with. */

#define Q8_GROUP 16
/* Fewer activation rows than this go through the row kernel, more
 * (with VNNI) through the weight lanes, which replaced a kernel that put
 * 16 activation rows in the lanes and broadcast the weights. Two threads
 * streaming from memory, that kernel against the weight lanes, GMAC/s:
 * 129280 x 1024 (the output head) at 8 rows 91-92 against 112-120, at 16
 * rows 144-155 against 183-193; 8192 x 1024 at 24 rows 106-118 against
 * 194-209, at 128 rows 145-148 against 250-263. Below 8 rows the row
 * kernel's one stream a row suits the memory better: 512 x 1024 experts
 * at 3 rows 73-77 against 43-47. */
#define Q8_WL_MIN 8

/* The row kernel's reduction leaves block q + 4s of a group in lane 4q + s. */
static const int32_t q8_lane_block[16] = { 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15 };

TILE_INLINE __m512i q8_qs_pair(const block_q8_0 *b, int64_t left)
{
        __m256i lo = left > 0 ? _mm256_loadu_si256((const __m256i *)b[0].qs) : _mm256_setzero_si256();
        __m256i hi = left > 1 ? _mm256_loadu_si256((const __m256i *)b[1].qs) : _mm256_setzero_si256();

        return join256(lo, hi);
}

/* The 16 block scales of a group as floats, in the reduction's lane
 * order; lanes past the row's end are 0 and read nothing. Scalar loads:
 * a gather costs twice the rest of the row kernel on Zen 4. */
TILE_INLINE __m512 q8_group_scales(const block_q8_0 *g, int64_t left)
{
        uint16_t h[16];

        for (int j = 0; j < 16; j++)
                h[j] = q8_lane_block[j] < left ? g[q8_lane_block[j]].d : 0;
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
}

/* Sums the eight partial lanes of each block: p[i] holds blocks 2i and
 * 2i+1 of the group in its low and high halves. */
TILE_INLINE __m512i q8_reduce(const __m512i p[8])
{
        __m512i a[4], b[2];

        for (int i = 0; i < 4; i++)
                a[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        for (int i = 0; i < 2; i++)
                b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]),
                                        _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
        return _mm512_add_epi32(_mm512_unpacklo_epi64(b[0], b[1]), _mm512_unpackhi_epi64(b[0], b[1]));
}

/* Products of four signed bytes, as the sign-moved unsigned x signed
 * form that neither dpbusd nor maddubs can overflow (|w| <= 128, |x| <= 127). */
TILE_INLINE __m512i q8_dot4(__m512i acc, __m512i wabs, __mmask64 wneg, __m512i x)
{
        __m512i sx = _mm512_mask_sub_epi8(x, wneg, _mm512_setzero_si512(), x);
#ifdef __AVX512VNNI__
        return _mm512_dpbusd_epi32(acc, wabs, sx);
#else
        return _mm512_add_epi32(acc, dot_u8s8(wabs, sx));
#endif
}

/* The chains' last step, in the fixed order. */
TILE_INLINE float q8_chains_sum(__m128 acc)
{
        /* Lane 0 of s is a0 + a1, lane 2 a2 + a3. */
        __m128 s = _mm_add_ps(acc, _mm_movehdup_ps(acc));

        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(s, s)));
}

/* Puts 32 bytes of each of 16 rows into the lanes: out[t] lane c is bytes
 * 4t..4t+3 of row[c]. Loading rows c and c + 4 into the halves of z[c]
 * (and 8 + c, 12 + c into z[4 + c]) makes three rounds of unpacks and one
 * of 128-bit shuffles leave row order. Shared by the short-row and lanes
 * kernels, and by dot-avx512-k4.h. */
TILE_INLINE void lanes_transpose(const void *const row[16], __m512i out[8])
{
        __m512i z[8], t[8], u[8];

        for (int i = 0; i < 8; i++) {
                int c0 = i < 4 ? i : i + 4;

                z[i] = join256(_mm256_loadu_si256(row[c0]), _mm256_loadu_si256(row[c0 + 4]));
        }
        for (int i = 0; i < 8; i += 2) {
                t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
        }
        for (int h = 0; h < 8; h += 4) {
                u[h + 0] = _mm512_unpacklo_epi64(t[h + 0], t[h + 2]);
                u[h + 1] = _mm512_unpackhi_epi64(t[h + 0], t[h + 2]);
                u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
                u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
        for (int d = 0; d < 4; d++) {
                out[d] = _mm512_shuffle_i32x4(u[d], u[d + 4], _MM_SHUFFLE(2, 0, 2, 0));
                out[d + 4] = _mm512_shuffle_i32x4(u[d], u[d + 4], _MM_SHUFFLE(3, 1, 3, 1));
        }
}

/* Lane i: i x stride, the byte offsets of 16 rows for a gather; callers
 * keep 16 x stride within 32 bits. */
TILE_INLINE __m512i lanes_offsets(size_t stride)
{
        return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                  _mm512_set1_epi32((int)stride));
}

/* The chains (lanes l) of quarter q whose block q + 4l is one of the
 * group's `left` blocks. */
TILE_INLINE __mmask8 q8_quarter_live(int64_t left, int q)
{
        return (__mmask8)((1u << (left > q ? (left - q + 3) / 4 : 0)) - 1);
}

/* 128 x the sum of an activation block: what the offset form (weights
 * in as w + 128) adds to its dot. */
TILE_INLINE int32_t q8_block_offset(const block_q8_0 *x)
{
        /* Sums of eight (x + 128) as unsigned bytes. */
        __m256i s = _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x->qs),
                                                     _mm256_set1_epi8((char)0x80)),
                                    _mm256_setzero_si256());
        __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));

        return 128 * ((int32_t)(_mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1)) - QK8_0 * 128);
}

/* The offsets of a group's blocks in the reduction's lane order; lanes
 * past the row's end are 0. */
TILE_INLINE __m512i q8_group_offsets(const block_q8_0 *g, int64_t left)
{
        int32_t o[16];

        for (int j = 0; j < 16; j++)
                o[j] = q8_lane_block[j] < left ? q8_block_offset(g + q8_lane_block[j]) : 0;
        return _mm512_loadu_si512(o);
}

#ifdef __AVX512VNNI__
/* With VNNI the short rows, and in the row kernel a full group whose
 * activations were laid out in advance, take the offset form: the weights
 * in as w + 128, dpbusd's unsigned side, the activations as they are, and
 * each block's offset taken off after the dot, in place of a sign moved
 * onto the activations every step. */
#define Q8_OFFSET_FORM 1
#else
#define Q8_OFFSET_FORM 0
#endif

/* One group of 16 blocks (fewer at the row's end) of one weight row
 * against cn activation rows, each into its own four chains. */
TILE_INLINE void q8_row_group(const block_q8_0 *w, const uint8_t *a, size_t as, int64_t cn,
                              const __m512 *xs, const int8_t *xq, const __m512i *xo, int64_t ng, int64_t g,
                              int64_t left, __m128 *acc, const bool full)
{
        const bool offset = Q8_OFFSET_FORM && full && xq;
        __m512i wv[8]; /* |w|, or w + 128 in the offset form */
        __mmask64 wneg[8];
        __m512 dw = q8_group_scales(w + g, full ? 16 : left);

        for (int i = 0; i < 8; i++) {
                __m512i q = q8_qs_pair(w + g + 2 * i, full ? 2 : left - 2 * i);

                if (offset) {
                        wv[i] = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
                        continue;
                }
                wv[i] = _mm512_abs_epi8(q);
                wneg[i] = _mm512_movepi8_mask(q);
        }
        for (int64_t c = 0; c < cn; c++) {
                const block_q8_0 *x = (const block_q8_0 *)(a + (size_t)c * as) + g;
                __m512i p[8], red;
                __m512 f, s;

                for (int i = 0; i < 8; i++) {
#ifdef __AVX512VNNI__
                        if (offset) {
                                p[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[i], _mm512_loadu_si512(
                                        xq + (c * ng * Q8_GROUP + g + 2 * i) * QK8_0));
                                continue;
                        }
#endif
                        p[i] = q8_dot4(_mm512_setzero_si512(), wv[i], wneg[i],
                                       full && xq ? _mm512_loadu_si512(xq + (c * ng * Q8_GROUP + g + 2 * i) * QK8_0) :
                                                    q8_qs_pair(x + 2 * i, full ? 2 : left - 2 * i));
                }
                red = q8_reduce(p);
                if (offset)
                        red = _mm512_sub_epi32(red, xo[c * ng + g / Q8_GROUP]);
                f = _mm512_cvtepi32_ps(red);
                s = _mm512_mul_ps(dw, xs ? xs[c * ng + g / Q8_GROUP] : q8_group_scales(x, full ? 16 : left));
                if (full) {
                        acc[c] = _mm_fmadd_ps(_mm512_castps512_ps128(f), _mm512_castps512_ps128(s), acc[c]);
                        acc[c] = _mm_fmadd_ps(_mm512_extractf32x4_ps(f, 1), _mm512_extractf32x4_ps(s, 1), acc[c]);
                        acc[c] = _mm_fmadd_ps(_mm512_extractf32x4_ps(f, 2), _mm512_extractf32x4_ps(s, 2), acc[c]);
                        acc[c] = _mm_fmadd_ps(_mm512_extractf32x4_ps(f, 3), _mm512_extractf32x4_ps(s, 3), acc[c]);
                } else {
                        /* Lane l of quarter q is block q + 4l; absent blocks leave their chain alone. */
                        acc[c] = _mm_mask3_fmadd_ps(_mm512_castps512_ps128(f), _mm512_castps512_ps128(s), acc[c],
                                                    q8_quarter_live(left, 0));
                        acc[c] = _mm_mask3_fmadd_ps(_mm512_extractf32x4_ps(f, 1), _mm512_extractf32x4_ps(s, 1), acc[c],
                                                    q8_quarter_live(left, 1));
                        acc[c] = _mm_mask3_fmadd_ps(_mm512_extractf32x4_ps(f, 2), _mm512_extractf32x4_ps(s, 2), acc[c],
                                                    q8_quarter_live(left, 2));
                        acc[c] = _mm_mask3_fmadd_ps(_mm512_extractf32x4_ps(f, 3), _mm512_extractf32x4_ps(s, 3), acc[c],
                                                    q8_quarter_live(left, 3));
                }
        }
}

/* One weight row against cn activation rows (at most Q8_WL_MIN - 1);
 * xs holds each activation row's group scales (q8_group_scales) one after
 * another, ng groups each, or is NULL to take them as it goes; xq, when not
 * NULL, their quants without the scales between blocks, ng groups each,
 * and xo their offsets (q8_group_offsets), as xs. */
static void q8_row(int64_t nb, const block_q8_0 *w, const uint8_t *a, size_t as, int64_t cn,
                   const __m512 *xs, const int8_t *xq, const __m512i *xo, int64_t ng, float *y, int64_t ys)
{
        __m128 acc[Q8_WL_MIN - 1];
        int64_t g = 0;

        for (int64_t c = 0; c < cn; c++)
                acc[c] = _mm_setzero_ps();
        for (; g + Q8_GROUP <= nb; g += Q8_GROUP)
                q8_row_group(w, a, as, cn, xs, xq, xo, ng, g, Q8_GROUP, acc, true);
        if (g < nb)
                q8_row_group(w, a, as, cn, xs, xq, xo, ng, g, nb - g, acc, false);
        for (int64_t c = 0; c < cn; c++)
                y[c * ys] = q8_chains_sum(acc[c]);
}

/* Rows shorter than a group (nb < 16), as in the attention's per-head
 * products, are too short to pay for the row kernel's reduction once per
 * row. The weight-lanes kernel puts 16 weight rows in the lanes instead
 * (transposed once, shared by every activation row) and broadcasts the
 * activations, so that a block's dot lands in one lane with nothing to
 * reduce. Such rows lie next to each other, so 16 of them are one stream.
 * Block b goes to chain (b % 16) / 4 in ascending order, as in the row
 * kernel.
 * It serves every batch size for such rows, so a column's bits never
 * depend on how many came with it. Full rows it takes a group of 16
 * blocks at a time, each column's chains kept between groups, when there
 * are enough activation rows to share each packed group (Q8_WL_MIN).
 * With VNNI the weights go in as w + 128, the unsigned side of dpbusd, so
 * that the signed activations are broadcast straight from memory, and
 * 128 x the sum of each activation block comes off every dot; without
 * VNNI the sign of w moves onto the activations instead (q8_dot4), two
 * more steps a dot. wq_b of the bench shape (1536 x 384) at 16 columns,
 * two threads streaming: 58-63 us with the sign moved, 43 us with the
 * offset. */
/* Offsets kept per call: at most this many (column, block) pairs. */
#define Q8_WL_OFFSETS 4096

/* Activation rows per call of q8_wl_chunk when rows span groups: the
 * chains of each are kept between groups. */
#define Q8_WL_COLS 64

/* One group of 16 rows' blocks, packed. */
struct q8_wl_rows {
#ifdef __AVX512VNNI__
        __m512i wu[Q8_GROUP][8];   /* w + 128 of block b, dword t in lane r */
#else
        __m512i wabs[Q8_GROUP][8]; /* |w| of block b, dword t in lane r */
        __mmask64 wneg[Q8_GROUP][8];
#endif
        __m512 d[Q8_GROUP];        /* lane r: row r's block scale */
};

/* Blocks [b0, b0 + bn) of rows [0, rn) at w, ws apart, bn <= Q8_GROUP. */
static void q8_wl_pack(struct q8_wl_rows *out, int64_t b0, int64_t bn, const uint8_t *w, size_t ws, int rn)
{
        static const int8_t zero[32];
        const __m512i gidx = lanes_offsets(ws);
        const __mmask16 live = (__mmask16)((1u << rn) - 1);
        const void *row[16];

        w += (size_t)b0 * sizeof(block_q8_0);
        for (int64_t b = 0; b < bn; b++) {
                __m512i q[8];

                for (int r = 0; r < 16; r++)
                        row[r] = r < rn ? ((const block_q8_0 *)(w + (size_t)r * ws) + b)->qs : (const void *)zero;
                lanes_transpose(row, q);
                for (int t = 0; t < 8; t++) {
#ifdef __AVX512VNNI__
                        out->wu[b][t] = _mm512_xor_si512(q[t], _mm512_set1_epi8((char)0x80));
#else
                        out->wabs[b][t] = _mm512_abs_epi8(q[t]);
                        out->wneg[b][t] = _mm512_movepi8_mask(q[t]);
#endif
                }
                out->d[b] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(
                        _mm512_setzero_si512(), live, gidx, w + (size_t)b * sizeof(block_q8_0), 1)));
        }
}

/* off[c * nb + b] = 128 x the sum of block b of activation row c. */
static void q8_wl_offsets(const uint8_t *a, size_t as, int64_t nc, int64_t nb, int32_t *off)
{
        for (int64_t c = 0; c < nc; c++)
                for (int64_t b = 0; b < nb; b++)
                        off[c * nb + b] = q8_block_offset((const block_q8_0 *)(a + (size_t)c * as) + b);
}

/* CN activation rows against the packed group (blocks b0..b0 + bn of
 * every row), continuing each column's four chains in keep[c] (zeros at
 * the first group); after the last they are summed into y (rows [0, rn)).
 * Each block's weights are read once for all CN, and CN independent
 * chains keep the unit busy. off: these rows' offsets, onb apart. */
TILE_INLINE void q8_wl_cols(const struct q8_wl_rows *wt, int64_t b0, int64_t bn, const uint8_t *a, size_t as,
                            const int32_t *off, int64_t onb, __m512 (*keep)[4], bool first, bool last,
                            float *y, int64_t ys, int rn, const int CN)
{
        __m512 acc[4][4];

        for (int c = 0; c < CN; c++)
                for (int ch = 0; ch < 4; ch++)
                        acc[c][ch] = first ? _mm512_setzero_ps() : keep[c][ch];
#pragma GCC unroll 4
        for (int ch = 0; ch < 4; ch++) {
                for (int64_t b = 4 * ch; b < MO_MIN(bn, 4 * ch + 4); b++) {
                        __m512i s[4];

                        for (int c = 0; c < CN; c++)
                                s[c] = _mm512_setzero_si512();
                        for (int t = 0; t < 8; t++)
                                for (int c = 0; c < CN; c++) {
                                        const block_q8_0 *x = (const block_q8_0 *)(a + (size_t)c * as) + b0 + b;
                                        __m512i xb = _mm512_set1_epi32((int)mo_load_u32le((const uint8_t *)x->qs + 4 * t));
#ifdef __AVX512VNNI__
                                        s[c] = _mm512_dpbusd_epi32(s[c], wt->wu[b][t], xb);
#else
                                        s[c] = q8_dot4(s[c], wt->wabs[b][t], wt->wneg[b][t], xb);
#endif
                                }
                        for (int c = 0; c < CN; c++) {
                                const block_q8_0 *x = (const block_q8_0 *)(a + (size_t)c * as) + b0 + b;
                                __m512 sc = _mm512_mul_ps(wt->d[b], _mm512_set1_ps(half_to_f32(x->d)));

#ifdef __AVX512VNNI__
                                s[c] = _mm512_sub_epi32(s[c], _mm512_set1_epi32(off[c * onb + b0 + b]));
#else
                                (void)off, (void)onb;
#endif
                                acc[c][ch] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[c]), sc, acc[c][ch]);
                        }
                }
        }
        for (int c = 0; c < CN; c++) {
                if (!last) {
                        for (int ch = 0; ch < 4; ch++)
                                keep[c][ch] = acc[c][ch];
                        continue;
                }
                _mm512_mask_storeu_ps(y + c * ys, (__mmask16)((1u << rn) - 1),
                                      _mm512_add_ps(_mm512_add_ps(acc[c][0], acc[c][1]),
                                                    _mm512_add_ps(acc[c][2], acc[c][3])));
        }
}

/* The pack's walk down 16 rows at once defeats the hardware's prefetch,
 * so q8_wl_chunk prefetches. Rows past one group: before the k-th of nk
 * chunks of columns in the group from block g0 of the band from row r0,
 * its share of the same group of the next 16 rows. Issued at once, those
 * prefetches overran the memory's queue (the output head at 16 columns,
 * two threads, 129-152 GMAC/s that way, 183-193 spread over the chunks). */
TILE_INLINE void q8_wl_prefetch(const uint8_t *w, size_t ws, int64_t nr, int64_t nb, int64_t r0, int64_t g0,
                                int64_t k, int64_t nk)
{
        const size_t bsz = sizeof(block_q8_0);
        const int64_t per = (16 + nk - 1) / nk, p0 = r0 + 16 + k * per;

        for (int64_t r = p0; r < MO_MIN(MO_MIN(p0 + per, r0 + 32), nr); r++)
                prefetch_l2(w + (size_t)r * ws + (size_t)g0 * bsz, (size_t)MO_MIN(nb - g0, Q8_GROUP) * bsz);
}

/* q8_wl_cols for cn <= 4 columns. */
TILE_INLINE void q8_wl_cols_n(const struct q8_wl_rows *wt, int64_t b0, int64_t bn, const uint8_t *a, size_t as,
                              const int32_t *off, int64_t onb, __m512 (*keep)[4], bool first, bool last,
                              float *y, int64_t ys, int rn, int64_t cn)
{
        switch (cn) {
        case 1: q8_wl_cols(wt, b0, bn, a, as, off, onb, keep, first, last, y, ys, rn, 1); break;
        case 2: q8_wl_cols(wt, b0, bn, a, as, off, onb, keep, first, last, y, ys, rn, 2); break;
        case 3: q8_wl_cols(wt, b0, bn, a, as, off, onb, keep, first, last, y, ys, rn, 3); break;
        default: q8_wl_cols(wt, b0, bn, a, as, off, onb, keep, first, last, y, ys, rn, 4); break;
        }
}

/* nr weight rows of nb blocks, ws <= INT32_MAX / 16 bytes apart, against
 * nc activation rows (at most Q8_WL_COLS when nb > Q8_GROUP) whose
 * offsets are off; a band of 16 rows and a group of their blocks at a
 * time. Short rows (one group) have their own loop, with nothing to keep:
 * through the general one, with its tests, the attention's per-head
 * products at one column ran 25-50% slower. */
static void q8_wl_chunk(int64_t nb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a, size_t as,
                        int64_t nc, const int32_t *off, float *y, int64_t ys)
{
        struct q8_wl_rows wt;
        __m512 keep[Q8_WL_COLS][4];

        for (int64_t r0 = 0; r0 < nr; r0 += 16) {
                const int rn = (int)MO_MIN(nr - r0, 16);

                if (nb <= Q8_GROUP) {
                        q8_wl_pack(&wt, 0, nb, w + (size_t)r0 * ws, ws, rn);
                        /* The whole of the 16 rows after the next, as tuned
                         * on wq_b: streamed, it ran at half its in-cache
                         * speed at 16 columns and a quarter at one without. */
                        for (int64_t r = r0 + 32; r < MO_MIN(r0 + 48, nr); r++)
                                prefetch_l2(w + (size_t)r * ws, (size_t)nb * sizeof(block_q8_0));
                        for (int64_t c = 0; c < nc; c += 4)
                                q8_wl_cols_n(&wt, 0, nb, a + (size_t)c * as, as, off + c * nb, nb, NULL, true,
                                             true, y + c * ys + r0, ys, rn, MO_MIN(nc - c, 4));
                        continue;
                }
                for (int64_t g0 = 0; g0 < nb; g0 += Q8_GROUP) {
                        const int64_t bn = MO_MIN(nb - g0, Q8_GROUP);

                        q8_wl_pack(&wt, g0, bn, w + (size_t)r0 * ws, ws, rn);
                        for (int64_t c = 0; c < nc; c += 4) {
                                q8_wl_prefetch(w, ws, nr, nb, r0, g0, c / 4, (nc + 3) / 4);
                                q8_wl_cols_n(&wt, g0, bn, a + (size_t)c * as, as, off + c * nb, nb, keep + c,
                                             g0 == 0, g0 + bn == nb, y + c * ys + r0, ys, rn, MO_MIN(nc - c, 4));
                        }
                }
        }
}

/* The weight-lanes kernel, nb <= Q8_WL_OFFSETS, in chunks of columns
 * whose offsets fit the stack (worked out only in the offset form) and,
 * for rows past one group, whose kept chains do. */
static void q8_wl(int64_t nb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a, size_t as,
                  int64_t nc, float *y, int64_t ys)
{
        int32_t off[Q8_WL_OFFSETS];
        const int64_t cc = MO_MAX(1, MO_MIN(MO_MIN(nc, Q8_WL_OFFSETS / MO_MAX(nb, 1)),
                                            nb > Q8_GROUP ? Q8_WL_COLS : INT64_MAX));

        for (int64_t c = 0; c < nc; c += cc) {
                const int64_t cn = MO_MIN(nc - c, cc);

                if (Q8_OFFSET_FORM)
                        q8_wl_offsets(a + (size_t)c * as, as, cn, nb, off);
                q8_wl_chunk(nb, w, ws, nr, a + (size_t)c * as, as, cn, off, y + c * ys, ys);
        }
}

/* The row kernel over nr weight rows, each activation row's scales and
 * quants taken out once for all of them (no joining of two blocks' halves
 * per use), as many activation rows at a time as fit the stack. */
static void q8_rows(int64_t nb, const void *w, size_t ws, int64_t nr, const uint8_t *a,
                    size_t as, int64_t nc, float *y, int64_t ys)
{
        enum { XS_GROUPS = 64 };
        const int64_t ng = (nb + Q8_GROUP - 1) / Q8_GROUP;
        __m512 xs[XS_GROUPS];
        __m512i xo[Q8_OFFSET_FORM ? XS_GROUPS : 1];
        int8_t xq[XS_GROUPS * Q8_GROUP * QK8_0] __attribute__((aligned(64)));
        /* Past 64 groups (k over 32768) the activations are read in place. */
        const bool fit = ng <= XS_GROUPS;
        const int64_t per = MO_MIN(fit ? MO_MAX(XS_GROUPS / MO_MAX(ng, 1), 1) : 1, Q8_WL_MIN - 1);

        for (int64_t c0 = 0; c0 < nc; c0 += per) {
                int64_t cn = MO_MIN(nc - c0, per);
                const uint8_t *ac = a + (size_t)c0 * as;

                for (int64_t c = 0; fit && c < cn; c++) {
                        const block_q8_0 *x = (const block_q8_0 *)(ac + (size_t)c * as);

                        for (int64_t g = 0; g < ng; g++) {
                                xs[c * ng + g] = q8_group_scales(x + g * Q8_GROUP, nb - g * Q8_GROUP);
                                if (Q8_OFFSET_FORM)
                                        xo[c * ng + g] = q8_group_offsets(x + g * Q8_GROUP, nb - g * Q8_GROUP);
                        }
                        for (int64_t b = 0; b < nb; b++)
                                memcpy(xq + (c * ng * Q8_GROUP + b) * QK8_0, x[b].qs, QK8_0);
                }
                for (int64_t r = 0; r < nr; r++)
                        q8_row(nb, (const block_q8_0 *)((const uint8_t *)w + r * ws), ac, as, cn,
                               fit ? xs : NULL, fit ? xq : NULL, xo, ng, y + c0 * ys + r, ys);
        }
}

static void gemm_Q8_0(int64_t n, const void *w, size_t ws, int64_t nr, const void *a, size_t as,
                      int64_t nc, float *y, int64_t ys)
{
        const int64_t nb = n / QK8_0;

#ifdef __AVX512VNNI__
        /* Full rows from Q8_WL_MIN activation rows on; the weight lanes
         * gather the rows' scales with 32-bit offsets. */
        if (nb >= Q8_GROUP && nb <= Q8_WL_OFFSETS && nc >= Q8_WL_MIN && ws <= (size_t)INT32_MAX / 16) {
                q8_wl(nb, w, ws, nr, (const uint8_t *)a, as, nc, y, ys);
                return;
        }
#endif
        /* Short rows at every batch size, the same gather. */
        if (nb < Q8_GROUP && ws <= (size_t)INT32_MAX / 16)
                q8_wl(nb, w, ws, nr, a, as, nc, y, ys);
        else
                q8_rows(nb, w, ws, nr, a, as, nc, y, ys);
}
