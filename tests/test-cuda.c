/* test-cuda: kernels/cuda. On every machine (CI included): device
 * discovery and the automatic choice of backend, which falls back to the
 * CPU with a log line saying why. Where a CUDA device exists: every op of
 * the CUDA backend against the F32 reference and the CPU backend, on
 * random inputs of awkward sizes (not multiples of any tile), and the
 * weight upload. Without a device each of those cases prints
 * "SKIP: no CUDA device (...)" and is reported as skipped by cmocka; with
 * MOED_REQUIRE_GPU=1 they fail instead, so a GPU run cannot pass by
 * skipping.
 *
 * Tolerances (mag = sum_k |w_k x_k| over the exact weight values):
 *   matmul, up to 16 rows (matrix-vector kernel, every type): 1e-5 mag;
 *   matmul, more rows (cuBLAS): F32 and F16 1e-5 mag, BF16 2e-5 mag (the
 *     activations are split in two 16-bit halves: about 22 and 16
 *     significant bits; one half alone would miss by ~2.4e-5 and ~2e-3),
 *     quantized 1e-3 mag (the weights are rounded once to F16 in the
 *     tile);
 *   matmul against the CPU backend, which dots quantized weights with
 *     Q8-quantized activations: 2e-2 mag (quantized), 2e-5 mag (float);
 *   get_rows, gather_rows, add: bit-exact; scatter_add_rows: 1e-6
 *     relative; rmsnorm 2e-6 relative; swiglu 1e-6 relative (device
 *     expf); rope 2e-6 absolute on values in [-1, 1] (device sincosf);
 *   mla_attn: 1e-4 absolute on outputs in [-1, 1]. */
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

#include <cmocka.h>

#include "common/cleanup.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda-backend.h"
#include "kernels/quant.h"
#include "moed-config.h"
#include "testutil.h"

#ifdef __SANITIZE_ADDRESS__
/* Under AddressSanitizer on a GPU machine: the CUDA driver maps memory in
 * the range ASan keeps as a protected gap, and it holds allocations for the
 * life of the process, which LeakSanitizer would report. */
__attribute__((visibility("default"), used)) const char *__asan_default_options(void);
__attribute__((visibility("default"), used)) const char *__lsan_default_suppressions(void);

const char *__asan_default_options(void)
{
        return "protect_shadow_gap=0";
}

const char *__lsan_default_suppressions(void)
{
        return "leak:libcuda.so\nleak:libcudart.so\nleak:libcublas\nleak:libnvidia\n";
}
#endif

static mo_backend *gpu, *cpu;
static int n_devices;
static char no_device_why[256];

static bool require_gpu(void)
{
        const char *v = getenv("MOED_REQUIRE_GPU");

        return v && strcmp(v, "1") == 0;
}

/* Every device case starts here: it runs, fails (MOED_REQUIRE_GPU=1), or
 * says it is skipped and why. */
static bool have_gpu(const char *test)
{
        if (gpu)
                return true;
        if (require_gpu())
                fail_msg("MOED_REQUIRE_GPU=1 but no CUDA device: %s", no_device_why);
        printf("SKIP: no CUDA device (%s): %s\n", no_device_why, test);
        fflush(stdout);
        return false;
}

#define NEED_GPU()                              \
        do {                                    \
                if (!have_gpu(__func__))        \
                        skip();                 \
        } while (0)

static int setup(void **state)
{
        struct moerr e = { { 0 } };

        n_devices = mo_cuda_probe(no_device_why, sizeof no_device_why);
        if (mo_backend_cpu_new(2, &cpu, &e) < 0) {
                fprintf(stderr, "cpu backend: %s\n", e.msg);
                return -1;
        }
        if (n_devices > 0 && mo_backend_cuda_new(0, &gpu, &e) < 0) {
                /* A device that exists but will not start is a failure. */
                fprintf(stderr, "cuda backend on device 0: %s\n", e.msg);
                return -1;
        }
        return 0;
}

static int teardown(void **state)
{
        mo_backend_free(gpu);
        mo_backend_free(cpu);
        return 0;
}

/* ---- discovery and the automatic choice (every machine) ------------------------ */

static void probe_is_consistent(void **state)
{
        char why[256] = "";
        int n = mo_cuda_probe(why, sizeof why);

        assert_int_equal(n, mo_cuda_device_count());
        assert_true(n >= 0);
        if (require_gpu())
                assert_true(n > 0);
        if (!MOED_HAVE_CUDA) {
                assert_int_equal(n, 0);
                assert_string_equal(why, "moed was built without CUDA");
        }
        if (n == 0) {
                assert_true(strlen(why) > 0);
                assert_true(strstr(why, "driver") || strstr(why, "without CUDA"));
                printf("no CUDA device: %s\n", why);
        }
        /* A NULL buffer is fine. */
        assert_int_equal(mo_cuda_probe(NULL, 0), n);
}

static void cuda_new_rejects_missing_devices(void **state)
{
        struct moerr e = { { 0 } };
        mo_backend *b = NULL;

        assert_int_equal(mo_backend_cuda_new(n_devices, &b, &e), -ENODEV);
        assert_null(b);
        assert_non_null(strstr(e.msg, "CUDA device"));
        assert_int_equal(mo_backend_cuda_new(-1, &b, &e), -ENODEV);
        assert_null(b);
        struct mo_cuda_device_info info;
        assert_int_equal(mo_cuda_device_info(n_devices, &info, &e), -ENODEV);
        if (n_devices > 0) {
                assert_int_equal(mo_cuda_device_info(0, &info, &e), 0);
                assert_true(info.total_bytes > 0);
                assert_true(info.cc_major >= 8);
                assert_true(strlen(info.name) > 0);
        }
}

static void auto_falls_back_to_the_cpu_without_a_device(void **state)
{
        const char *settings[] = { NULL, "", "all", " ALL" };
        char line[512], want[512];

        for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
                struct moerr e = { { 0 } };
                mo_backend *b = NULL;

                assert_int_equal(mo_backend_auto_new(settings[i], 2, &b, line, sizeof line, &e), 0);
                assert_non_null(b);
                if (n_devices == 0) {
                        assert_string_equal(b->ops->name, "cpu");
                        assert_false(mo_backend_is_cuda(b));
                        snprintf(want, sizeof want,
                                 "devices: no CUDA device found (%s); using the CPU with 2 threads",
                                 no_device_why);
                        assert_string_equal(line, want);
                } else {
                        assert_true(mo_backend_is_cuda(b));
                        assert_int_equal(mo_cuda_backend_device(b), 0);
                        assert_non_null(strstr(line, "devices: CUDA 0 ("));
                        assert_non_null(strstr(line, "; using CUDA 0"));
                }
                printf("%s\n", line);
                mo_backend_free(b);
        }
}

static void auto_uses_the_cpu_when_asked(void **state)
{
        struct moerr e = { { 0 } };
        mo_backend *b = NULL;
        char line[512];
        const char *tail = "; using the CPU with 1 thread";

        assert_int_equal(mo_backend_auto_new("cpu", 1, &b, line, sizeof line, &e), 0);
        assert_string_equal(b->ops->name, "cpu");
        assert_int_equal(mo_cpu_threads(b), 1);
        assert_true(strlen(line) > strlen(tail));
        assert_string_equal(line + strlen(line) - strlen(tail), tail);
        if (n_devices > 0)
                assert_non_null(strstr(line, "found, not used (Devices=cpu)"));
        mo_backend_free(b);
}

static void auto_rejects_malformed_settings(void **state)
{
        const char *bad[] = { "abc", "0,,1", "-1", "0,0", "0,", "64", "1x", "cpu,0", "0;1" };

        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                struct moerr e = { { 0 } };
                mo_backend *b = NULL;
                char line[256] = "untouched";

                assert_int_equal(mo_backend_auto_new(bad[i], 1, &b, line, sizeof line, &e), -EINVAL);
                assert_null(b);
                assert_non_null(strstr(e.msg, "Devices="));
                assert_string_equal(line, "untouched");
        }
}

static void auto_refuses_a_listed_device_that_is_missing(void **state)
{
        struct moerr e = { { 0 } };
        mo_backend *b = NULL;
        char setting[32], line[256];

        if (n_devices == 0)
                snprintf(setting, sizeof setting, "0");
        else
                snprintf(setting, sizeof setting, "0, %d", n_devices);
        assert_int_equal(mo_backend_auto_new(setting, 1, &b, line, sizeof line, &e), -ENODEV);
        assert_null(b);
        assert_non_null(strstr(e.msg, "not found"));
        if (n_devices == 0)
                assert_non_null(strstr(e.msg, no_device_why));
}

static void auto_makes_one_backend_per_device(void **state)
{
        mo_backend *bs[4] = { NULL };
        struct moerr e = { { 0 } };
        char line[1024];
        int n = -1;

        assert_int_equal(mo_backends_auto_new("all", 1, bs, 4, &n, line, sizeof line, &e), 0);
        assert_int_equal(n, n_devices == 0 ? 1 : (n_devices < 4 ? n_devices : 4));
        for (int i = 0; i < n; i++) {
                assert_non_null(bs[i]);
                assert_int_equal(mo_backend_is_cuda(bs[i]), n_devices > 0);
                if (n_devices > 0)
                        assert_int_equal(mo_cuda_backend_device(bs[i]), i);
                mo_backend_free(bs[i]);
        }
        assert_int_equal(mo_backends_auto_new("all", 1, bs, 0, &n, line, sizeof line, &e), -EINVAL);
}

static void cuda_calls_on_a_cpu_backend_are_harmless(void **state)
{
        struct moerr e = { { 0 } };
        char buf[64];
        struct mo_cuda_region r = { buf, sizeof buf };

        assert_false(mo_backend_is_cuda(cpu));
        assert_false(mo_backend_is_cuda(NULL));
        assert_int_equal(mo_cuda_backend_device(cpu), -1);
        assert_int_equal(mo_cuda_weight_bytes(cpu), 0);
        uint64_t free_b = 0, total_b = 0;

        assert_int_equal(mo_cuda_upload_weights(cpu, &r, 1, NULL, NULL, &e), -EINVAL);
        assert_int_equal(mo_cuda_mem_info(cpu, &free_b, &total_b, &e), -EINVAL);
        mo_cuda_release_weights(cpu);
}

/* ---- device helpers ------------------------------------------------------------ */

static float *dev_from(mo_backend *b, const float *x, int64_t n)
{
        float *d = b->ops->alloc(b, sizeof(float) * (size_t)(n > 0 ? n : 1));

        assert_non_null(d);
        if (n > 0)
                b->ops->upload(b, d, x, sizeof(float) * (size_t)n);
        return d;
}

static float *host_from(mo_backend *b, const float *d, int64_t n)
{
        float *h = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));

        assert_non_null(h);
        b->ops->sync(b);
        if (n > 0)
                b->ops->download(b, h, d, sizeof(float) * (size_t)n);
        return h;
}

static float *randv(int64_t n, uint64_t seed, float scale)
{
        float *x = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));

        assert_non_null(x);
        tu_randf(x, (size_t)n, seed);
        for (int64_t i = 0; i < n; i++)
                x[i] *= scale;
        return x;
}

/* Runs the same op on both backends over copies of the same buffer. */
struct pair {
        float *g, *c; /* device (GPU) and host (CPU backend) copies */
        int64_t n;
};

static void pair_make(struct pair *p, const float *x, int64_t n)
{
        p->n = n;
        p->g = dev_from(gpu, x, n);
        p->c = dev_from(cpu, x, n);
}

static float *pair_gpu_result(struct pair *p)
{
        return host_from(gpu, p->g, p->n);
}

static void pair_free(struct pair *p)
{
        gpu->ops->free(gpu, p->g);
        cpu->ops->free(cpu, p->c);
}

/* ---- memory ops ------------------------------------------------------------------ */

static void memory_ops_move_bytes(void **state)
{
        NEED_GPU();
        int64_t n = 250007;
        float *x = randv(n, 1, 1.0f), *h;
        float *d = gpu->ops->alloc(gpu, sizeof(float) * (size_t)n);

        assert_non_null(d);
        h = host_from(gpu, d, n);
        for (int64_t i = 0; i < n; i++)
                assert_true(h[i] == 0.0f); /* alloc is zeroed */
        free(h);
        gpu->ops->upload(gpu, d, x, sizeof(float) * (size_t)n);
        h = host_from(gpu, d, n);
        assert_memory_equal(h, x, sizeof(float) * (size_t)n);
        free(h);
        /* Overlapping copy (memmove semantics), small upload through the ring. */
        gpu->ops->copy(gpu, d + 3, d, sizeof(float) * 1000);
        h = host_from(gpu, d, 1003);
        assert_memory_equal(h + 3, x, sizeof(float) * 1000);
        free(h);
        gpu->ops->upload(gpu, d + 5, x + 77, sizeof(float) * 13);
        gpu->ops->zero(gpu, d + 100, sizeof(float) * 7);
        h = host_from(gpu, d, 200);
        assert_memory_equal(h + 5, x + 77, sizeof(float) * 13);
        for (int i = 100; i < 107; i++)
                assert_true(h[i] == 0.0f);
        free(h);
        gpu->ops->free(gpu, d);
        free(x);
}

/* ---- matmul ------------------------------------------------------------------------ */

static const int all_types[] = {
        MO_TYPE_F32, MO_TYPE_F16, MO_TYPE_BF16, MO_TYPE_Q8_0, MO_TYPE_Q4_0, MO_TYPE_Q5_0,
        MO_TYPE_Q2_K, MO_TYPE_Q3_K, MO_TYPE_Q4_K, MO_TYPE_Q5_K, MO_TYPE_Q6_K,
};

struct tw {
        mo_weight w;
        uint8_t *data;
        float *deq; /* nrows x ncols exact values */
};

/* Rows padded by one block (a view into a wider tensor). */
static void tw_make(struct tw *t, int type, int64_t nrows, int64_t ncols, uint64_t seed)
{
        const struct mo_type_info *ti = mo_type_get(type);
        size_t pad = type == MO_TYPE_F32 ? 12 : ti->block_bytes * (ti->block == 1 ? 3 : 1);
        float *src = malloc(sizeof(float) * (size_t)ncols);

        assert_non_null(src);
        t->w.type = type;
        t->w.nrows = nrows;
        t->w.ncols = ncols;
        t->w.row_bytes = mo_row_bytes(type, ncols) + pad;
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

/* The weight's device copy is found by its host address: drop it before
 * the host memory can be reused by another weight. */
static void tw_free(struct tw *t)
{
        mo_cuda_release_weights(gpu);
        free(t->data);
        free(t->deq);
}

static double gemm_tol(int type, int64_t m)
{
        if (m <= 16 || type == MO_TYPE_F32 || type == MO_TYPE_F16)
                return 1e-5;
        if (type == MO_TYPE_BF16)
                return 2e-5;
        return 1e-3;
}

static void check_matmul(int type, int64_t ncols, int64_t nrows, int64_t m, int64_t xpad,
                         uint64_t seed)
{
        int64_t xs = ncols + xpad, ys = nrows + 5;
        struct tw t;
        float *x = randv(m * xs, seed + 1, 1.0f);
        float *xg, *yg, *yc, *yh;
        bool quant = mo_type_get(type)->block > 1;

        tw_make(&t, type, nrows, ncols, seed);
        xg = dev_from(gpu, x, m * xs);
        yg = gpu->ops->alloc(gpu, sizeof(float) * (size_t)(m * ys));
        yc = calloc((size_t)(m * ys), sizeof(float));
        assert_non_null(yg);
        assert_non_null(yc);
        gpu->ops->matmul(gpu, &t.w, xg, xs, yg, ys, m);
        cpu->ops->matmul(cpu, &t.w, x, xs, yc, ys, m);
        yh = host_from(gpu, yg, m * ys);
        for (int64_t i = 0; i < m; i++)
                for (int64_t r = 0; r < nrows; r++) {
                        double ref = 0, mag = 0;
                        float got = yh[i * ys + r], c = yc[i * ys + r];

                        for (int64_t k = 0; k < ncols; k++) {
                                double p = (double)t.deq[r * ncols + k] * x[i * xs + k];
                                ref += p;
                                mag += fabs(p);
                        }
                        if (!(fabs(got - ref) <= gemm_tol(type, m) * mag + 1e-6))
                                fail_msg("matmul %s n=%lld rows=%lld m=%lld: y[%lld][%lld] = %.9g, "
                                         "reference %.9g (mag %g)", mo_type_name(type),
                                         (long long)ncols, (long long)nrows, (long long)m,
                                         (long long)i, (long long)r, got, ref, mag);
                        if (!(fabs(got - c) <= (quant ? 2e-2 : 2e-5) * mag + 1e-6))
                                fail_msg("matmul %s n=%lld rows=%lld m=%lld: y[%lld][%lld] = %.9g, "
                                         "CPU backend %.9g (mag %g)", mo_type_name(type),
                                         (long long)ncols, (long long)nrows, (long long)m,
                                         (long long)i, (long long)r, got, c, mag);
                }
        free(yh);
        free(yc);
        free(x);
        gpu->ops->free(gpu, xg);
        gpu->ops->free(gpu, yg);
        tw_free(&t);
}

/* Both paths (matrix-vector up to 16 rows, cuBLAS above), aligned and
 * unaligned activation strides, rows that are not multiples of any tile. */
static void matmul_matches_reference_for_every_type(void **state)
{
        NEED_GPU();
        static const struct { int64_t blocks, nrows, m, xpad; } cases[] = {
                { 1, 1, 1, 0 },    { 3, 5, 16, 3 },  { 37, 257, 3, 4 }, { 11, 1001, 9, 1 },
                { 7, 131, 17, 3 }, { 5, 333, 67, 4 }, { 13, 70, 8, 0 }, { 2, 1, 40, 0 },
        };

        for (size_t ti = 0; ti < ARRAY_SIZE(all_types); ti++) {
                int type = all_types[ti];
                int64_t block = mo_type_get(type)->block;

                for (size_t ci = 0; ci < ARRAY_SIZE(cases); ci++) {
                        /* Float types get widths that are not multiples of 8. */
                        int64_t ncols = block == 1 ? cases[ci].blocks * 37 + 3 : cases[ci].blocks * block;

                        check_matmul(type, ncols, cases[ci].nrows, cases[ci].m, cases[ci].xpad,
                                     1000 * ti + ci);
                }
        }
}

static void matmul_rejects_uncomputable_type_with_nan(void **state)
{
        NEED_GPU();
        uint8_t data[20 * 4] = { 0 };
        mo_weight w = { MO_TYPE_Q4_1, 32, 4, 20, data };
        float x[32] = { 1 };
        float *xg = dev_from(gpu, x, 32), *yg = gpu->ops->alloc(gpu, sizeof(float) * 4), *yh;

        gpu->ops->matmul(gpu, &w, xg, 32, yg, 4, 1);
        yh = host_from(gpu, yg, 4);
        for (int i = 0; i < 4; i++)
                assert_true(isnan(yh[i]));
        free(yh);
        gpu->ops->free(gpu, xg);
        gpu->ops->free(gpu, yg);
}

/* ---- embedding rows ------------------------------------------------------------ */

static void get_rows_equals_cpu_bits_for_every_type(void **state)
{
        NEED_GPU();
        const int32_t ids[] = { 0, 8, 3, 3, -1, 9, 5 };
        const int64_t n = ARRAY_SIZE(ids), nrows = 9;

        for (size_t ti = 0; ti < ARRAY_SIZE(all_types); ti++) {
                int type = all_types[ti];
                int64_t block = mo_type_get(type)->block;
                int64_t ncols = block == 1 ? 1003 : 3 * block;
                struct tw t;
                float *yg = gpu->ops->alloc(gpu, sizeof(float) * (size_t)(n * ncols));
                float *yc = malloc(sizeof(float) * (size_t)(n * ncols)), *yh;

                assert_non_null(yg);
                assert_non_null(yc);
                tw_make(&t, type, nrows, ncols, 50 + ti);
                gpu->ops->get_rows(gpu, &t.w, ids, n, yg);
                cpu->ops->get_rows(cpu, &t.w, ids, n, yc);
                yh = host_from(gpu, yg, n * ncols);
                for (int64_t i = 0; i < n; i++) {
                        bool valid = ids[i] >= 0 && ids[i] < nrows;

                        for (int64_t k = 0; k < ncols; k++) {
                                float g = yh[i * ncols + k];

                                if (!valid)
                                        assert_true(isnan(g));
                                else if (memcmp(&g, &yc[i * ncols + k], sizeof g) != 0)
                                        fail_msg("get_rows %s row %d col %lld: %.9g, CPU %.9g",
                                                 mo_type_name(type), ids[i], (long long)k, g,
                                                 yc[i * ncols + k]);
                        }
                }
                free(yh);
                free(yc);
                gpu->ops->free(gpu, yg);
                tw_free(&t);
        }
}

/* ---- normalisation and element-wise ----------------------------------------------- */

static void check_close(const char *what, const float *got, const float *want, int64_t n,
                        double rel, double abs_tol)
{
        for (int64_t i = 0; i < n; i++)
                if (!(fabs((double)got[i] - want[i]) <= rel * fabs(want[i]) + abs_tol))
                        fail_msg("%s[%lld]: %.9g, CPU %.9g", what, (long long)i, got[i], want[i]);
}

static void rmsnorm_matches_cpu_in_place_and_strided(void **state)
{
        NEED_GPU();
        const int64_t m = 7, n = 1000, xs = 1003, ys = 1001;
        float *x = randv(m * xs, 3, 4.0f), *g = randv(n, 4, 1.0f), *yh;
        struct pair px, py;
        float *yinit = calloc((size_t)(m * ys), sizeof(float));
        float *gdev;

        assert_non_null(yinit);
        for (int64_t k = 0; k < n; k++)
                g[k] += 1.5f;
        pair_make(&px, x, m * xs);
        pair_make(&py, yinit, m * ys);
        /* Gains in host memory (a weight of the mapped model). */
        gpu->ops->rmsnorm(gpu, px.g, xs, g, n, m, 1e-6f, py.g, ys);
        cpu->ops->rmsnorm(cpu, px.c, xs, g, n, m, 1e-6f, py.c, ys);
        yh = pair_gpu_result(&py);
        check_close("rmsnorm", yh, py.c, m * ys, 2e-6, 1e-7);
        free(yh);
        /* In place, gains already in device memory. */
        gdev = dev_from(gpu, g, n);
        gpu->ops->rmsnorm(gpu, px.g, xs, gdev, n, m, 1e-5f, px.g, xs);
        cpu->ops->rmsnorm(cpu, px.c, xs, g, n, m, 1e-5f, px.c, xs);
        yh = pair_gpu_result(&px);
        check_close("rmsnorm in place", yh, px.c, m * xs, 2e-6, 1e-7);
        free(yh);
        gpu->ops->free(gpu, gdev);
        pair_free(&px);
        pair_free(&py);
        mo_cuda_release_weights(gpu);
        free(x);
        free(g);
        free(yinit);
}

static void rope_matches_cpu_at_far_positions(void **state)
{
        NEED_GPU();
        const int64_t m = 5, n_head = 3, hs = 70, rs = 3 * 70 + 3, n_dims = 64;
        const int32_t pos[] = { 0, 1, 4095, 100000, 163839 };
        float freq[32];
        mo_rope r = { n_dims, freq, 1.2f };
        float *x = randv(m * rs, 5, 1.0f), *yh;
        struct pair p;

        for (int i = 0; i < 32; i++) /* a YaRN-like ramp: fast, then interpolated */
                freq[i] = powf(10000.0f, -2.0f * (float)i / 64.0f) * (i < 12 ? 1.0f : 0.025f);
        pair_make(&p, x, m * rs);
        gpu->ops->rope(gpu, p.g, m, n_head, rs, hs, pos, &r);
        cpu->ops->rope(cpu, p.c, m, n_head, rs, hs, pos, &r);
        yh = pair_gpu_result(&p);
        check_close("rope", yh, p.c, m * rs, 0, 2e-6);
        free(yh);
        pair_free(&p);
        free(x);
}

static void swiglu_and_add_match_cpu_and_allow_aliasing(void **state)
{
        NEED_GPU();
        const int64_t n = 100003;
        float *a = randv(n, 6, 8.0f), *u = randv(n, 7, 2.0f), *yh;
        struct pair pa, pu, po;

        pair_make(&pa, a, n);
        pair_make(&pu, u, n);
        pair_make(&po, a, n);
        gpu->ops->swiglu(gpu, pa.g, pu.g, po.g, n);
        cpu->ops->swiglu(cpu, pa.c, pu.c, po.c, n);
        yh = pair_gpu_result(&po);
        check_close("swiglu", yh, po.c, n, 1e-6, 1e-30);
        free(yh);
        gpu->ops->swiglu(gpu, pa.g, pu.g, pa.g, n); /* out aliases gate */
        cpu->ops->swiglu(cpu, pa.c, pu.c, pa.c, n);
        yh = pair_gpu_result(&pa);
        check_close("swiglu aliased", yh, pa.c, n, 1e-6, 1e-30);
        free(yh);
        gpu->ops->add(gpu, pu.g, po.g, n);
        cpu->ops->add(cpu, pu.c, po.c, n);
        yh = pair_gpu_result(&pu);
        /* add is one rounding of the same operands, once they agree. */
        check_close("add", yh, pu.c, n, 2e-6, 1e-30);
        free(yh);
        pair_free(&pa);
        pair_free(&pu);
        pair_free(&po);
        free(a);
        free(u);
}

static void add_is_exact(void **state)
{
        NEED_GPU();
        const int64_t n = 4099;
        float *a = randv(n, 8, 3.0f), *b = randv(n, 9, 5.0f), *yh;
        struct pair pa, pb;

        pair_make(&pa, a, n);
        pair_make(&pb, b, n);
        gpu->ops->add(gpu, pa.g, pb.g, n);
        cpu->ops->add(cpu, pa.c, pb.c, n);
        yh = pair_gpu_result(&pa);
        assert_memory_equal(yh, pa.c, sizeof(float) * (size_t)n);
        free(yh);
        pair_free(&pa);
        pair_free(&pb);
        free(a);
        free(b);
}

/* ---- row movement -------------------------------------------------------------------- */

static void gather_and_scatter_match_cpu_with_repeated_rows(void **state)
{
        NEED_GPU();
        const int64_t dim = 1003, n_src = 11;
        const int32_t rows[] = { 3, 0, 10, 3, 3, 7, 10, 1 };
        const float w[] = { 0.5f, -1.25f, 2.0f, 0.75f, -0.3f, 1.0f, 0.1f, 3.0f };
        const int64_t n = ARRAY_SIZE(rows);
        float *src = randv(n_src * dim, 10, 1.0f), *part = randv(n * dim, 11, 1.0f), *yh;
        float *zero = calloc((size_t)(n * dim), sizeof(float));
        struct pair ps, pg, pp, pd;

        assert_non_null(zero);
        pair_make(&ps, src, n_src * dim);
        pair_make(&pg, zero, n * dim);
        gpu->ops->gather_rows(gpu, ps.g, dim, rows, n, pg.g);
        cpu->ops->gather_rows(cpu, ps.c, dim, rows, n, pg.c);
        yh = pair_gpu_result(&pg);
        assert_memory_equal(yh, pg.c, sizeof(float) * (size_t)(n * dim));
        free(yh);
        pair_make(&pp, part, n * dim);
        pair_make(&pd, src, n_src * dim);
        gpu->ops->scatter_add_rows(gpu, pp.g, dim, rows, w, n, pd.g);
        cpu->ops->scatter_add_rows(cpu, pp.c, dim, rows, w, n, pd.c);
        yh = pair_gpu_result(&pd);
        check_close("scatter_add_rows", yh, pd.c, n_src * dim, 1e-6, 1e-7);
        free(yh);
        pair_free(&ps);
        pair_free(&pg);
        pair_free(&pp);
        pair_free(&pd);
        free(src);
        free(part);
        free(zero);
}

/* ---- MLA attention ---------------------------------------------------------------------- */

static void check_mla(int64_t kl, int64_t rope, int64_t n_head, int64_t bs, int64_t pos0,
                      int64_t n_q, uint64_t seed)
{
        int64_t width = kl + rope, n_ctx = pos0 + n_q;
        int64_t n_blocks = (n_ctx + bs - 1) / bs, arena_blocks = n_blocks + 3;
        int32_t *table = malloc(sizeof(int32_t) * (size_t)n_blocks);
        float *kv = randv(arena_blocks * bs * width, seed, 1.0f);
        float *ql = randv(n_q * n_head * kl, seed + 1, 1.0f);
        float *qp = randv(n_q * n_head * rope, seed + 2, 1.0f);
        float *zero = calloc((size_t)(n_q * n_head * kl), sizeof(float)), *yh;
        struct pair pkv, pql, pqp, po;
        mo_mla_args a;

        assert_non_null(table);
        assert_non_null(zero);
        /* A shuffled block table over an arena with unused blocks. */
        for (int64_t i = 0; i < n_blocks; i++)
                table[i] = (int32_t)((i * 7 + 2) % arena_blocks);
        for (int64_t i = 0; i < n_blocks; i++)
                for (int64_t j = 0; j < i; j++)
                        assert_int_not_equal(table[i], table[j]);
        pair_make(&pkv, kv, arena_blocks * bs * width);
        pair_make(&pql, ql, n_q * n_head * kl);
        pair_make(&pqp, qp, n_q * n_head * rope);
        pair_make(&po, zero, n_q * n_head * kl);
        a = (mo_mla_args){ .n_q = n_q, .n_head = n_head, .kv_lora = kl, .rope = rope,
                           .block_table = table, .block_tokens = bs, .pos0 = pos0,
                           .scale = 1.0f / sqrtf((float)width) * 3.0f };
        a.q_lat = pql.g;
        a.q_pe = pqp.g;
        a.out_lat = po.g;
        a.kv = pkv.g;
        gpu->ops->mla_attn(gpu, &a);
        a.q_lat = pql.c;
        a.q_pe = pqp.c;
        a.out_lat = po.c;
        a.kv = pkv.c;
        cpu->ops->mla_attn(cpu, &a);
        yh = pair_gpu_result(&po);
        for (int64_t i = 0; i < n_q * n_head * kl; i++)
                if (!(fabs((double)yh[i] - po.c[i]) <= 1e-4))
                        fail_msg("mla kl=%lld rope=%lld heads=%lld bs=%lld pos0=%lld n_q=%lld: "
                                 "out[%lld] = %.9g, CPU %.9g", (long long)kl, (long long)rope,
                                 (long long)n_head, (long long)bs, (long long)pos0,
                                 (long long)n_q, (long long)i, yh[i], po.c[i]);
        free(yh);
        pair_free(&pkv);
        pair_free(&pql);
        pair_free(&pqp);
        pair_free(&po);
        free(table);
        free(kv);
        free(ql);
        free(qp);
        free(zero);
}

/* Decode over a long context (split across blocks), prefill (one block
 * per query and head group), head counts that split unevenly, every
 * register width (kv_lora up to 256, 512, 1024). */
static void mla_attn_matches_cpu_over_shuffled_blocks(void **state)
{
        NEED_GPU();
        check_mla(512, 64, 16, 64, 4000, 1, 1);
        check_mla(512, 64, 16, 16, 0, 1, 2);
        check_mla(96, 16, 5, 7, 37, 3, 3);
        check_mla(300, 20, 20, 5, 100, 70, 4);
        check_mla(1000, 24, 3, 16, 300, 2, 5);
        check_mla(64, 8, 33, 3, 2000, 1, 6);
        check_mla(512, 64, 128, 64, 1500, 4, 7);
}

/* ---- weights on the device --------------------------------------------------------------- */

struct progress {
        int calls;
        uint64_t done, total;
};

static void on_progress(void *ud, uint64_t done, uint64_t total)
{
        struct progress *p = ud;

        assert_true(done >= p->done);
        assert_true(done <= total);
        p->calls++;
        p->done = done;
        p->total = total;
}

static void weights_upload_once_and_views_find_them(void **state)
{
        NEED_GPU();
        struct moerr e = { { 0 } };
        struct tw t;
        struct progress pr = { 0 };
        struct mo_cuda_region r;
        uint64_t held;
        mo_weight view;
        float *x = randv(4 * 512, 12, 1.0f), *xg, *yg, *yh;

        mo_cuda_release_weights(gpu);
        assert_int_equal(mo_cuda_weight_bytes(gpu), 0);
        tw_make(&t, MO_TYPE_Q8_0, 300, 512, 77);
        r = (struct mo_cuda_region){ t.data, (size_t)t.w.nrows * t.w.row_bytes };
        assert_int_equal(mo_cuda_upload_weights(gpu, &r, 1, on_progress, &pr, &e), 0);
        assert_true(pr.calls >= 1);
        assert_int_equal(pr.done, r.bytes);
        assert_int_equal(pr.total, r.bytes);
        held = mo_cuda_weight_bytes(gpu);
        assert_true(held >= r.bytes);
        /* Again: already there, nothing new is held. */
        assert_int_equal(mo_cuda_upload_weights(gpu, &r, 1, NULL, NULL, &e), 0);
        assert_int_equal(mo_cuda_weight_bytes(gpu), held);
        /* A view of rows 100..199 (one "expert") is found inside it. */
        view = t.w;
        view.nrows = 100;
        view.data = t.data + 100 * t.w.row_bytes;
        xg = dev_from(gpu, x, 4 * 512);
        yg = gpu->ops->alloc(gpu, sizeof(float) * 4 * 100);
        gpu->ops->matmul(gpu, &view, xg, 512, yg, 100, 4);
        yh = host_from(gpu, yg, 4 * 100);
        assert_int_equal(mo_cuda_weight_bytes(gpu), held);
        for (int64_t i = 0; i < 4; i++)
                for (int64_t rr = 0; rr < 100; rr++) {
                        double ref = 0, mag = 0;

                        for (int64_t k = 0; k < 512; k++) {
                                double p = (double)t.deq[(100 + rr) * 512 + k] * x[i * 512 + k];
                                ref += p;
                                mag += fabs(p);
                        }
                        assert_true(fabs(yh[i * 100 + rr] - ref) <= 1e-5 * mag + 1e-6);
                }
        free(yh);
        gpu->ops->free(gpu, xg);
        gpu->ops->free(gpu, yg);
        tw_free(&t);
        assert_int_equal(mo_cuda_weight_bytes(gpu), 0);
        free(x);
}

static void weights_that_do_not_fit_are_refused_before_copying(void **state)
{
        NEED_GPU();
        struct moerr e = { { 0 } };
        struct mo_cuda_device_info info;
        uint64_t free_b = 0, total_b = 0;
        char small[64];
        /* Never read: the size is checked against free memory first. */
        struct mo_cuda_region r = { small, 0 };

        assert_int_equal(mo_cuda_device_info(0, &info, &e), 0);
        assert_int_equal(mo_cuda_mem_info(gpu, &free_b, &total_b, &e), 0);
        assert_true(free_b > 0 && free_b <= total_b);
        r.bytes = (size_t)info.total_bytes + 1;
        assert_int_equal(mo_cuda_upload_weights(gpu, &r, 1, NULL, NULL, &e), -ENOMEM);
        assert_non_null(strstr(e.msg, "CUDA 0"));
        assert_non_null(strstr(e.msg, "GiB"));
        assert_non_null(strstr(e.msg, "free"));
        printf("%s\n", e.msg);
        assert_int_equal(mo_cuda_weight_bytes(gpu), 0);
}

/* ---- MOED_CUDA_BENCH=1: timings for a GPU run (not a test) ------------------------------ */

static double now_s(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Random bytes: block scales may be anything, which costs the same time. */
static void *rand_bytes(size_t n, uint64_t seed)
{
        uint64_t *p = malloc((n + 7) / 8 * 8), s = seed * 0x9E3779B97F4A7C15ull + 1;

        assert_non_null(p);
        for (size_t i = 0; i < (n + 7) / 8; i++) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                p[i] = s & 0x3bff3bff3bff3bffull; /* halves stay finite */
        }
        return p;
}

static void bench_matmul(int type, int64_t nrows, int64_t ncols, int64_t m)
{
        struct moerr e = { { 0 } };
        size_t rb = mo_row_bytes(type, ncols), bytes = rb * (size_t)nrows;
        void *data = rand_bytes(bytes, 5);
        mo_weight w = { type, ncols, nrows, rb, data };
        struct mo_cuda_region r = { data, bytes };
        float *x = randv(m * ncols, 3, 1.0f), *xg = dev_from(gpu, x, m * ncols);
        float *yg = gpu->ops->alloc(gpu, sizeof(float) * (size_t)(m * nrows));
        double t0, t1, up;
        int iters = m == 1 ? 50 : 10;

        t0 = now_s();
        assert_int_equal(mo_cuda_upload_weights(gpu, &r, 1, NULL, NULL, &e), 0);
        up = now_s() - t0;
        gpu->ops->matmul(gpu, &w, xg, ncols, yg, nrows, m); /* warm-up */
        gpu->ops->sync(gpu);
        t0 = now_s();
        for (int i = 0; i < iters; i++)
                gpu->ops->matmul(gpu, &w, xg, ncols, yg, nrows, m);
        gpu->ops->sync(gpu);
        t1 = (now_s() - t0) / iters;
        printf("bench: matmul %-5s %lld x %lld, m=%-4lld %8.1f us  %7.1f GB/s weights  %7.2f TFLOP/s"
               "  (upload %.2f GB/s)\n", mo_type_name(type), (long long)nrows, (long long)ncols,
               (long long)m, t1 * 1e6, (double)bytes / t1 * 1e-9,
               2.0 * (double)nrows * (double)ncols * (double)m / t1 * 1e-12,
               (double)bytes / up * 1e-9);
        gpu->ops->free(gpu, xg);
        gpu->ops->free(gpu, yg);
        mo_cuda_release_weights(gpu);
        free(x);
        free(data);
}

/* Decode attention at batch 64 over 4096 cached tokens each (one call per
 * sequence, as the engine makes them): bandwidth on the latent rows. */
static void bench_mla(int64_t n_head, int64_t n_seq, int64_t n_ctx)
{
        const int64_t kl = 512, rope = 64, width = kl + rope, bs = 64;
        int64_t blocks = n_seq * n_ctx / bs;
        size_t kv_bytes = sizeof(float) * (size_t)(blocks * bs * width);
        float *kv = gpu->ops->alloc(gpu, kv_bytes);
        float *q = randv(n_head * width, 9, 1.0f);
        float *ql = dev_from(gpu, q, n_head * kl), *qp = dev_from(gpu, q + n_head * kl, n_head * rope);
        float *out = gpu->ops->alloc(gpu, sizeof(float) * (size_t)(n_head * kl));
        int32_t *table = malloc(sizeof(int32_t) * (size_t)blocks);
        double t0, t1;

        assert_non_null(kv);
        assert_non_null(table);
        for (int64_t i = 0; i < blocks; i++)
                table[i] = (int32_t)((i * 7919) % blocks);
        for (int rep = 0; rep < 2; rep++) { /* the first round warms up */
                gpu->ops->sync(gpu);
                t0 = now_s();
                for (int64_t s = 0; s < n_seq; s++) {
                        mo_mla_args a = { .q_lat = ql, .q_pe = qp, .out_lat = out, .n_q = 1,
                                          .n_head = n_head, .kv_lora = kl, .rope = rope, .kv = kv,
                                          .block_table = table + s * (n_ctx / bs),
                                          .block_tokens = bs, .pos0 = n_ctx - 1, .scale = 0.05f };
                        gpu->ops->mla_attn(gpu, &a);
                }
                gpu->ops->sync(gpu);
                t1 = now_s() - t0;
        }
        printf("bench: mla_attn %lld heads, %lld sequences x %lld tokens: %8.1f us  %7.1f GB/s on "
               "latent rows\n", (long long)n_head, (long long)n_seq, (long long)n_ctx, t1 * 1e6,
               (double)kv_bytes / t1 * 1e-9);
        gpu->ops->free(gpu, kv);
        gpu->ops->free(gpu, ql);
        gpu->ops->free(gpu, qp);
        gpu->ops->free(gpu, out);
        free(q);
        free(table);
}

static void bench_copy(size_t bytes)
{
        char *a = gpu->ops->alloc(gpu, bytes), *b = gpu->ops->alloc(gpu, bytes);
        double t0, t1;

        assert_non_null(a);
        assert_non_null(b);
        gpu->ops->copy(gpu, b, a, bytes);
        gpu->ops->sync(gpu);
        t0 = now_s();
        for (int i = 0; i < 10; i++)
                gpu->ops->copy(gpu, b, a, bytes);
        gpu->ops->sync(gpu);
        t1 = (now_s() - t0) / 10;
        printf("bench: device copy %.1f GiB: %7.1f GB/s (read + write)\n",
               (double)bytes / (1 << 30), 2.0 * (double)bytes / t1 * 1e-9);
        gpu->ops->free(gpu, a);
        gpu->ops->free(gpu, b);
}

static void cuda_bench(void **state)
{
        NEED_GPU();
        bench_copy((size_t)1 << 30);
        for (int64_t m = 1; m <= 512; m *= 8) {
                bench_matmul(MO_TYPE_BF16, 10944, 2048, m);
                bench_matmul(MO_TYPE_Q8_0, 10944, 2048, m);
                bench_matmul(MO_TYPE_Q4_K, 18432, 7168, m);
                bench_matmul(MO_TYPE_Q6_K, 18432, 7168, m);
        }
        bench_mla(16, 64, 4096);
        bench_mla(128, 64, 4096);
}

int main(void)
{
        if (getenv("MOED_CUDA_BENCH")) {
                const struct CMUnitTest bench[] = { cmocka_unit_test(cuda_bench) };

                return cmocka_run_group_tests(bench, setup, teardown);
        }

        const struct CMUnitTest tests[] = {
                cmocka_unit_test(probe_is_consistent),
                cmocka_unit_test(cuda_new_rejects_missing_devices),
                cmocka_unit_test(auto_falls_back_to_the_cpu_without_a_device),
                cmocka_unit_test(auto_uses_the_cpu_when_asked),
                cmocka_unit_test(auto_rejects_malformed_settings),
                cmocka_unit_test(auto_refuses_a_listed_device_that_is_missing),
                cmocka_unit_test(auto_makes_one_backend_per_device),
                cmocka_unit_test(cuda_calls_on_a_cpu_backend_are_harmless),
                cmocka_unit_test(memory_ops_move_bytes),
                cmocka_unit_test(matmul_matches_reference_for_every_type),
                cmocka_unit_test(matmul_rejects_uncomputable_type_with_nan),
                cmocka_unit_test(get_rows_equals_cpu_bits_for_every_type),
                cmocka_unit_test(rmsnorm_matches_cpu_in_place_and_strided),
                cmocka_unit_test(rope_matches_cpu_at_far_positions),
                cmocka_unit_test(swiglu_and_add_match_cpu_and_allow_aliasing),
                cmocka_unit_test(add_is_exact),
                cmocka_unit_test(gather_and_scatter_match_cpu_with_repeated_rows),
                cmocka_unit_test(mla_attn_matches_cpu_over_shuffled_blocks),
                cmocka_unit_test(weights_upload_once_and_views_find_them),
                cmocka_unit_test(weights_that_do_not_fit_are_refused_before_copying),
        };

        return cmocka_run_group_tests(tests, setup, teardown);
}
