/* dot-avx512-q8.h: the AVX-512 Q8_0 x Q8_0 kernels, included by
 * dot-avx512.c (and so built with and without VNNI). Private to it.
 *
 * Each output is summed in one fixed order, whatever the batch:
 *   idot(b)  = the exact integer dot of block b (32 products);
 *   chain s  = for each group of 16 blocks in turn, blocks 4s..4s+3 of the
 *              group in ascending order: acc_s = fma(idot, d_w * d_x, acc_s);
 *   y        = (acc_0 + acc_1) + (acc_2 + acc_3).
 * Three kernels compute it. The row kernel streams one weight row at a time
 * and vectorises over the 16 blocks of a group; it serves decode and any
 * handful of activation rows. The lanes kernel (VNNI only) puts 16
 * activation rows in the lanes of a vector and broadcasts the weights, so
 * that each weight byte feeds 16 products per instruction and the float
 * work of a block is shared by 16 outputs; it serves decode batches of 8
 * to Q8_WL_FULL_MIN - 1 rows. The weight-lanes kernel puts 16 weight rows
 * in the lanes instead and broadcasts the activations; it takes rows
 * shorter than a group (the attention's per-head products) at every batch
 * size and, with VNNI, everything from Q8_WL_FULL_MIN activation rows on
 * (prefill). On a 2-core Zen 4 the lanes kernel runs 1.5-1.8x the
 * multiply-adds per second of the 4 x 4 tiles it replaced
 * (tools/moed-bench, bench/results).
 * All give the same bits, so a sequence's logits do not depend on what it
 * is batched with. */

#define Q8_GROUP 16
/* Fewer activation rows than this go through the row kernel: below it the
 * lanes kernel's fixed cost per weight block outweighs its sharing. */
#define Q8_LANES_MIN 8
/* From this many activation rows on, full rows go to the weight lanes
 * (VNNI only). Two threads streaming 8192 x 1024 matrices from memory,
 * lanes kernel against weight lanes, GMAC/s: 24 rows 111-114 against
 * 175-182, 64 rows 156 against 238-253, 128 rows 164-169 against 256-259.
 * At 16 the output head ran slower in the weight lanes (129-152 against
 * 154-170), so decode batches stay in the lanes. */
#define Q8_WL_FULL_MIN 24
/* The lanes kernel's activation pack covers this many blocks and its
 * accumulators this many weight rows (about 34 KiB of stack together). */
#define Q8_PACK_BLOCKS 32
#define Q8_PACK_ROWS 64

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

/* One weight row against cn activation rows (at most Q8_LANES_MIN - 1);
 * xs holds each activation row's group scales (q8_group_scales) one after
 * another, ng groups each, or is NULL to take them as it goes; xq, when not
 * NULL, their quants without the scales between blocks, ng groups each,
 * and xo their offsets (q8_group_offsets), as xs. */
static void q8_row(int64_t nb, const block_q8_0 *w, const uint8_t *a, size_t as, int64_t cn,
                   const __m512 *xs, const int8_t *xq, const __m512i *xo, int64_t ng, float *y, int64_t ys)
{
        __m128 acc[Q8_LANES_MIN - 1];
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
 * Block b goes to chain b / 4 in ascending order, as in the row kernel.
 * It serves every batch size for such rows, so a column's bits never
 * depend on how many came with it. Full rows it takes a group of 16
 * blocks at a time, each column's chains kept between groups, when there
 * are enough activation rows to share each packed group (Q8_WL_FULL_MIN).
 * (Full groups against 3 to 7 activation rows ran faster here than in the
 * row kernel on one core with the weights in cache, and slower on two
 * streaming a batch's experts: the row kernel's one stream a row suits
 * the memory better.)
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

/* nr weight rows of nb blocks, ws <= INT32_MAX / 16 bytes apart, against
 * nc activation rows (at most Q8_WL_COLS when nb > Q8_GROUP) whose
 * offsets are off; a group of 16 rows' blocks at a time. */
static void q8_wl_chunk(int64_t nb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a, size_t as,
                        int64_t nc, const int32_t *off, float *y, int64_t ys)
{
        struct q8_wl_rows wt;
        __m512 keep[Q8_WL_COLS][4];

        for (int64_t r0 = 0; r0 < nr; r0 += 16) {
                const int rn = (int)MO_MIN(nr - r0, 16);

                /* The 16 rows after the next, while these meet the
                 * activations: the pack's walk down 16 rows at once defeats
                 * the hardware's prefetch. Streamed from memory, wq_b of the
                 * bench shape ran at half its in-cache speed at 16 columns
                 * and a quarter at one. */
                for (int64_t g0 = 0; g0 < nb; g0 += Q8_GROUP) {
                        const int64_t bn = MO_MIN(nb - g0, Q8_GROUP);
                        const bool first = g0 == 0, last = g0 + bn == nb;

                        for (int64_t r = r0 + 32; r < MO_MIN(r0 + 48, nr); r++)
                                prefetch_l2(w + (size_t)r * ws + (size_t)g0 * sizeof(block_q8_0), (size_t)bn * sizeof(block_q8_0));

                        q8_wl_pack(&wt, g0, bn, w + (size_t)r0 * ws, ws, rn);
                        for (int64_t c = 0; c < nc; c += 4) {
                                const uint8_t *ac = a + (size_t)c * as;
                                const int32_t *oc = off + c * nb;
                                /* one group: nothing kept */
                                __m512 (*kc)[4] = nb > Q8_GROUP ? keep + c : NULL;
                                float *yc = y + c * ys + r0;

                                switch (MO_MIN(nc - c, 4)) {
                                case 1: q8_wl_cols(&wt, g0, bn, ac, as, oc, nb, kc, first, last, yc, ys, rn, 1); break;
                                case 2: q8_wl_cols(&wt, g0, bn, ac, as, oc, nb, kc, first, last, yc, ys, rn, 2); break;
                                case 3: q8_wl_cols(&wt, g0, bn, ac, as, oc, nb, kc, first, last, yc, ys, rn, 3); break;
                                default: q8_wl_cols(&wt, g0, bn, ac, as, oc, nb, kc, first, last, yc, ys, rn, 4); break;
                                }
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

#ifdef __AVX512VNNI__
/* One block of up to 16 activation rows with the rows in the lanes: q[t]
 * lane c is bytes 4t..4t+3 of row c plus 128 each (the unsigned side of
 * dpbusd, so that the signed weights can be broadcast from memory), d lane
 * c the row's block scale. The offset adds 128 x the sum of the block's
 * weights to every lane's dot, which the kernel takes off again. */
struct q8_lanes_block {
        __m512i q[8];
        __m512 d;
};

#define Q8_LANES 16

/* Transposes one block of rows [0, nt) into the lanes; lanes from nt on
 * read zeros. */
static void q8_pack_block(struct q8_lanes_block *out, const uint8_t *a, size_t as, int nt,
                          int64_t b, __m512i gidx, __mmask16 live)
{
        static const int8_t zero[32];
        const void *row[16];

        for (int c = 0; c < 16; c++)
                row[c] = c < nt ? ((const block_q8_0 *)(a + (size_t)c * as) + b)->qs : (const void *)zero;
        lanes_transpose(row, out->q);
        for (int d = 0; d < 8; d++)
                out->q[d] = _mm512_xor_si512(out->q[d], _mm512_set1_epi8((char)0x80));
        out->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(
                _mm512_setzero_si512(), live, gidx, a + (size_t)b * sizeof(block_q8_0), 1)));
}

/* 128 x the sum of the weights of block w (lanes 0-7) and, when rows is
 * 2, of the block ws bytes on (lanes 8-15): the activations' offset makes
 * every dot that much too large. vpsadbw sums the weights plus 128 as
 * unsigned bytes, so the sixteenth lane can carry an activation row
 * rather than the offset (a batch of 16 went 15 + 1, the one alone
 * streaming every weight a second time). */
TILE_INLINE __m512i q8_weight_offset(const block_q8_0 *w, size_t ws, const int rows)
{
        const __m256i lo = _mm256_loadu_si256((const __m256i *)w->qs);
        const __m512i q = rows == 2 ? _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                                          _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)(
                                                                  (const uint8_t *)w + ws))->qs), 1) :
                                      _mm512_zextsi256_si512(lo);
        /* Eight sums of eight (w + 128), then four of them per row. */
        __m512i t = _mm512_sad_epu8(_mm512_xor_si512(q, _mm512_set1_epi8((char)0x80)), _mm512_setzero_si512());

        t = _mm512_add_epi64(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));
        t = _mm512_add_epi64(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
        /* 128 x (sum - 32 x 128): the weights' own sum, scaled. */
        return _mm512_sub_epi32(_mm512_slli_epi32(t, 7), _mm512_set1_epi32(QK8_0 * 128 * 128));
}

/* One block of `rows` (1 or 2) weight rows at w, ws apart, with every
 * lane's block: the lanes' quants are loaded once for both rows. */
TILE_INLINE void q8_lanes_step(const block_q8_0 *w, size_t ws, const struct q8_lanes_block *x,
                               __m512 *acc0, __m512 *acc1, const int rows)
{
        const __m512i off = q8_weight_offset(w, ws, rows);
        __m512i xq[8];
        __m512 *acc[2] = { acc0, acc1 };

        for (int t = 0; t < 8; t++)
                xq[t] = _mm512_load_si512(&x->q[t]);
        for (int r = 0; r < rows; r++) {
                const block_q8_0 *wb = (const block_q8_0 *)((const uint8_t *)w + r * ws);
                const uint8_t *q = (const uint8_t *)wb->qs;
                __m512i s[4] = { _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                 _mm512_setzero_si512() };
                __m512 sc = _mm512_mul_ps(_mm512_set1_ps(half_to_f32(wb->d)), x->d);

                /* Four short integer chains rather than one long one. */
                for (int t = 0; t < 8; t++)
                        s[t % 4] = _mm512_dpbusd_epi32(s[t % 4], xq[t], _mm512_set1_epi32((int)mo_load_u32le(q + 4 * t)));
                s[0] = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
                s[0] = _mm512_sub_epi32(s[0], _mm512_permutexvar_epi32(_mm512_set1_epi32(8 * r), off));
                *acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), sc, *acc[r]);
        }
}

/* The weight rows w (and w + ws when rows is 2) over blocks [0, bn) of
 * the pack, continuing the chains in acc[row][chain]. bn counts from a
 * multiple of 16, so block b's chain is (b % 16) / 4. */
TILE_INLINE void q8_lanes_rows(const block_q8_0 *w, size_t ws, const struct q8_lanes_block *pk,
                               int64_t bn, __m512 acc[2][4], const int rows)
{
        int64_t b = 0;

        /* The four chains take turns so that no step waits on the one
         * before it; each still sees its blocks in order. */
        for (; b + Q8_GROUP <= bn; b += Q8_GROUP)
                for (int q = 0; q < 4; q++)
                        for (int s = 0; s < 4; s++)
                                q8_lanes_step(w + b + 4 * s + q, ws, &pk[b + 4 * s + q],
                                              &acc[0][s], &acc[1][s], rows);
        for (; b < bn; b++)
                q8_lanes_step(w + b, ws, &pk[b], &acc[0][b % 16 / 4], &acc[1][b % 16 / 4], rows);
}

/* Both lanes kernels keep each weight row's four chains across the packs
 * of one call. lanes_chains_begin takes up those of rows r and r + 1
 * (zeros at the first pack); lanes_chains_end puts them back, or after
 * the last pack sums them, (c0 + c1) + (c2 + c3), into the outputs of the
 * nt live lanes: y[c * ys + r]. */
TILE_INLINE void lanes_chains_begin(__m512 acc[2][4], __m512 keep[][4], int64_t r, int rows, bool first)
{
        for (int i = 0; i < rows; i++)
                for (int s = 0; s < 4; s++)
                        acc[i][s] = first ? _mm512_setzero_ps() : keep[r + i][s];
}

TILE_INLINE void lanes_chains_end(__m512 acc[2][4], __m512 keep[][4], int64_t r, int rows, bool last,
                                  float *y, int64_t ys, int nt)
{
        for (int i = 0; i < rows; i++) {
                float out[16];

                if (!last) {
                        for (int s = 0; s < 4; s++)
                                keep[r + i][s] = acc[i][s];
                        continue;
                }
                _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]),
                                                    _mm512_add_ps(acc[i][2], acc[i][3])));
                for (int c = 0; c < nt; c++)
                        y[c * ys + r + i] = out[c];
        }
}

/* nr weight rows against nt <= Q8_LANES activation rows. */
static void q8_lanes(int64_t nb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a,
                     size_t as, int nt, float *y, int64_t ys)
{
        struct q8_lanes_block pk[Q8_PACK_BLOCKS];
        __m512 keep[Q8_PACK_ROWS][4];
        const __m512i gidx = lanes_offsets(as);
        const __mmask16 live = (__mmask16)((1u << nt) - 1);

        for (int64_t r0 = 0; r0 < nr; r0 += Q8_PACK_ROWS) {
                int64_t rn = MO_MIN(nr - r0, Q8_PACK_ROWS);

                for (int64_t b0 = 0; b0 < nb; b0 += Q8_PACK_BLOCKS) {
                        int64_t bn = MO_MIN(nb - b0, Q8_PACK_BLOCKS);

                        for (int64_t b = 0; b < bn; b++)
                                q8_pack_block(&pk[b], a, as, nt, b0 + b, gidx, live);
                        for (int64_t r = 0; r < rn; r += 2) {
                                const block_q8_0 *wr = (const block_q8_0 *)(w + (size_t)(r0 + r) * ws) + b0;
                                const int rows = rn - r >= 2 ? 2 : 1;
                                __m512 acc[2][4];

                                /* The lanes take a row's blocks in the chains' order,
                                 * two rows at a time, which the hardware's prefetchers
                                 * do not follow: on the output head it ran at 60% of
                                 * its in-cache speed without this. */
                                for (int64_t p = r0 + r + 4; p < MO_MIN(r0 + r + 4 + rows, nr); p++)
                                        prefetch_l2(w + (size_t)p * ws + (size_t)b0 * sizeof(block_q8_0),
                                                    (size_t)bn * sizeof(block_q8_0));
                                lanes_chains_begin(acc, keep, r, rows, b0 == 0);
                                if (rows == 2)
                                        q8_lanes_rows(wr, ws, pk, bn, acc, 2);
                                else
                                        q8_lanes_rows(wr, ws, pk, bn, acc, 1);
                                lanes_chains_end(acc, keep, r, rows, b0 + bn == nb, y + r0, ys, nt);
                        }
                }
        }
}
#endif

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
        const int64_t per = MO_MIN(fit ? MO_MAX(XS_GROUPS / MO_MAX(ng, 1), 1) : 1, Q8_LANES_MIN - 1);

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
        int64_t c = 0;

#ifdef __AVX512VNNI__
        /* Both kinds of lanes gather with 32-bit offsets. Rows shorter
         * than a group stay on the weight lanes at every batch size: they
         * already share each packed block among the activation rows, and
         * the lanes kernel's set-up per group of 16 blocks does not pay
         * for two. */
        if (nb >= Q8_GROUP && nb <= Q8_WL_OFFSETS && nc >= Q8_WL_FULL_MIN && ws <= (size_t)INT32_MAX / 16) {
                q8_wl(nb, w, ws, nr, (const uint8_t *)a, as, nc, y, ys);
                return;
        }
        if (nb >= Q8_GROUP && as <= (size_t)INT32_MAX / 16)
                for (; nc - c >= Q8_LANES_MIN; c += MO_MIN(nc - c, Q8_LANES))
                        q8_lanes(nb, w, ws, nr, (const uint8_t *)a + c * as, as,
                                 (int)MO_MIN(nc - c, Q8_LANES), y + c * ys, ys);
#endif
        /* The weight lanes' gather offsets are 32-bit too. */
        if (c < nc && nb < Q8_GROUP && ws <= (size_t)INT32_MAX / 16)
                q8_wl(nb, w, ws, nr, (const uint8_t *)a + c * as, as, nc - c, y + c * ys, ys);
        else if (c < nc)
                q8_rows(nb, w, ws, nr, (const uint8_t *)a + c * as, as, nc - c, y + c * ys, ys);
}
