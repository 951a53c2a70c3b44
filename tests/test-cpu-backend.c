/* test-cpu-backend: kernels/cpu — the dot kernels of every SIMD level
 * against the scalar reference, matmul against dequantized double sums,
 * thread-count independence, the other ops against plain references, and
 * the worker pool. MOED_CPU_BENCH=1 runs a micro-benchmark instead. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/cleanup.h"
#include "kernels/backend.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/pool.h"
#include "kernels/quant.h"
#include "testutil.h"

static const int weight_types[] = {
        MO_TYPE_F32, MO_TYPE_F16, MO_TYPE_BF16, MO_TYPE_Q8_0, MO_TYPE_Q4_0,
        MO_TYPE_Q5_0, MO_TYPE_Q4_K, MO_TYPE_Q5_K, MO_TYPE_Q6_K,
};

#define N_TYPES (sizeof weight_types / sizeof weight_types[0])
#define MAX_THREADS 3

/* backends[level][threads - 1]; NULL where the CPU lacks the level. */
static mo_backend *backends[3][MAX_THREADS];

static int n_levels(void)
{
        return (int)mo_cpu_simd_max() + 1;
}

static mo_backend *be(int level, int threads)
{
        mo_backend *b = backends[level][threads - 1];

        assert_non_null(b);
        return b;
}

static int setup_backends(void **state)
{
        for (int l = 0; l < n_levels(); l++) {
                setenv("MOED_CPU_SIMD", mo_simd_name((enum mo_simd)l), 1);
                for (int t = 1; t <= MAX_THREADS; t++) {
                        struct moerr e = {0};

                        if (mo_backend_cpu_new(t, &backends[l][t - 1], &e) < 0) {
                                fprintf(stderr, "cpu backend: %s\n", e.msg);
                                return -1;
                        }
                }
        }
        unsetenv("MOED_CPU_SIMD");
        return 0;
}

static int teardown_backends(void **state)
{
        for (int l = 0; l < 3; l++)
                for (int t = 0; t < MAX_THREADS; t++)
                        mo_backend_free(backends[l][t]);
        return 0;
}

static int64_t block_of(int type)
{
        return mo_type_get(type)->block;
}

/* ---- weights and activations ---------------------------------------------- */

struct tw {
        mo_weight w;
        uint8_t *data;
        float *deq; /* nrows x ncols, the weight's exact values */
};

/* row_pad adds bytes between rows (a view into a wider tensor). */
static void tw_make(struct tw *t, int type, int64_t nrows, int64_t ncols, size_t row_pad,
                    uint64_t seed)
{
        float *src = malloc(sizeof(float) * (size_t)ncols);

        assert_non_null(src);
        t->w.type = type;
        t->w.nrows = nrows;
        t->w.ncols = ncols;
        t->w.row_bytes = mo_row_bytes(type, ncols) + row_pad;
        assert_true(mo_row_bytes(type, ncols) > 0);
        t->data = calloc((size_t)nrows, t->w.row_bytes);
        t->deq = malloc(sizeof(float) * (size_t)(nrows * ncols));
        assert_non_null(t->data);
        assert_non_null(t->deq);
        for (int64_t r = 0; r < nrows; r++) {
                uint8_t *row = t->data + r * t->w.row_bytes;

                tu_randf(src, (size_t)ncols, seed * 1000 + (uint64_t)r);
                mo_quantize_row(type, src, row, ncols);
                mo_dequantize_row(type, row, t->deq + r * ncols, ncols);
        }
        t->w.data = t->data;
        free(src);
}

static void tw_free(struct tw *t)
{
        free(t->data);
        free(t->deq);
}

/* Activations in the weight's dot type, as matmul forms them. */
static void *quantize_acts(int type, const float *x, int64_t m, int64_t n, size_t *stride)
{
        int dt = mo_vec_dot_type(type);
        size_t rb = dt == MO_TYPE_F32 ? sizeof(float) * (size_t)n : mo_row_bytes(dt, n);
        uint8_t *q = malloc(rb * (size_t)m);

        assert_non_null(q);
        for (int64_t i = 0; i < m; i++) {
                if (dt == MO_TYPE_F32)
                        memcpy(q + i * rb, x + i * n, rb);
                else if (dt == MO_TYPE_Q8_0)
                        mo_quantize_row_q8_0(x + i * n, (block_q8_0 *)(q + i * rb), n);
                else
                        mo_quantize_row_q8_k(x + i * n, (block_q8_k *)(q + i * rb), n);
        }
        *stride = rb;
        return q;
}

/* Random weights of a type (t) and mc random activation rows for them,
 * already in the dot type: the inputs of a gemm kernel. */
static void *gemm_inputs(struct tw *t, int type, int64_t nr, int64_t n, int64_t mc, uint64_t seed, size_t *as)
{
        float *x = malloc(sizeof(float) * (size_t)(mc * n));
        void *q;

        assert_non_null(x);
        tw_make(t, type, nr, n, 0, seed);
        tu_randf(x, (size_t)(mc * n), seed + 1);
        q = quantize_acts(type, x, mc, n, as);
        free(x);
        return q;
}

/* sum |w_k a_k| over the exact values: the scale of float summation error. */
static double dot_magnitude(int type, const float *wrow, const void *act, int64_t n)
{
        int dt = mo_vec_dot_type(type);
        float *a = malloc(sizeof(float) * (size_t)n);
        double s = 0;

        assert_non_null(a);
        if (dt == MO_TYPE_F32)
                memcpy(a, act, sizeof(float) * (size_t)n);
        else if (dt == MO_TYPE_Q8_0)
                mo_dequantize_row(MO_TYPE_Q8_0, act, a, n);
        else
                for (int64_t b = 0; b < n / QK_K; b++)
                        for (int k = 0; k < QK_K; k++)
                                a[b * QK_K + k] = ((const block_q8_k *)act)[b].d *
                                                  ((const block_q8_k *)act)[b].qs[k];
        for (int64_t k = 0; k < n; k++)
                s += fabs((double)wrow[k] * a[k]);
        free(a);
        return s;
}

/* Float summation in another order: a few ulps of the magnitude per term
 * level; 1e-6 of sum|w a| is ~8 float epsilons, far below any real bug
 * (a wrong nibble or scale moves results by percents). */
#define REF_TOL 1e-6

/* ---- dot kernels ------------------------------------------------------------ */

static void check_kernel_vs_ref(const struct mo_cpu_kernels *k, int type, int64_t n,
                                int64_t nr, int64_t nc, uint64_t seed)
{
        struct tw t;
        float *x = malloc(sizeof(float) * (size_t)(nc * n));
        float *y = malloc(sizeof(float) * (size_t)(nc * nr));
        size_t as;
        void *q;

        assert_non_null(x);
        assert_non_null(y);
        tw_make(&t, type, nr, n, 0, seed);
        tu_randf(x, (size_t)(nc * n), seed + 7);
        q = quantize_acts(type, x, nc, n, &as);
        k->gemm[type](n, t.data, t.w.row_bytes, nr, q, as, nc, y, nr);
        for (int64_t c = 0; c < nc; c++)
                for (int64_t r = 0; r < nr; r++) {
                        const void *ar = (const uint8_t *)q + c * as;
                        float ref = mo_vec_dot_ref(type, n, t.data + r * t.w.row_bytes, ar);
                        double mag = dot_magnitude(type, t.deq + r * n, ar, n);

                        if (fabs((double)y[c * nr + r] - ref) > REF_TOL * mag + 1e-30)
                                fail_msg("%s %s n=%lld r=%lld c=%lld: kernel %.9g ref %.9g (mag %g)",
                                         mo_simd_name(k->level), mo_type_name(type), (long long)n,
                                         (long long)r, (long long)c, y[c * nr + r], ref, mag);
                }
        free(q);
        free(x);
        free(y);
        tw_free(&t);
}

static void dot_kernels_match_reference_for_every_type_and_level(void **state)
{
        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                assert_non_null(k);
                for (size_t i = 0; i < N_TYPES; i++) {
                        int type = weight_types[i];
                        int64_t b = block_of(type);
                        /* One block, an odd count of blocks, several; float
                         * types also get lengths that are not a vector width. */
                        int64_t ns[] = { b == 1 ? 1 : b, b == 1 ? 7 : 3 * b,
                                         b == 1 ? 33 : 8 * b, b == 1 ? 1000 : 16 * b };

                        for (size_t j = 0; j < ARRAY_SIZE(ns); j++)
                                check_kernel_vs_ref(k, type, ns[j], 9, 6, 100 + i * 10 + j);
                }
        }
}

/* Blocks of random bits with unit scales: every integer sum is exact, so
 * every level must give the reference bit for bit, whatever the quant
 * bits (all scale/min high bits, -128 weights) look like. */
static void fill_unit_scales(int type, uint8_t *blk)
{
        const mo_half one = 0x3C00;

        switch (type) {
        case MO_TYPE_Q8_0:
        case MO_TYPE_Q4_0:
        case MO_TYPE_Q5_0:
                memcpy(blk, &one, 2);
                break;
        case MO_TYPE_Q4_K:
        case MO_TYPE_Q5_K:
                memcpy(blk, &one, 2);
                memcpy(blk + 2, &one, 2);
                break;
        case MO_TYPE_Q6_K:
                memcpy(&((block_q6_k *)blk)->d, &one, 2);
                break;
        }
}

static void integer_dots_are_exact_with_unit_scales(void **state)
{
        const int types[] = { MO_TYPE_Q8_0, MO_TYPE_Q4_0, MO_TYPE_Q5_0,
                              MO_TYPE_Q4_K, MO_TYPE_Q5_K, MO_TYPE_Q6_K };
        uint64_t s = 0x1234567;

        for (size_t ti = 0; ti < ARRAY_SIZE(types); ti++) {
                int type = types[ti], dt = mo_vec_dot_type(type);
                int64_t n = 2 * QK_K, nb = n / block_of(type), nr = 5;
                size_t wb = mo_row_bytes(type, n), ab = mo_row_bytes(dt, n);
                uint8_t *w = malloc(wb * (size_t)nr), *a = malloc(ab);
                float y[5];

                assert_non_null(w);
                assert_non_null(a);
                for (size_t i = 0; i < wb * (size_t)nr; i++) {
                        s = s * 6364136223846793005ull + 1442695040888963407ull;
                        w[i] = (uint8_t)(s >> 56);
                }
                for (int64_t r = 0; r < nr * nb; r++)
                        fill_unit_scales(type, w + r * mo_type_get(type)->block_bytes);
                /* Activations in [-8, 8] keep every partial sum below 2^24. */
                if (dt == MO_TYPE_Q8_0) {
                        block_q8_0 *q = (block_q8_0 *)a;

                        for (int64_t b = 0; b < n / QK8_0; b++) {
                                q[b].d = 0x3C00;
                                for (int j = 0; j < QK8_0; j++)
                                        q[b].qs[j] = (int8_t)((b * 7 + j * 5) % 17 - 8);
                        }
                } else {
                        block_q8_k *q = (block_q8_k *)a;

                        for (int64_t b = 0; b < n / QK_K; b++) {
                                q[b].d = 1.0f;
                                for (int j = 0; j < QK_K; j++)
                                        q[b].qs[j] = (int8_t)((b * 7 + j * 5) % 17 - 8);
                                for (int g = 0; g < QK_K / 16; g++) {
                                        int sum = 0;

                                        for (int j = 0; j < 16; j++)
                                                sum += q[b].qs[16 * g + j];
                                        q[b].bsums[g] = (int16_t)sum;
                                }
                        }
                }
                for (int l = 0; l < n_levels(); l++) {
                        const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                        k->gemm[type](n, w, wb, nr, a, 0, 1, y, nr);
                        for (int64_t r = 0; r < nr; r++) {
                                float ref = mo_vec_dot_ref(type, n, w + r * wb, a);

                                if (y[r] != ref)
                                        fail_msg("%s %s row %lld: %.9g != ref %.9g",
                                                 mo_simd_name(k->level), mo_type_name(type),
                                                 (long long)r, y[r], ref);
                                assert_true(ref == floorf(ref));
                        }
                }
                free(w);
                free(a);
        }
}

/* The VNNI build of the AVX-512 kernels groups the same four products per
 * integer lane as the plain build, so the two agree bit for bit. */
static void avx512_vnni_kernels_equal_plain_avx512_bits(void **state)
{
        struct mo_cpu_kernels plain, vnni;

        if (mo_cpu_simd_max() < MO_SIMD_AVX512 || !mo_cpu_has_vnni())
                skip(); /* reported by cmocka as skipped, with this CPU */
        mo_cpu_kernels_avx512(&plain);
        mo_cpu_kernels_avx512_vnni(&vnni);
        for (size_t i = 0; i < N_TYPES; i++) {
                int type = weight_types[i];
                int64_t n = block_of(type) == 1 ? 100 : 5 * block_of(type) * (block_of(type) == 32 ? 3 : 1);
                /* 19 columns: past every batch kernel's threshold in the VNNI build. */
                int64_t nr = 7, nc = 19;
                float *x = malloc(sizeof(float) * (size_t)(nc * n));
                float y1[7 * 19], y2[7 * 19];
                size_t as;
                void *q;
                struct tw t;

                assert_non_null(x);
                tw_make(&t, type, nr, n, 0, 300 + i);
                tu_randf(x, (size_t)(nc * n), 301 + i);
                q = quantize_acts(type, x, nc, n, &as);
                plain.gemm[type](n, t.data, t.w.row_bytes, nr, q, as, nc, y1, nr);
                vnni.gemm[type](n, t.data, t.w.row_bytes, nr, q, as, nc, y2, nr);
                if (memcmp(y1, y2, sizeof y1))
                        fail_msg("%s: VNNI and plain AVX-512 differ", mo_type_name(type));
                free(q);
                free(x);
                tw_free(&t);
        }
}

/* Every kernel sums each output in one order whatever the number of
 * activation rows it gets at once, so column c of a wide call has the bits
 * of column c alone. The sizes cross every boundary the AVX-512 Q8_0 and
 * Q4_K kernels have: the row kernels below 8 columns and the weight
 * lanes' chunks of 4 columns and tiles of 16 rows above, a last group of
 * 16 blocks (Q8_0) or 4 super-blocks (K-quants) that is partial; and short
 * rows: Q8_0 rows of fewer than 16 blocks, which have their own loop, and
 * K-quant rows of two super-blocks, which go in pairs. */
static void gemm_bits_do_not_depend_on_column_count(void **state)
{
        const int64_t ncs[] = { 2, 3, 7, 8, 9, 12, 13, 15, 16, 22, 23, 31, 33 };
        const int64_t nr = 131;

        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                for (size_t i = 0; i < 2 * N_TYPES; i++) {
                        int type = weight_types[i / 2];
                        bool longer = i % 2 == 0;
                        int64_t b = block_of(type);
                        int64_t n = b == 32 ? (longer ? 37 : 12) * 32 : b == 1 ? (longer ? 300 : 40) : (longer ? 9 : 2) * b;
                        int64_t mc = ncs[ARRAY_SIZE(ncs) - 1];
                        float *y = malloc(sizeof(float) * (size_t)(mc * nr)), *y1 = malloc(sizeof(float) * (size_t)nr);
                        size_t as;
                        struct tw t;
                        void *q = gemm_inputs(&t, type, nr, n, mc, 600 + i, &as);

                        assert_non_null(y);
                        assert_non_null(y1);
                        for (size_t j = 0; j < ARRAY_SIZE(ncs); j++) {
                                int64_t nc = ncs[j];

                                k->gemm[type](n, t.data, t.w.row_bytes, nr, q, as, nc, y, nr);
                                for (int64_t c = 0; c < nc; c++) {
                                        k->gemm[type](n, t.data, t.w.row_bytes, nr, (const uint8_t *)q + c * as,
                                                      as, 1, y1, nr);
                                        if (memcmp(y1, y + c * nr, sizeof(float) * (size_t)nr))
                                                fail_msg("%s %s, rows of %lld: column %lld of %lld differs from it alone",
                                                         mo_simd_name(k->level), mo_type_name(type), (long long)n,
                                                         (long long)c, (long long)nc);
                                }
                        }
                        free(q);
                        free(y);
                        free(y1);
                        tw_free(&t);
                }
        }
}

/* The Q8_0 kernels' fixed order (dot-avx512-q8.h), computed here one
 * block at a time: block b's exact integer dot goes into chain
 * (b % 16) / 4 as fma(idot, d_w * d_x, acc), and y = (c0 + c1) + (c2 + c3). */
static float q8_0_fixed_order(const block_q8_0 *w, const block_q8_0 *x, int64_t nb)
{
        float acc[4] = { 0, 0, 0, 0 };

        for (int64_t b = 0; b < nb; b++) {
                int idot = 0;

                for (int i = 0; i < QK8_0; i++)
                        idot += w[b].qs[i] * x[b].qs[i];
                acc[b % 16 / 4] = fmaf((float)idot, mo_half_to_float(w[b].d) * mo_half_to_float(x[b].d),
                                       acc[b % 16 / 4]);
        }
        return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* Every Q8_0 kernel of the AVX-512 level (the row kernel, the weight lanes
 * on short rows and on full ones, whose chains are kept between groups and
 * whose columns go 64 at a time) sums in that order, bit for bit, at any
 * column count: the kernels agree with each other only because each keeps
 * it. */
static void q8_0_avx512_sums_follow_the_fixed_order(void **state)
{
        const int64_t nbs[] = { 2, 12, 16, 37 }, ncs[] = { 1, 3, 7, 8, 16, 17, 33, 70 };
        const int64_t nr = 37;
        const struct mo_cpu_kernels *k = mo_cpu_kernels_at(MO_SIMD_AVX512);

        if (!k)
                skip(); /* reported as skipped: this CPU has no AVX-512 */
        for (size_t i = 0; i < ARRAY_SIZE(nbs); i++) {
                int64_t n = nbs[i] * QK8_0, mc = ncs[ARRAY_SIZE(ncs) - 1];
                float *y = malloc(sizeof(float) * (size_t)(mc * nr));
                size_t as;
                struct tw t;
                void *q = gemm_inputs(&t, MO_TYPE_Q8_0, nr, n, mc, 700 + i, &as);

                assert_non_null(y);
                for (size_t j = 0; j < ARRAY_SIZE(ncs); j++) {
                        k->gemm[MO_TYPE_Q8_0](n, t.data, t.w.row_bytes, nr, q, as, ncs[j], y, nr);
                        for (int64_t c = 0; c < ncs[j]; c++)
                                for (int64_t r = 0; r < nr; r++) {
                                        float want = q8_0_fixed_order((const block_q8_0 *)(t.data + r * t.w.row_bytes),
                                                                      (const block_q8_0 *)((const uint8_t *)q + c * as),
                                                                      nbs[i]);

                                        if (memcmp(&want, &y[c * nr + r], sizeof want))
                                                fail_msg("%lld blocks, %lld columns: row %lld column %lld is %.9g, "
                                                         "the fixed order gives %.9g", (long long)nbs[i],
                                                         (long long)ncs[j], (long long)r, (long long)c,
                                                         y[c * nr + r], want);
                                }
                }
                free(q);
                free(y);
                tw_free(&t);
        }
}

/* Rows with ties at .5 after scaling, +/- maxima of equal size in either
 * order, zero and tiny blocks, NaN and infinity, and plain random data. */
static void fill_quant_cases(float *x, int64_t n)
{
        tu_randf(x, (size_t)n, 71);
        for (int64_t k = 0; k < 256; k++) /* max 127: scale 1, ties exact */
                x[k] = k == 3 ? 127.0f : (float)((k % 23) - 11) + (k % 2 ? 0.5f : 0.0f);
        for (int64_t k = 256; k < 512; k++) /* -127 first, then +127 */
                x[k] = k == 300 ? -127.0f : k == 400 ? 127.0f : (float)(k % 9) - 4.5f;
        for (int64_t k = 512; k < 768; k++) /* +127 first, then -127 */
                x[k] = k == 520 ? 127.0f : k == 530 ? -127.0f : (float)(k % 7) - 3.5f;
        for (int64_t k = 768; k < 1024; k++)
                x[k] = 0.0f;
        for (int64_t k = 1024; k < 1280; k++)
                x[k] = (float)(k % 5) * 1e-41f; /* subnormal */
        x[1300] = NAN;
        x[1600] = INFINITY;
        x[1900] = -INFINITY;
        for (int64_t k = 2048; k < n; k++)
                x[k] *= 1000.0f;
}

static void activation_quantizers_match_reference_bit_for_bit(void **state)
{
        const int64_t n = 4096;
        float *x = malloc(sizeof(float) * n);
        block_q8_0 *a0 = malloc(sizeof(block_q8_0) * (n / QK8_0));
        block_q8_0 *b0 = malloc(sizeof(block_q8_0) * (n / QK8_0));
        block_q8_k *ak = malloc(sizeof(block_q8_k) * (n / QK_K));
        block_q8_k *bk = malloc(sizeof(block_q8_k) * (n / QK_K));

        assert_non_null(x);
        assert_non_null(a0);
        assert_non_null(b0);
        assert_non_null(ak);
        assert_non_null(bk);
        fill_quant_cases(x, n);
        mo_quantize_row_q8_0(x, a0, n);
        mo_quantize_row_q8_k(x, ak, n);
        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                memset(b0, 0x55, sizeof(block_q8_0) * (n / QK8_0));
                memset(bk, 0x55, sizeof(block_q8_k) * (n / QK_K));
                k->quant_q8_0(x, b0, n);
                k->quant_q8_k(x, bk, n);
                for (int64_t b = 0; b < n / QK8_0; b++)
                        if (memcmp(&a0[b], &b0[b], sizeof *b0))
                                fail_msg("%s q8_0 block %lld differs", mo_simd_name(l), (long long)b);
                for (int64_t b = 0; b < n / QK_K; b++)
                        if (memcmp(&ak[b], &bk[b], sizeof *bk))
                                fail_msg("%s q8_k block %lld differs", mo_simd_name(l), (long long)b);
        }
        free(x);
        free(a0);
        free(b0);
        free(ak);
        free(bk);
}

/* ---- matmul ------------------------------------------------------------------ */

/* Error of the activation rounding alone (Q8_0 / Q8_K keep ~7 bits of each
 * value relative to its block maximum), measured against exact math with
 * the original F32 activations. */
static double matmul_tol(int type)
{
        switch (mo_vec_dot_type(type)) {
        case MO_TYPE_F32:
                return 1e-6;
        default:
                return 1e-2;
        }
}

static void matmul_case(int level, int type, int64_t nrows, int64_t ncols, int64_t m,
                        uint64_t seed)
{
        struct tw t;
        float *x = malloc(sizeof(float) * (size_t)(m * ncols));
        float *y[MAX_THREADS], *ref = malloc(sizeof(float) * (size_t)(m * nrows));
        size_t as;
        void *q;

        assert_non_null(x);
        assert_non_null(ref);
        tw_make(&t, type, nrows, ncols, seed % 2 ? 64 : 0, seed);
        tu_randf(x, (size_t)(m * ncols), seed + 3);
        for (int th = 0; th < MAX_THREADS; th++) {
                y[th] = malloc(sizeof(float) * (size_t)(m * nrows));
                assert_non_null(y[th]);
                be(level, th + 1)->ops->matmul(be(level, th + 1), &t.w, x, ncols, y[th], nrows, m);
        }
        /* 1, 2 and 3 threads: the same bits. */
        for (int th = 1; th < MAX_THREADS; th++)
                if (memcmp(y[0], y[th], sizeof(float) * (size_t)(m * nrows)))
                        fail_msg("%s %s m=%lld: %d threads differ from 1", mo_simd_name(level),
                                 mo_type_name(type), (long long)m, th + 1);
        /* Against dequantized weights and the original activations. */
        for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < nrows; r++) {
                        double s = 0;

                        for (int64_t k = 0; k < ncols; k++)
                                s += (double)t.deq[r * ncols + k] * x[i * ncols + k];
                        ref[i * nrows + r] = (float)s;
                }
        {
                double err = tu_rel_err(y[0], ref, (size_t)(m * nrows));

                if (err > matmul_tol(type))
                        fail_msg("%s %s %lldx%lld m=%lld: rel err %g > %g", mo_simd_name(level),
                                 mo_type_name(type), (long long)nrows, (long long)ncols,
                                 (long long)m, err, matmul_tol(type));
        }
        /* Tightly against the reference dot of the quantized activations. */
        q = quantize_acts(type, x, m, ncols, &as);
        for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < nrows; r++) {
                        const void *ar = (const uint8_t *)q + i * as;
                        float rd = mo_vec_dot_ref(type, ncols, t.data + r * t.w.row_bytes, ar);
                        double mag = dot_magnitude(type, t.deq + r * ncols, ar, ncols);

                        if (fabs((double)y[0][i * nrows + r] - rd) > REF_TOL * mag)
                                fail_msg("%s %s m=%lld y[%lld][%lld] = %.9g, ref dot %.9g",
                                         mo_simd_name(level), mo_type_name(type), (long long)m,
                                         (long long)i, (long long)r, y[0][i * nrows + r], rd);
                }
        free(q);
        for (int th = 0; th < MAX_THREADS; th++)
                free(y[th]);
        free(ref);
        free(x);
        tw_free(&t);
}

static void matmul_matches_reference_for_every_type_level_and_batch(void **state)
{
        const int64_t ms[] = { 1, 2, 3, 7, 33, 129 };

        for (int l = 0; l < n_levels(); l++)
                for (size_t i = 0; i < N_TYPES; i++) {
                        int type = weight_types[i];
                        int64_t b = block_of(type) == 1 ? 32 : block_of(type);

                        for (size_t j = 0; j < ARRAY_SIZE(ms); j++) {
                                /* Rows not a multiple of the 4-row tile, one,
                                 * two and three blocks of columns. */
                                int64_t ncols = j % 2 ? b : j % 4 ? 2 * b : 3 * b;
                                int64_t nrows = ms[j] > 33 ? 13 : 37;

                                matmul_case(l, type, nrows, ncols, ms[j], 1000 + i * 10 + j);
                        }
                }
}

/* Large enough that every thread gets tasks and prefill tiling kicks in. */
static void matmul_splits_large_weights_without_changing_bits(void **state)
{
        for (int l = 0; l < n_levels(); l++) {
                matmul_case(l, MO_TYPE_Q4_K, 301, 1024, 1, 77);
                matmul_case(l, MO_TYPE_Q8_0, 301, 1024, 70, 78);
                matmul_case(l, MO_TYPE_F16, 150, 520, 9, 79);
        }
}

/* A batch row equals the same row computed alone (decode and prefill agree),
 * and strided rows leave the gaps alone. */
static void matmul_batch_rows_equal_single_rows_with_strides(void **state)
{
        const int64_t nrows = 21, xs = 600, ys = 40, m = 11;

        for (int l = 0; l < n_levels(); l++)
                for (size_t i = 0; i < N_TYPES; i++) {
                        int type = weight_types[i];
                        int64_t ncols = block_of(type) == 1 ? 333 : 512;
                        float *x = malloc(sizeof(float) * (size_t)(m * xs));
                        float *yb = malloc(sizeof(float) * (size_t)(m * ys));
                        float y1[21];
                        struct tw t;

                        assert_non_null(x);
                        assert_non_null(yb);
                        tw_make(&t, type, nrows, ncols, 0, 500 + i);
                        tu_randf(x, (size_t)(m * xs), 501 + i);
                        for (int64_t k = 0; k < m * ys; k++)
                                yb[k] = -12345.0f;
                        be(l, 2)->ops->matmul(be(l, 2), &t.w, x, xs, yb, ys, m);
                        for (int64_t r = 0; r < m; r++) {
                                be(l, 2)->ops->matmul(be(l, 2), &t.w, x + r * xs, xs, y1, nrows, 1);
                                assert_memory_equal(y1, yb + r * ys, sizeof y1);
                                for (int64_t k = nrows; k < ys; k++)
                                        assert_true(yb[r * ys + k] == -12345.0f);
                        }
                        tw_free(&t);
                        free(x);
                        free(yb);
                }
}

/* matmul_many gives each job the bits of its own matmul call: jobs of every
 * type, pairs sharing an x (converted once), an F32 job between them, an
 * empty job, batch sizes from 1 to 9, over every level and thread count. */
static void matmul_many_equals_one_matmul_per_job(void **state)
{
        enum { J = 2 * N_TYPES + 2 };
        const int64_t ncols = 512, xs = 520;
        struct tw t[J];
        mo_matmul_job jobs[J];
        float *x = malloc(sizeof(float) * 9 * xs), *ym[J], *y1;

        assert_non_null(x);
        tu_randf(x, 9 * xs, 900);
        for (int i = 0; i < J; i++) {
                int type = i < J - 2 ? weight_types[i / 2] : MO_TYPE_F32;
                int64_t nrows = 3 + 7 * i % 29, m = i == J - 1 ? 0 : 1 + i / 2 % 8;

                tw_make(&t[i], type, nrows, ncols, 0, 901 + i);
                ym[i] = malloc(sizeof(float) * (size_t)(9 * nrows));
                /* Jobs 2k and 2k+1 read the same x (the F32 pair: rows 0
                 * and 1 of it). */
                jobs[i] = (mo_matmul_job){ &t[i].w, x + (type == MO_TYPE_F32 ? i % 2 : 0) * xs, xs,
                                           ym[i], nrows, m };
        }
        y1 = malloc(sizeof(float) * 9 * 32);
        for (int l = 0; l < n_levels(); l++)
                for (int th = 1; th <= 3; th++) {
                        for (int i = 0; i < J; i++)
                                for (int64_t k = 0; k < 9 * t[i].w.nrows; k++)
                                        ym[i][k] = -7.0f;
                        be(l, th)->ops->matmul_many(be(l, th), jobs, J);
                        for (int i = 0; i < J; i++) {
                                size_t bytes = sizeof(float) * (size_t)(jobs[i].m * t[i].w.nrows);

                                be(l, th)->ops->matmul(be(l, th), &t[i].w, jobs[i].x, xs, y1,
                                                       t[i].w.nrows, jobs[i].m);
                                if (bytes && memcmp(y1, ym[i], bytes))
                                        fail_msg("%s, %d threads, job %d (%s, m=%lld) differs",
                                                 mo_simd_name((enum mo_simd)l), th, i,
                                                 mo_type_name(t[i].w.type), (long long)jobs[i].m);
                                assert_true(ym[i][jobs[i].m * t[i].w.nrows] == -7.0f);
                        }
                }
        for (int i = 0; i < J; i++) {
                tw_free(&t[i]);
                free(ym[i]);
        }
        free(y1);
        free(x);
}

/* One job that cannot run poisons every job's output and runs none. */
static void matmul_many_rejects_a_bad_job_with_nan_everywhere(void **state)
{
        uint8_t data[20 * 4] = {0};
        mo_weight bad = { .type = MO_TYPE_Q4_1, .ncols = 32, .nrows = 4, .row_bytes = 20,
                          .data = data };
        struct tw good;
        float x[32] = {0}, y[2][4] = {{0}};
        mo_matmul_job jobs[2] = { { &good.w, x, 32, y[0], 4, 1 }, { &bad, x, 32, y[1], 4, 1 } };

        tw_make(&good, MO_TYPE_Q8_0, 4, 32, 0, 950);
        be(0, 1)->ops->matmul_many(be(0, 1), jobs, 2);
        for (int i = 0; i < 4; i++)
                assert_true(isnan(y[0][i]) && isnan(y[1][i]));
        tw_free(&good);
}

static void matmul_rejects_uncomputable_type_with_nan(void **state)
{
        uint8_t data[20 * 4] = {0};
        mo_weight w = { .type = MO_TYPE_Q4_1, .ncols = 32, .nrows = 4, .row_bytes = 20,
                        .data = data };
        float x[32] = {0}, y[4] = {0};

        be(0, 1)->ops->matmul(be(0, 1), &w, x, 32, y, 4, 1);
        for (int i = 0; i < 4; i++)
                assert_true(isnan(y[i]));
}

/* ---- get_rows ------------------------------------------------------------------ */

static void get_rows_dequantizes_the_chosen_rows(void **state)
{
        const int32_t ids[] = { 5, 0, 5, 11, 3 };

        for (size_t i = 0; i < N_TYPES; i++) {
                int type = weight_types[i];
                int64_t ncols = block_of(type) == 1 ? 70 : 512;
                float *y = malloc(sizeof(float) * (size_t)(5 * ncols));
                struct tw t;

                assert_non_null(y);
                tw_make(&t, type, 12, ncols, 32, 900 + i);
                be(0, 2)->ops->get_rows(be(0, 2), &t.w, ids, 5, y);
                for (int k = 0; k < 5; k++)
                        assert_memory_equal(y + k * ncols, t.deq + ids[k] * ncols,
                                            sizeof(float) * (size_t)ncols);
                tw_free(&t);
                free(y);
        }
}

/* ---- rmsnorm, rope, swiglu, add ---------------------------------------------------- */

static void rmsnorm_matches_reference_in_place_and_strided(void **state)
{
        const int64_t n = 300, m = 9, xs = 320, ys = 310;
        float *x = malloc(sizeof(float) * (size_t)(m * xs)), g[300];
        float *y = malloc(sizeof(float) * (size_t)(m * ys)), *ref = malloc(sizeof(float) * (size_t)(m * n));
        float *yc = malloc(sizeof(float) * (size_t)(m * n));

        assert_non_null(x);
        assert_non_null(y);
        assert_non_null(ref);
        assert_non_null(yc);
        tu_randf(x, (size_t)(m * xs), 11);
        tu_randf(g, (size_t)n, 12);
        for (int64_t i = 0; i < m; i++) {
                double ss = 0;

                for (int64_t k = 0; k < n; k++)
                        ss += (double)x[i * xs + k] * x[i * xs + k];
                for (int64_t k = 0; k < n; k++)
                        ref[i * n + k] = (float)(x[i * xs + k] / sqrt(ss / n + 1e-5) * g[k]);
        }
        be(0, 3)->ops->rmsnorm(be(0, 3), x, xs, g, n, m, 1e-5f, y, ys);
        for (int64_t i = 0; i < m; i++) {
                memcpy(yc + i * n, y + i * ys, sizeof(float) * (size_t)n);
                assert_true(tu_rel_err(yc + i * n, ref + i * n, (size_t)n) < 1e-6);
        }
        be(0, 2)->ops->rmsnorm(be(0, 2), x, xs, g, n, m, 1e-5f, x, xs);
        for (int64_t i = 0; i < m; i++)
                assert_memory_equal(x + i * xs, yc + i * n, sizeof(float) * (size_t)n);
        free(x);
        free(y);
        free(ref);
        free(yc);
}

static void rope_rotates_adjacent_pairs_by_hand(void **state)
{
        /* Two pairs at position 2 with frequencies 1 and 0.25: angles 2 and
         * 0.5; magnitude 2; the fifth value lies beyond n_dims. */
        const float freq[] = { 1.0f, 0.25f };
        const mo_rope r = { .n_dims = 4, .freq = freq, .mscale = 2.0f };
        const int32_t pos[] = { 2 };
        float x[5] = { 1, 0, 0, 1, 7 };
        float want[5] = { 2 * cosf(2), 2 * sinf(2), -2 * sinf(0.5f), 2 * cosf(0.5f), 7 };

        be(0, 1)->ops->rope(be(0, 1), x, 1, 1, 5, 5, pos, &r);
        for (int i = 0; i < 5; i++)
                assert_float_equal(x[i], want[i], 1e-6);
}

static void rope_matches_reference_for_heads_and_positions(void **state)
{
        const int64_t m = 5, n_head = 3, dims = 16, hs = 24, rs = 80;
        float freq[8], *x = malloc(sizeof(float) * (size_t)(m * rs)), *orig;
        const int32_t pos[] = { 0, 1, 17, 4095, 100000 };
        mo_rope r = { .n_dims = dims, .freq = freq, .mscale = 1.25f };

        assert_non_null(x);
        for (int p = 0; p < 8; p++)
                freq[p] = powf(10000.0f, -2.0f * p / dims);
        tu_randf(x, (size_t)(m * rs), 21);
        orig = malloc(sizeof(float) * (size_t)(m * rs));
        assert_non_null(orig);
        memcpy(orig, x, sizeof(float) * (size_t)(m * rs));
        be(1 < n_levels() ? 1 : 0, 2)->ops->rope(be(1 < n_levels() ? 1 : 0, 2), x, m, n_head, rs, hs, pos, &r);
        for (int64_t i = 0; i < m; i++)
                for (int64_t k = 0; k < rs; k++) {
                        int64_t h = k / hs, o = k % hs;
                        double want = orig[i * rs + k];

                        if (h < n_head && o < dims) {
                                double th = (double)(float)((float)pos[i] * freq[o / 2]);
                                double x0 = orig[i * rs + h * hs + (o & ~1)];
                                double x1 = orig[i * rs + h * hs + (o | 1)];

                                want = 1.25 * (o % 2 ? x0 * sin(th) + x1 * cos(th)
                                                     : x0 * cos(th) - x1 * sin(th));
                        }
                        assert_float_equal(x[i * rs + k], want, 2e-5);
                }
        free(x);
        free(orig);
}

static void swiglu_and_add_match_reference_and_allow_aliasing(void **state)
{
        const int64_t n = 100003; /* large enough to be split among threads */
        float *g = malloc(sizeof(float) * n), *u = malloc(sizeof(float) * n);
        float *o = malloc(sizeof(float) * n), *g2 = malloc(sizeof(float) * n);

        assert_non_null(g);
        assert_non_null(u);
        assert_non_null(o);
        assert_non_null(g2);
        tu_randf(g, n, 31);
        tu_randf(u, n, 32);
        for (int64_t k = 0; k < n; k++)
                g[k] *= 12; /* reach the tails of silu */
        /* and the ends of e^x: past FLT_MAX, into the denormals, beyond both */
        g[0] = 88.5f, g[1] = -88.5f, g[2] = 100.0f, g[3] = -100.0f, g[4] = 1e30f, g[5] = -1e30f;
        for (int l = 0; l < n_levels(); l++) {
                memcpy(g2, g, sizeof(float) * n);
                be(l, 3)->ops->swiglu(be(l, 3), g, u, o, n);
                for (int64_t k = 0; k < n; k++) {
                        double want = g[k] / (1 + exp(-(double)g[k])) * u[k];

                        if (!(fabs(o[k] - want) <= 1e-6 * (fabs(want) + 1e-3)))
                                fail_msg("%s: swiglu(%g, %g) = %.9g, want %.9g", mo_simd_name((enum mo_simd)l),
                                         g[k], u[k], o[k], want);
                }
                /* Two threads cut the range elsewhere; out aliases gate. */
                be(l, 2)->ops->swiglu(be(l, 2), g2, u, g2, n);
                assert_memory_equal(g2, o, sizeof(float) * n);
        }
        memcpy(g2, u, sizeof(float) * n);
        be(0, 3)->ops->add(be(0, 3), g2, g, n);
        for (int64_t k = 0; k < n; k++)
                assert_true(g2[k] == u[k] + g[k]);
        free(g);
        free(u);
        free(o);
        free(g2);
}

/* e^x through the softmax kernel of every level: within 2 ulp of the true
 * value from the largest float result down into the denormals, exactly
 * 0 below them, 1 at the maximum, NaN for NaN; the sum that of the
 * results. */
static void softmax_exp_is_within_two_ulp_at_every_level(void **state)
{
        enum { N = 4099 };
        float *x = malloc(sizeof(float) * N), *s = malloc(sizeof(float) * N);

        assert_non_null(x);
        assert_non_null(s);
        /* x - max spans [-110, 0]: below e^-103.97, half the least denormal. */
        for (int i = 0; i < N; i++)
                x[i] = -110.0f * (float)i / (N - 1) + 88.5f;
        x[N / 2] = 88.5f;
        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);
                double sum = 0;
                float got;

                memcpy(s, x, sizeof(float) * N);
                got = k->softmax(s, N, 1.0f);
                for (int i = 0; i < N; i++) {
                        double want = exp((double)x[i] - 88.5);
                        double ulp = want < 0x1p-126 ? 0x1p-149 : ldexp(1.0, ilogb(want) - 23);

                        sum += s[i];
                        if (!(fabs(s[i] - want) <= 2 * ulp))
                                fail_msg("%s: e^%.9g = %.9g, want %.9g", mo_simd_name((enum mo_simd)l),
                                         (double)x[i] - 88.5, s[i], want);
                }
                if (!(s[0] == 1.0f && s[N / 2] == 1.0f && s[N - 1] == 0.0f))
                        fail_msg("%s: %g %g %g", mo_simd_name((enum mo_simd)l), s[0], s[N / 2], s[N - 1]);
                /* The bound of float summation of N positive terms. */
                assert_true(fabs(got - sum) <= N * 0x1p-24 * sum);

                /* Scaled scores, and e^x of the largest float results. */
                for (int i = 0; i < 64; i++)
                        s[i] = (float)i;
                got = k->softmax(s, 64, 1.375f);
                for (int i = 0; i < 64; i++)
                        assert_true(fabs(s[i] - exp(1.375 * i - 1.375 * 63)) <= 2 * ldexp(1.0, ilogb(s[i]) - 23));
                s[0] = NAN;
                s[1] = 0.0f;
                k->softmax(s, 2, 1.0f);
                assert_true(isnan(s[0]));
        }
        free(x);
        free(s);
}

/* Where an element falls, in the vector body or the masked tail, does not
 * change its bits. Enough elements that libm's expf, in a tail written
 * as a scalar loop, would differ somewhere. */
static void swiglu_bits_do_not_depend_on_position(void **state)
{
        enum { N = 3001 };
        static float g[N], u[N], all[N], part[N];

        tu_randf(g, N, 41);
        tu_randf(u, N, 42);
        for (int i = 0; i < N; i++)
                g[i] *= 30;
        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                k->swiglu(g, u, all, N);
                for (int off = 1; off < 17; off++) {
                        k->swiglu(g + off, u + off, part, N - off);
                        if (memcmp(part, all + off, sizeof(float) * (N - off)))
                                fail_msg("%s: swiglu from element %d differs", mo_simd_name((enum mo_simd)l), off);
                }
        }
}

/* The attention's weighted sum of cached rows at every level: against a
 * double reference, with a row length, a head count and a token count
 * that fill no vector or block evenly, and the same bits whether the
 * tokens come in one call or several. */
static void mix_rows_match_reference_and_cut_anywhere(void **state)
{
        enum { G = 6, NT = 19, N = 37, PS = 23, OS = 41 };
        float p[G * PS], rows_data[NT * 40], out[G * OS], out2[G * OS];
        const float *rows[NT];

        tu_randf(p, G * PS, 51);
        tu_randf(rows_data, NT * 40, 52);
        for (int t = 0; t < NT; t++)
                rows[t] = rows_data + (NT - 1 - t) * 40; /* out of memory order, as blocks are */
        for (int l = 0; l < n_levels(); l++) {
                const struct mo_cpu_kernels *k = mo_cpu_kernels_at((enum mo_simd)l);

                tu_randf(out, G * OS, 53);
                memcpy(out2, out, sizeof out);
                k->mix_rows(G, NT, p, PS, rows, N, out, OS);
                for (int h = 0; h < G; h++)
                        for (int i = 0; i < N; i++) {
                                double want = out2[h * OS + i];

                                for (int t = 0; t < NT; t++)
                                        want += (double)p[h * PS + t] * rows[t][i];
                                if (!(fabs(out[h * OS + i] - want) <= 1e-5 * (1 + fabs(want))))
                                        fail_msg("%s: head %d value %d: %g, want %g", mo_simd_name((enum mo_simd)l),
                                                 h, i, out[h * OS + i], want);
                        }
                /* Beyond each row's N values nothing is written. */
                for (int h = 0; h < G; h++)
                        for (int i = N; i < OS; i++)
                                assert_true(out[h * OS + i] == out2[h * OS + i]);
                k->mix_rows(G, 5, p, PS, rows, N, out2, OS);
                k->mix_rows(G, NT - 5, p + 5, PS, rows + 5, N, out2, OS);
                tu_randf(out, G * OS, 53);
                k->mix_rows(G, NT, p, PS, rows, N, out, OS);
                if (memcmp(out, out2, sizeof out))
                        fail_msg("%s: tokens cut at 5 change the sums", mo_simd_name((enum mo_simd)l));
        }
}

/* ---- gather / scatter -------------------------------------------------------------- */

static void gather_rows_copies_the_named_rows(void **state)
{
        float src[6 * 10], dst[4 * 10];
        const int32_t rows[] = { 5, 0, 5, 2 };

        tu_randf(src, ARRAY_SIZE(src), 41);
        be(0, 2)->ops->gather_rows(be(0, 2), src, 10, rows, 4, dst);
        for (int i = 0; i < 4; i++)
                assert_memory_equal(dst + i * 10, src + rows[i] * 10, sizeof(float) * 10);
}

static void scatter_add_accumulates_repeated_rows_in_order(void **state)
{
        const int64_t dim = 70000, n = 6; /* wide enough to split columns */
        const int32_t rows[] = { 2, 0, 2, 2, 1, 0 };
        const float w[] = { 0.5f, -1.0f, 0.25f, 3.0f, 1.0f, 2.0f };
        float *src = malloc(sizeof(float) * (size_t)(n * dim));
        float *d1 = malloc(sizeof(float) * (size_t)(3 * dim)), *d3 = malloc(sizeof(float) * (size_t)(3 * dim));

        assert_non_null(src);
        assert_non_null(d1);
        assert_non_null(d3);
        tu_randf(src, (size_t)(n * dim), 51);
        tu_randf(d1, (size_t)(3 * dim), 52);
        memcpy(d3, d1, sizeof(float) * (size_t)(3 * dim));
        {
                float *want = malloc(sizeof(float) * (size_t)(3 * dim));

                assert_non_null(want);
                memcpy(want, d1, sizeof(float) * (size_t)(3 * dim));
                for (int64_t i = 0; i < n; i++)
                        for (int64_t k = 0; k < dim; k++)
                                want[rows[i] * dim + k] += w[i] * src[i * dim + k];
                be(0, 1)->ops->scatter_add_rows(be(0, 1), src, dim, rows, w, n, d1);
                be(0, 3)->ops->scatter_add_rows(be(0, 3), src, dim, rows, w, n, d3);
                assert_memory_equal(d1, want, sizeof(float) * (size_t)(3 * dim));
                assert_memory_equal(d3, want, sizeof(float) * (size_t)(3 * dim));
                free(want);
        }
        free(src);
        free(d1);
        free(d3);
}

/* ---- MLA attention ------------------------------------------------------------------- */

struct mla_case {
        int64_t n_q, n_head, kv_lora, rope, block_tokens, pos0;
};

static void mla_check(const struct mla_case *mc, uint64_t seed)
{
        const int64_t width = mc->kv_lora + mc->rope, n_tok = mc->pos0 + mc->n_q;
        const int64_t n_blocks = (n_tok + mc->block_tokens - 1) / mc->block_tokens;
        const int64_t n_phys = n_blocks + 2;
        float *tok = malloc(sizeof(float) * (size_t)(n_tok * width)); /* logical rows */
        float *kv = malloc(sizeof(float) * (size_t)(n_phys * mc->block_tokens * width));
        size_t qn = (size_t)(mc->n_q * mc->n_head);
        float *ql = malloc(sizeof(float) * qn * (size_t)mc->kv_lora);
        float *qp = malloc(sizeof(float) * qn * (size_t)mc->rope);
        float *out[MAX_THREADS], *ref = malloc(sizeof(float) * qn * (size_t)mc->kv_lora);
        int32_t *table = malloc(sizeof(int32_t) * (size_t)n_blocks);
        double *sc = malloc(sizeof(double) * (size_t)n_tok);
        mo_mla_args a = { .n_q = mc->n_q, .n_head = mc->n_head, .kv_lora = mc->kv_lora,
                          .rope = mc->rope, .block_tokens = mc->block_tokens, .pos0 = mc->pos0,
                          .scale = 1.0f / sqrtf((float)(mc->kv_lora + mc->rope)) };

        assert_non_null(tok);
        assert_non_null(kv);
        assert_non_null(ql);
        assert_non_null(qp);
        assert_non_null(ref);
        assert_non_null(table);
        assert_non_null(sc);
        tu_randf(tok, (size_t)(n_tok * width), seed);
        tu_randf(ql, qn * (size_t)mc->kv_lora, seed + 1);
        tu_randf(qp, qn * (size_t)mc->rope, seed + 2);
        for (size_t k = 0; k < qn * (size_t)mc->kv_lora; k++)
                ql[k] *= 3; /* peaky enough that the softmax is not flat */
        /* Physical blocks in a scrambled order, with unused blocks of junk. */
        tu_randf(kv, (size_t)(n_phys * mc->block_tokens * width), seed + 3);
        for (int64_t b = 0; b < n_blocks; b++)
                table[b] = (int32_t)((b * 5 + 3) % n_phys);
        for (int64_t b = 0; b < n_blocks; b++)
                for (int64_t b2 = 0; b2 < b; b2++)
                        assert_int_not_equal(table[b], table[b2]);
        for (int64_t j = 0; j < n_tok; j++)
                memcpy(kv + (table[j / mc->block_tokens] * mc->block_tokens + j % mc->block_tokens) * width,
                       tok + j * width, sizeof(float) * (size_t)width);
        a.q_lat = ql;
        a.q_pe = qp;
        a.kv = kv;
        a.block_table = table;
        for (int64_t i = 0; i < mc->n_q; i++)
                for (int64_t h = 0; h < mc->n_head; h++) {
                        const float *qli = ql + (i * mc->n_head + h) * mc->kv_lora;
                        const float *qpi = qp + (i * mc->n_head + h) * mc->rope;
                        int64_t vis = mc->pos0 + i + 1;
                        double mx = -INFINITY, sum = 0;

                        for (int64_t j = 0; j < vis; j++) {
                                double s = 0;

                                for (int64_t k = 0; k < mc->kv_lora; k++)
                                        s += (double)qli[k] * tok[j * width + k];
                                for (int64_t k = 0; k < mc->rope; k++)
                                        s += (double)qpi[k] * tok[j * width + mc->kv_lora + k];
                                sc[j] = s * a.scale;
                                mx = fmax(mx, sc[j]);
                        }
                        for (int64_t j = 0; j < vis; j++)
                                sum += (sc[j] = exp(sc[j] - mx));
                        for (int64_t k = 0; k < mc->kv_lora; k++) {
                                double o = 0;

                                for (int64_t j = 0; j < vis; j++)
                                        o += sc[j] * tok[j * width + k];
                                ref[(i * mc->n_head + h) * mc->kv_lora + k] = (float)(o / sum);
                        }
                }
        for (int l = 0; l < n_levels(); l++) {
                for (int th = 0; th < MAX_THREADS; th++) {
                        out[th] = malloc(sizeof(float) * qn * (size_t)mc->kv_lora);
                        assert_non_null(out[th]);
                        a.out_lat = out[th];
                        be(l, th + 1)->ops->mla_attn(be(l, th + 1), &a);
                }
                assert_true(tu_rel_err(out[0], ref, qn * (size_t)mc->kv_lora) < 2e-5);
                for (int th = 1; th < MAX_THREADS; th++)
                        assert_memory_equal(out[0], out[th], sizeof(float) * qn * (size_t)mc->kv_lora);
                for (int th = 0; th < MAX_THREADS; th++)
                        free(out[th]);
        }
        free(tok);
        free(kv);
        free(ql);
        free(qp);
        free(ref);
        free(table);
        free(sc);
}

static void mla_attn_prefill_is_causal_over_shuffled_blocks(void **state)
{
        const struct mla_case c = { .n_q = 5, .n_head = 3, .kv_lora = 40, .rope = 8,
                                    .block_tokens = 4, .pos0 = 9 };

        mla_check(&c, 61);
}

static void mla_attn_first_tokens_see_only_themselves(void **state)
{
        const struct mla_case c = { .n_q = 3, .n_head = 2, .kv_lora = 16, .rope = 4,
                                    .block_tokens = 16, .pos0 = 0 };

        mla_check(&c, 62);
}

static void mla_attn_decode_over_long_context(void **state)
{
        const struct mla_case c = { .n_q = 1, .n_head = 16, .kv_lora = 64, .rope = 16,
                                    .block_tokens = 16, .pos0 = 700 };

        mla_check(&c, 63);
}

/* A decode step's attention as one call: every sequence gets the bits of
 * its own mla_attn call, whatever the others hold (lengths, query rows,
 * block tables into one shared arena), at every level and thread count. */
static void mla_attn_many_matches_one_call_per_sequence(void **state)
{
        enum { N_SEQ = 5, HEADS = 6, LORA = 48, ROPE = 8, BT = 4, PHYS = 40 };
        const int64_t width = LORA + ROPE;
        const int64_t n_q[N_SEQ] = { 1, 3, 1, 0, 2 }, pos0[N_SEQ] = { 0, 9, 17, 4, 30 };
        float *kv = malloc(sizeof(float) * PHYS * BT * width);
        int32_t table[N_SEQ][PHYS / N_SEQ];
        mo_mla_args a[N_SEQ];
        float *ql[N_SEQ], *qp[N_SEQ], *one[N_SEQ], *many[N_SEQ];

        assert_non_null(kv);
        tu_randf(kv, (size_t)(PHYS * BT * width), 71);
        for (int s = 0; s < N_SEQ; s++) {
                size_t qn = (size_t)(MO_MAX(n_q[s], 1) * HEADS);

                /* Interleaved tables: sequence s owns physical blocks s, s + N_SEQ, ... */
                for (int b = 0; b < PHYS / N_SEQ; b++)
                        table[s][b] = (int32_t)(((PHYS / N_SEQ - 1 - b) * N_SEQ + s) % PHYS);
                assert_true(pos0[s] + n_q[s] <= PHYS / N_SEQ * BT);
                ql[s] = malloc(sizeof(float) * qn * LORA);
                qp[s] = malloc(sizeof(float) * qn * ROPE);
                one[s] = malloc(sizeof(float) * qn * LORA);
                many[s] = malloc(sizeof(float) * qn * LORA);
                assert_non_null(ql[s]);
                assert_non_null(qp[s]);
                assert_non_null(one[s]);
                assert_non_null(many[s]);
                tu_randf(ql[s], qn * LORA, 72 + s);
                tu_randf(qp[s], qn * ROPE, 80 + s);
                a[s] = (mo_mla_args){ .q_lat = ql[s], .q_pe = qp[s], .n_q = n_q[s], .n_head = HEADS,
                                      .kv_lora = LORA, .rope = ROPE, .kv = kv, .block_table = table[s],
                                      .block_tokens = BT, .pos0 = pos0[s], .scale = 0.125f };
        }
        for (int l = 0; l < n_levels(); l++)
                for (int th = 1; th <= MAX_THREADS; th++) {
                        mo_backend *b = be(l, th);

                        assert_non_null(b->ops->mla_attn_many);
                        for (int s = 0; s < N_SEQ; s++) {
                                memset(one[s], 0x7f, sizeof(float) * (size_t)(MO_MAX(n_q[s], 1) * HEADS) * LORA);
                                memset(many[s], 0x7f, sizeof(float) * (size_t)(MO_MAX(n_q[s], 1) * HEADS) * LORA);
                                a[s].out_lat = one[s];
                                b->ops->mla_attn(b, &a[s]);
                                a[s].out_lat = many[s];
                        }
                        b->ops->mla_attn_many(b, a, N_SEQ);
                        for (int s = 0; s < N_SEQ; s++) {
                                size_t bytes = sizeof(float) * (size_t)(MO_MAX(n_q[s], 1) * HEADS) * LORA;

                                assert_memory_equal(one[s], many[s], bytes);
                                if (n_q[s] > 0)
                                        assert_true(isfinite(many[s][0]) && fabsf(many[s][0]) < 10);
                        }
                }
        /* Sequences of different shapes are refused: NaN, not a wrong read. */
        a[1].n_head = HEADS - 1;
        be(0, 2)->ops->mla_attn_many(be(0, 2), a, N_SEQ);
        assert_true(isnan(many[0][0]));
        for (int s = 0; s < N_SEQ; s++) {
                free(ql[s]);
                free(qp[s]);
                free(one[s]);
                free(many[s]);
        }
        free(kv);
}

/* ---- memory ops ----------------------------------------------------------------------- */

static void alloc_is_zeroed_and_aligned_and_copies_move_bytes(void **state)
{
        mo_backend *b = be(0, 2);
        uint8_t host[1000], back[1000];
        uint8_t *p = b->ops->alloc(b, 1000), *q = b->ops->alloc(b, 1000);

        assert_non_null(p);
        assert_non_null(q);
        assert_int_equal((uintptr_t)p % 64, 0);
        for (int i = 0; i < 1000; i++)
                assert_int_equal(p[i], 0);
        for (int i = 0; i < 1000; i++)
                host[i] = (uint8_t)(i * 7);
        b->ops->upload(b, p, host, 1000);
        b->ops->copy(b, q, p, 1000);
        b->ops->zero(b, p + 10, 20);
        b->ops->download(b, back, q, 1000);
        assert_memory_equal(back, host, 1000);
        b->ops->download(b, back, p, 1000);
        for (int i = 0; i < 1000; i++)
                assert_int_equal(back[i], i >= 10 && i < 30 ? 0 : host[i]);
        b->ops->sync(b);
        b->ops->free(b, p);
        b->ops->free(b, q);
}

/* ---- the pool and the level switch ------------------------------------------------------ */

struct cover {
        int *hits;
        int64_t n;
};

static void cover_fn(void *arg, int64_t begin, int64_t end, int tid)
{
        struct cover *c = arg;

        assert_true(begin < end && end <= c->n);
        for (int64_t i = begin; i < end; i++)
                __atomic_fetch_add(&c->hits[i], 1, __ATOMIC_RELAXED);
}

static void pool_runs_every_item_exactly_once_across_many_jobs(void **state)
{
        const int threads[] = { 1, 2, 3, 5 };

        for (size_t t = 0; t < ARRAY_SIZE(threads); t++) {
                struct mo_pool *p;
                struct moerr e = {0};

                assert_int_equal(mo_pool_new(threads[t], &p, &e), 0);
                assert_int_equal(mo_pool_threads(p), threads[t]);
                /* Thousands of back-to-back jobs, as a decode step issues. */
                for (int job = 0; job < 3000; job++) {
                        int64_t n = 1 + job % 97, grain = 1 + job % 5;
                        int hits[97] = {0};
                        struct cover c = { hits, n };

                        mo_pool_for(p, n, grain, cover_fn, &c);
                        for (int64_t i = 0; i < n; i++)
                                assert_int_equal(hits[i], 1);
                }
                mo_pool_free(p);
        }
}

static void pool_zero_threads_means_one_per_cpu(void **state)
{
        struct mo_pool *p;
        struct moerr e = {0};

        assert_int_equal(mo_pool_new(0, &p, &e), 0);
        assert_int_equal(mo_pool_threads(p), (int)sysconf(_SC_NPROCESSORS_ONLN));
        mo_pool_free(p);
        assert_int_equal(mo_pool_new(-1, &p, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "threads"));
}

static void simd_level_follows_environment(void **state)
{
        const char *max = mo_simd_name(mo_cpu_simd_max());

        unsetenv("MOED_CPU_SIMD");
        assert_string_equal(mo_cpu_simd_level(), max);
        setenv("MOED_CPU_SIMD", "scalar", 1);
        assert_string_equal(mo_cpu_simd_level(), "scalar");
        setenv("MOED_CPU_SIMD", "avx2", 1);
        assert_string_equal(mo_cpu_simd_level(), mo_cpu_simd_max() >= MO_SIMD_AVX2 ? "avx2" : max);
        /* Raising is not possible, nonsense is ignored. */
        setenv("MOED_CPU_SIMD", "avx512", 1);
        assert_string_equal(mo_cpu_simd_level(), max);
        setenv("MOED_CPU_SIMD", "sse9", 1);
        assert_string_equal(mo_cpu_simd_level(), max);
        unsetenv("MOED_CPU_SIMD");
        assert_int_equal(mo_cpu_threads(be(0, 3)), 3);
}

/* ---- micro-benchmark (MOED_CPU_BENCH=1) -------------------------------------------------- */

static double now_s(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct bw_job {
        const float *p;
        double sums[64];
};

static void bw_part(void *arg, int64_t begin, int64_t end, int tid)
{
        struct bw_job *j = arg;
        double s = 0;

        for (int64_t i = begin; i < end; i++)
                s += j->p[i * 16];
        j->sums[tid] += s;
}

static double read_bandwidth(struct mo_pool *pool, size_t bytes)
{
        float *buf = aligned_alloc(64, bytes);
        struct bw_job j = { .p = buf };
        int64_t lines = (int64_t)(bytes / 64);
        double best = 0;

        memset(buf, 1, bytes);
        for (int rep = 0; rep < 5; rep++) {
                double t0 = now_s();

                mo_pool_for(pool, lines, lines / 64, bw_part, &j);
                best = fmax(best, (double)bytes / (now_s() - t0));
        }
        free(buf);
        return best / 1e9;
}

/* 64 distinct quantized rows repeated: quantizing hundreds of MiB with the
 * reference quantizer would take longer than the benchmark. */
static mo_weight bench_weight(int type, int64_t nrows, int64_t ncols)
{
        size_t rb = mo_row_bytes(type, ncols);
        uint8_t *data = aligned_alloc(64, (rb * (size_t)nrows + 63) / 64 * 64);
        float *src = malloc(sizeof(float) * (size_t)ncols);

        assert_non_null(data);
        assert_non_null(src);
        for (int64_t r = 0; r < nrows; r++) {
                if (r < 64) {
                        tu_randf(src, (size_t)ncols, 99 + (uint64_t)r);
                        mo_quantize_row(type, src, data + r * rb, ncols);
                } else {
                        memcpy(data + r * rb, data + (r % 64) * rb, rb);
                }
        }
        free(src);
        return (mo_weight){ .type = type, .ncols = ncols, .nrows = nrows, .row_bytes = rb,
                            .data = data };
}

static void bench_matmul(int level, int type, int64_t nrows, int64_t ncols, int64_t m, int threads)
{
        mo_weight w = bench_weight(type, nrows, ncols);
        float *x = malloc(sizeof(float) * (size_t)(m * ncols));
        float *y = malloc(sizeof(float) * (size_t)(m * nrows));
        mo_backend *b = be(level, threads);
        double best = 1e30;
        size_t wbytes = w.row_bytes * (size_t)nrows;

        tu_randf(x, (size_t)(m * ncols), 8);
        for (int rep = 0; rep < (m == 1 ? 20 : 3); rep++) {
                double t0 = now_s();

                b->ops->matmul(b, &w, x, ncols, y, nrows, m);
                best = fmin(best, now_s() - t0);
        }
        printf("%-7s %-5s %5lldx%-5lld m=%-4lld %d thr: %8.3f ms  %7.2f GB/s weights  %8.1f GFLOP/s\n",
               mo_simd_name(level), mo_type_name(type), (long long)nrows, (long long)ncols,
               (long long)m, threads, best * 1e3, (double)wbytes / best / 1e9,
               2.0 * (double)nrows * ncols * m / best / 1e9);
        free((void *)w.data);
        free(x);
        free(y);
}

/* MOED_CPU_BENCH=quick: only the best level. */
static int run_bench(bool quick)
{
        const int types[] = { MO_TYPE_Q8_0, MO_TYPE_Q4_K, MO_TYPE_Q6_K, MO_TYPE_Q4_0, MO_TYPE_F16 };
        struct mo_pool *pool;
        struct moerr e = {0};
        int64_t ncols = 7168;

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (setup_backends(NULL) < 0 || mo_pool_new(2, &pool, &e) < 0)
                return 1;
        printf("read bandwidth, 2 threads: 1 GiB %.1f GB/s, 64 MiB %.1f GB/s\n",
               read_bandwidth(pool, 1ul << 30), read_bandwidth(pool, 64ul << 20));
        for (int l = 0; l < n_levels(); l++)
                for (size_t i = 0; i < ARRAY_SIZE(types); i++) {
                        size_t rb = mo_row_bytes(types[i], ncols);
                        int64_t rows64 = (int64_t)((64ul << 20) / rb);

                        if ((l == 0 && types[i] != MO_TYPE_Q8_0) || (quick && l + 1 < n_levels()))
                                continue;
                        bench_matmul(l, types[i], rows64, ncols, 1, 2);
                        bench_matmul(l, types[i], (int64_t)((512ul << 20) / rb), ncols, 1, 2);
                        bench_matmul(l, types[i], rows64 / 4, ncols, 128, 2);
                }
        mo_pool_free(pool);
        teardown_backends(NULL);
        return 0;
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(simd_level_follows_environment),
                cmocka_unit_test(pool_runs_every_item_exactly_once_across_many_jobs),
                cmocka_unit_test(pool_zero_threads_means_one_per_cpu),
                cmocka_unit_test(dot_kernels_match_reference_for_every_type_and_level),
                cmocka_unit_test(integer_dots_are_exact_with_unit_scales),
                cmocka_unit_test(activation_quantizers_match_reference_bit_for_bit),
                cmocka_unit_test(avx512_vnni_kernels_equal_plain_avx512_bits),
                cmocka_unit_test(gemm_bits_do_not_depend_on_column_count),
                cmocka_unit_test(q8_0_avx512_sums_follow_the_fixed_order),
                cmocka_unit_test(matmul_matches_reference_for_every_type_level_and_batch),
                cmocka_unit_test(matmul_splits_large_weights_without_changing_bits),
                cmocka_unit_test(matmul_batch_rows_equal_single_rows_with_strides),
                cmocka_unit_test(matmul_rejects_uncomputable_type_with_nan),
                cmocka_unit_test(matmul_many_equals_one_matmul_per_job),
                cmocka_unit_test(matmul_many_rejects_a_bad_job_with_nan_everywhere),
                cmocka_unit_test(get_rows_dequantizes_the_chosen_rows),
                cmocka_unit_test(rmsnorm_matches_reference_in_place_and_strided),
                cmocka_unit_test(rope_rotates_adjacent_pairs_by_hand),
                cmocka_unit_test(rope_matches_reference_for_heads_and_positions),
                cmocka_unit_test(swiglu_and_add_match_reference_and_allow_aliasing),
                cmocka_unit_test(softmax_exp_is_within_two_ulp_at_every_level),
                cmocka_unit_test(swiglu_bits_do_not_depend_on_position),
                cmocka_unit_test(mix_rows_match_reference_and_cut_anywhere),
                cmocka_unit_test(gather_rows_copies_the_named_rows),
                cmocka_unit_test(scatter_add_accumulates_repeated_rows_in_order),
                cmocka_unit_test(mla_attn_prefill_is_causal_over_shuffled_blocks),
                cmocka_unit_test(mla_attn_first_tokens_see_only_themselves),
                cmocka_unit_test(mla_attn_decode_over_long_context),
                cmocka_unit_test(mla_attn_many_matches_one_call_per_sequence),
                cmocka_unit_test(alloc_is_zeroed_and_aligned_and_copies_move_bytes),
        };
        const char *bench = getenv("MOED_CPU_BENCH");

        if (bench && *bench && strcmp(bench, "0"))
                return run_bench(!strcmp(bench, "quick"));
        return cmocka_run_group_tests(tests, setup_backends, teardown_backends);
}
