/* dot-avx512-k6.h: the AVX-512 Q6_K x Q8_K kernels, and the weight-lanes
 * driver that all K-quants share; included by dot-avx512.c after
 * dot-avx512-k4.h. Private to it.
 *
 * Q6_K keeps the K-quant order of dot-avx512-k4.h without the mins: for
 * each super-block b the exact integer
 *   sumi(b) = sum over sub-blocks j of scale_j x (dot of j - 32 x sum of j's activations)
 * (|sumi| <= 16 x 128 x 16 x 64 x 127 < 2^31), then chain b % 4 takes
 *   acc_s = fma(sumi(b), d_w * d_x, acc_s);
 * and y = (acc_0 + acc_1) + (acc_2 + acc_3). The tiles serve decode,
 * small batches and everything without VNNI; with VNNI, batches of
 * K6_WLANES_MIN or more go to the weight lanes as Q4_K's do. */

enum kq_kind { KQ_4, KQ_5, KQ_6 };

/* One Q6_K super-block of one weight row against NC activation rows: vi[c]
 * holds 16 partial sums of sumi as int32; *d the block's scale. Each half
 * of a block is [ql 64 B | qh 32 B]; values 0..63 meet the activations,
 * and 32 x scale x (sums of each 16) comes off at once. */
TILE_INLINE void k6_superblock(const block_q6_k *x, const uint8_t *a, size_t as, int64_t b, __m512i vi[NC_MAX],
                               float *d, const int NC)
{
        const __m512i lo4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x->scales));
        __m512i scz = _mm512_castsi256_si512(sc16);

        *d = half_to_f32(x->d);
        for (int c = 0; c < NC; c++) {
                const block_q8_k *ab = (const block_q8_k *)ROW(a, c, as) + b;
                __m256i bs = _mm256_loadu_si256((const __m256i *)ab->bsums);
                __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);

                vi[c] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(corr));
        }
        for (int h = 0; h < 2; h++) {
                __m512i l = _mm512_loadu_si512(x->ql + 64 * h);
                __m256i hh = _mm256_loadu_si256((const __m256i *)(x->qh + 32 * h));
                __m512i hb = join256(hh, _mm256_srli_epi16(hh, 2));
                __m512i q[2];

                q[0] = _mm512_or_si512(_mm512_and_si512(l, lo4),
                                       _mm512_slli_epi16(_mm512_and_si512(hb, three), 4));
                q[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), lo4),
                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4), three), 4));
                for (int k = 0; k < 2; k++) {
                        /* Lanes 8i..8i+7 (int16) take scale 4(2h + k) + i. */
                        __m512i idx = _mm512_add_epi16(_mm512_set1_epi16((short)(4 * (2 * h + k))),
                                                       _mm512_srli_epi16(_mm512_setr_epi32(
                                                               0x00010000, 0x00030002, 0x00050004, 0x00070006,
                                                               0x00090008, 0x000b000a, 0x000d000c, 0x000f000e,
                                                               0x00110010, 0x00130012, 0x00150014, 0x00170016,
                                                               0x00190018, 0x001b001a, 0x001d001c, 0x001f001e), 3));
                        __m512i s = _mm512_permutexvar_epi16(idx, scz);

                        for (int c = 0; c < NC; c++) {
                                const int8_t *q8 = ((const block_q8_k *)ROW(a, c, as) + b)->qs + 128 * h + 64 * k;

                                vi[c] = madd_acc(vi[c], _mm512_maddubs_epi16(q[k], _mm512_loadu_si512(q8)), s);
                        }
                }
        }
}

/* Super-blocks are reduced four at a time (k4_reduce), each to its chain. */
TILE_INLINE void tile_Q6_K(int64_t n, const uint8_t *w, size_t ws, const uint8_t *a,
                           size_t as, float *y, int64_t ys, const int NR, const int NC)
{
        const int64_t nsb = n / QK_K;
        const __m256i zero = _mm256_setzero_si256();
        const __m256i vm[4] = { zero, zero, zero, zero };
        __m128 acc[4][NC_MAX];

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
                        const block_q6_k *wr = (const block_q6_k *)ROW(w, r, ws) + b0;
                        float d[4] = { 0, 0, 0, 0 };
                        __m512i vi[NC_MAX][4], ti[NC_MAX];

#pragma GCC unroll 4
                        for (int i = 0; i < 4; i++) {
                                if (i < gn)
                                        k6_superblock(wr + i, a, as, b0 + i, ti, &d[i], NC);
                                for (int c = 0; c < NC; c++)
                                        vi[c][i] = i < gn ? ti[c] : _mm512_setzero_si512();
                        }
                        for (int c = 0; c < NC; c++) {
                                __m128 f = _mm256_castps256_ps128(_mm256_cvtepi32_ps(k4_reduce(vi[c], vm)));
                                __m128 dd = _mm_mul_ps(_mm_setr_ps(d[0], d[1], d[2], d[3]), dx[c]);

                                acc[r][c] = _mm_mask3_fmadd_ps(f, dd, acc[r][c], live);
                        }
                }
        }
        for (int r = 0; r < NR; r++)
                for (int c = 0; c < NC; c++)
                        y[c * ys + r] = q8_chains_sum(acc[r][c]);
}

#ifdef __AVX512VNNI__
/* Q6_K's weight lanes pay more per super-block than Q4_K's (six
 * transposes, the 6-bit values joined, 16 scales): on a Zen 4 core the
 * tiles stay ahead below four activation rows (48 against 35 GMAC/s at
 * two), the lanes from four on (71 against 65; 110 against 67 at 16). */
#define K6_WLANES_MIN 4

/* The scales of super-block b of 16 Q6_K weight rows, in the lanes:
 * sc[j] lane r is scale j of row r (int32), scp[k] lane r its scales 2k
 * and 2k + 1 as two int16, d lane r its super-block scale. */
struct k6_wlanes_scales {
        __m512i sc[QK_K / 16];
        __m512i scp[QK_K / 32];
        __m512 d;
};

/* Rows [0, rn) at w, ws apart; gidx their offsets (lanes_offsets). */
static void k6_wlanes_scales(struct k6_wlanes_scales *out, const uint8_t *w, size_t ws, int rn,
                             int64_t b, __m512i gidx)
{
        static const uint8_t zero[32];
        const __mmask16 live = (__mmask16)((1u << rn) - 1);
        __m512i s[4], g;
        const void *row[16];

        for (int r = 0; r < 16; r++)
                row[r] = r < rn ? (const void *)((const block_q6_k *)(w + (size_t)r * ws) + b)->scales :
                                  (const void *)zero;
        lanes_transpose16(row, s);
        for (int j = 0; j < QK_K / 16; j++)
                out->sc[j] = _mm512_srai_epi32(_mm512_slli_epi32(s[j / 4], 24 - 8 * (j % 4)), 24);
        for (int k = 0; k < QK_K / 32; k++) {
                /* Words of lo: bytes 0 and 2 of each dword, sign-extended; of hi: bytes 1 and 3. */
                __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(s[k / 2], 8), 8);
                __m512i hi = _mm512_srai_epi16(s[k / 2], 8);

                out->scp[k] = k % 2 ? _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(lo, 16), hi) :
                                      _mm512_mask_blend_epi16(0xAAAAAAAAu, lo, _mm512_slli_epi32(hi, 16));
        }
        /* The dword ending the block: scales 14 and 15, then d. */
        g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, gidx,
                                        w + (size_t)b * sizeof(block_q6_k) + offsetof(block_q6_k, d) - 2, 1);
        out->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
}

/* Super-block b of 16 Q6_K weight rows against NC activation rows. Half h
 * of a block takes ql bytes 64h..64h+63 and qh bytes 32h..32h+31; values
 * 128h + 32m + l (l < 32) are nibble m / 2 of ql byte 64h + 32(m % 2) + l
 * with bits 2m, 2m + 1 of qh byte 32h + l above it. */
TILE_INLINE void k6_wlanes_step(const uint8_t *w, size_t ws, int rn, int64_t b, const block_q8_k *const *x,
                                __m512 *const *acc, __m512i gidx, const int NC)
{
        static const uint8_t zero[32];
        const __m512i lo4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
        struct k6_wlanes_scales sc;
        __m512i sumi[K4_WLANES_COLS];
        const void *row[16];

        k6_wlanes_scales(&sc, w, ws, rn, b, gidx);
        for (int c = 0; c < NC; c++)
                sumi[c] = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
                __m512i hq[8];

                for (int r = 0; r < 16; r++)
                        row[r] = r < rn ? (const void *)(((const block_q6_k *)(w + (size_t)r * ws) + b)->qh + 32 * h) :
                                          (const void *)zero;
                lanes_transpose(row, hq);
                for (int half = 0; half < 2; half++) {
                        __m512i l[8];

                        for (int r = 0; r < 16; r++)
                                row[r] = r < rn ? (const void *)(((const block_q6_k *)(w + (size_t)r * ws) + b)->ql +
                                                                 64 * h + 32 * half) :
                                                  (const void *)zero;
                        lanes_transpose(row, l);
                        for (int nib = 0; nib < 2; nib++) {
                                const int m = half + 2 * nib, j = 8 * h + 2 * m;
                                __m512i q[8];

                                for (int t = 0; t < 8; t++)
                                        q[t] = _mm512_or_si512(
                                                _mm512_and_si512(nib ? _mm512_srli_epi16(l[t], 4) : l[t], lo4),
                                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hq[t], 2 * m), three), 4));
                                for (int c = 0; c < NC; c++) {
                                        const uint8_t *xq = (const uint8_t *)x[c]->qs + 128 * h + 32 * m;
                                        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();

                                        for (int t = 0; t < 4; t++) {
                                                s0 = _mm512_dpbusd_epi32(s0, q[t], _mm512_set1_epi32((int)mo_load_u32le(xq + 4 * t)));
                                                s1 = _mm512_dpbusd_epi32(s1, q[t + 4],
                                                                         _mm512_set1_epi32((int)mo_load_u32le(xq + 16 + 4 * t)));
                                        }
                                        sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(s0, sc.sc[j]));
                                        sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(s1, sc.sc[j + 1]));
                                }
                        }
                }
        }
        for (int c = 0; c < NC; c++) {
                __m512i bs = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)x[c]->bsums));
                __m512i corr = _mm512_setzero_si512();

                for (int k = 0; k < QK_K / 32; k++)
                        corr = _mm512_dpwssd_epi32(corr, sc.scp[k], _mm512_permutexvar_epi32(_mm512_set1_epi32(k), bs));
                sumi[c] = _mm512_sub_epi32(sumi[c], _mm512_slli_epi32(corr, 5));
                *acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[c]), _mm512_mul_ps(sc.d, _mm512_set1_ps(x[c]->d)),
                                          *acc[c]);
        }
}

/* The same super-block of the next 16 rows, into L2: taken in this order,
 * 16 short runs a row apart, the weights outrun the hardware's prefetch. */
TILE_INLINE void kq_prefetch_next(const uint8_t *w, size_t ws, int64_t b, size_t bsz)
{
        for (int r = 16; r < 32; r++)
                prefetch_l2(w + (size_t)r * ws + (size_t)b * bsz, bsz);
}

/* 16 weight rows (rn of them live) against NC <= K4_WLANES_COLS activation
 * rows, super-block b into chain b % 4 of each output. */
TILE_INLINE void kq_wlanes_group(int64_t nsb, const uint8_t *w, size_t ws, int rn, const uint8_t *a,
                                 size_t as, float *y, int64_t ys, enum kq_kind kind, __m512i gidx,
                                 const int NC)
{
        const size_t bsz = kind == KQ_6 ? sizeof(block_q6_k) : kind == KQ_5 ? sizeof(block_q5_k) :
                                                                               sizeof(block_q4_k);
        __m512 acc[K4_WLANES_COLS][K4_CHAINS];

        for (int c = 0; c < NC; c++)
                for (int s = 0; s < K4_CHAINS; s++)
                        acc[c][s] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nsb; b++) {
                const block_q8_k *x[K4_WLANES_COLS];
                __m512 *ac[K4_WLANES_COLS];

                for (int c = 0; c < NC; c++) {
                        x[c] = (const block_q8_k *)(a + (size_t)c * as) + b;
                        ac[c] = &acc[c][b % K4_CHAINS];
                }
                kq_prefetch_next(w, ws, b, bsz);
                if (kind == KQ_6)
                        k6_wlanes_step(w, ws, rn, b, x, ac, gidx, NC);
                else
                        k4_wlanes_step(w, ws, rn, b, x, ac, kind == KQ_5, NC);
        }
        for (int c = 0; c < NC; c++)
                _mm512_mask_storeu_ps(y + c * ys, (__mmask16)((1u << rn) - 1),
                                      _mm512_add_ps(_mm512_add_ps(acc[c][0], acc[c][1]),
                                                    _mm512_add_ps(acc[c][2], acc[c][3])));
}

/* One function per kind and column count, each laid out on its own: as
 * cases of one switch, their speed moved by 15% with the code around them.
 * They take no vector argument, so each returns through vzeroupper: after
 * one that did not, glibc's expf ran slowly enough to cost prefill 15%. */
#define KQ_GROUP_ARGS int64_t nsb, const uint8_t *w, size_t ws, int rn, const uint8_t *a, size_t as, \
                      float *y, int64_t ys
typedef void kq_group_fn(KQ_GROUP_ARGS);
#define KQ_GROUP_FN(K, N)                                                                         \
        static __attribute__((noinline)) void kq_group_##K##_##N(KQ_GROUP_ARGS)                   \
        {                                                                                         \
                kq_wlanes_group(nsb, w, ws, rn, a, as, y, ys, K, lanes_offsets(ws), N);           \
        }
#define KQ_GROUP_FNS(K)                                                                           \
        KQ_GROUP_FN(K, 1) KQ_GROUP_FN(K, 2) KQ_GROUP_FN(K, 3) KQ_GROUP_FN(K, 4)                   \
        KQ_GROUP_FN(K, 5) KQ_GROUP_FN(K, 6) KQ_GROUP_FN(K, 7) KQ_GROUP_FN(K, 8)                   \
        KQ_GROUP_FN(K, 9) KQ_GROUP_FN(K, 10) KQ_GROUP_FN(K, 11) KQ_GROUP_FN(K, 12)                \
        KQ_GROUP_FN(K, 13) KQ_GROUP_FN(K, 14) KQ_GROUP_FN(K, 15) KQ_GROUP_FN(K, 16)               \
        static kq_group_fn *const kq_groups_##K[K4_WLANES_COLS] = {                               \
                kq_group_##K##_1, kq_group_##K##_2, kq_group_##K##_3, kq_group_##K##_4,           \
                kq_group_##K##_5, kq_group_##K##_6, kq_group_##K##_7, kq_group_##K##_8,           \
                kq_group_##K##_9, kq_group_##K##_10, kq_group_##K##_11, kq_group_##K##_12,        \
                kq_group_##K##_13, kq_group_##K##_14, kq_group_##K##_15, kq_group_##K##_16,       \
        };
KQ_GROUP_FNS(KQ_4)
KQ_GROUP_FNS(KQ_5)
KQ_GROUP_FNS(KQ_6)

/* nr weight rows against nc activation rows over nsb super-blocks; rows
 * ws <= INT32_MAX / 16 bytes apart (Q6_K gathers its scales). */
TILE_INLINE void kq_wlanes(int64_t nsb, const uint8_t *w, size_t ws, int64_t nr, const uint8_t *a,
                           size_t as, int64_t nc, float *y, int64_t ys, enum kq_kind kind)
{
        kq_group_fn *const *groups = kind == KQ_6 ? kq_groups_KQ_6 : kind == KQ_5 ? kq_groups_KQ_5 : kq_groups_KQ_4;
        for (int64_t r0 = 0; r0 < nr; r0 += 16) {
                const int rn = (int)MO_MIN(nr - r0, 16);

                for (int64_t c = 0; c < nc; c += K4_WLANES_COLS)
                        groups[MO_MIN(nc - c, K4_WLANES_COLS) - 1](nsb, w + (size_t)r0 * ws, ws, rn,
                                                                   a + (size_t)c * as, as,
                                                                   y + c * ys + r0, ys);
        }
}
#endif
