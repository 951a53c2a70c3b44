/* dot.c: run-time choice of the SIMD level and the portable dot kernels.
 * The portable kernels use the same integer-dot structure as the SIMD ones
 * (integer sums per block, one float multiply-add per block), so they are
 * both the fallback for any CPU and a readable statement of the method. */
#include "kernels/cpu/dot.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "kernels/cpu/dot-impl.h"

static const char *const simd_names[] = {
        [MO_SIMD_SCALAR] = "scalar",
        [MO_SIMD_AVX2] = "avx2",
        [MO_SIMD_AVX512] = "avx512",
};

const char *mo_simd_name(enum mo_simd level)
{
        return simd_names[level];
}

#if defined(__x86_64__)
#include <cpuid.h>

/* clang 14's __builtin_cpu_supports does not know "f16c"; ask cpuid. */
static bool has_f16c(void)
{
        unsigned a, b, c, d;

        return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

bool mo_cpu_has_vnni(void)
{
#if defined(__x86_64__)
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512vnni");
#else
        return false;
#endif
}

enum mo_simd mo_cpu_simd_max(void)
{
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("fma") && has_f16c())
                return MO_SIMD_AVX512;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
            has_f16c())
                return MO_SIMD_AVX2;
#endif
        return MO_SIMD_SCALAR;
}

static struct mo_cpu_kernels tables[3];

/* Types that are computable but rare (Q2_K, Q3_K) go through the reference
 * dot product: correct, slow, and better than refusing the model. */
static void gemm_ref(int type, int64_t n, const void *w, size_t w_stride, int64_t nr,
                     const void *a, size_t a_stride, int64_t nc, float *y, int64_t y_stride)
{
        for (int64_t c = 0; c < nc; c++)
                for (int64_t r = 0; r < nr; r++)
                        y[c * y_stride + r] = mo_vec_dot_ref(type, n,
                                                             (const uint8_t *)w + r * w_stride,
                                                             (const uint8_t *)a + c * a_stride);
}

#define GEMM_REF(T)                                                                       \
        static void gemm_ref_##T(int64_t n, const void *w, size_t ws, int64_t nr,         \
                                 const void *a, size_t as, int64_t nc, float *y,          \
                                 int64_t ys)                                              \
        {                                                                                 \
                gemm_ref(MO_TYPE_##T, n, w, ws, nr, a, as, nc, y, ys);                    \
        }
GEMM_REF(Q2_K)
GEMM_REF(Q3_K)

static void fill_gaps(struct mo_cpu_kernels *k)
{
        if (!k->gemm[MO_TYPE_Q2_K])
                k->gemm[MO_TYPE_Q2_K] = gemm_ref_Q2_K;
        if (!k->gemm[MO_TYPE_Q3_K])
                k->gemm[MO_TYPE_Q3_K] = gemm_ref_Q3_K;
}

static void tables_init(void)
{
        mo_cpu_kernels_scalar(&tables[MO_SIMD_SCALAR]);
#if defined(__x86_64__)
        mo_cpu_kernels_avx2(&tables[MO_SIMD_AVX2]);
        if (mo_cpu_has_vnni())
                mo_cpu_kernels_avx512_vnni(&tables[MO_SIMD_AVX512]);
        else
                mo_cpu_kernels_avx512(&tables[MO_SIMD_AVX512]);
#endif
        for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
                fill_gaps(&tables[i]);
}

const struct mo_cpu_kernels *mo_cpu_kernels_at(enum mo_simd level)
{
        static pthread_once_t once = PTHREAD_ONCE_INIT;

        if ((int)level < 0 || level > mo_cpu_simd_max())
                return NULL;
        pthread_once(&once, tables_init);
        return &tables[level];
}

/* Read on every call (cheap next to any op) so that a test can switch
 * levels between backends in one process. */
const struct mo_cpu_kernels *mo_cpu_kernels(void)
{
        enum mo_simd level = mo_cpu_simd_max();
        const char *env = getenv("MOED_CPU_SIMD");

        if (env) {
                for (int l = 0; l < (int)(sizeof simd_names / sizeof simd_names[0]); l++)
                        if (!strcmp(env, simd_names[l]) && l < (int)level)
                                level = (enum mo_simd)l;
        }
        return mo_cpu_kernels_at(level);
}

/* ---- portable kernels ---------------------------------------------------- */

/* F16 weights: a table beats bit-twiddling per element on the portable
 * path; 256 KiB, built once. */
static float *f16_table;

static void f16_table_init(void)
{
        float *t = malloc(sizeof(float) * 65536);

        if (!t)
                abort(); /* 256 KiB at first use of an F16 kernel; nothing to recover */
        for (uint32_t i = 0; i < 65536; i++)
                t[i] = mo_half_to_float((mo_half)i);
        f16_table = t;
}

static float dot_f32(int64_t n, const void *w, const void *a)
{
        const float *x = w, *y = a;
        float acc[8] = {0};
        float s = 0;
        int64_t i = 0;

        for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++)
                        acc[l] += x[i + l] * y[i + l];
        for (; i < n; i++)
                s += x[i] * y[i];
        for (int l = 0; l < 8; l++)
                s += acc[l];
        return s;
}

static float dot_f16(int64_t n, const void *w, const void *a)
{
        const mo_half *x = w;
        const float *y = a;
        float acc[8] = {0};
        float s = 0;
        int64_t i = 0;

        for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++)
                        acc[l] += f16_table[x[i + l]] * y[i + l];
        for (; i < n; i++)
                s += f16_table[x[i]] * y[i];
        for (int l = 0; l < 8; l++)
                s += acc[l];
        return s;
}

static float dot_bf16(int64_t n, const void *w, const void *a)
{
        const uint16_t *x = w;
        const float *y = a;
        float acc[8] = {0};
        float s = 0;
        int64_t i = 0;

        for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++)
                        acc[l] += mo_bf16_to_float(x[i + l]) * y[i + l];
        for (; i < n; i++)
                s += mo_bf16_to_float(x[i]) * y[i];
        for (int l = 0; l < 8; l++)
                s += acc[l];
        return s;
}

static float dot_q8_0(int64_t n, const void *w, const void *a)
{
        const block_q8_0 *x = w, *y = a;
        float s = 0;

        for (int64_t b = 0; b < n / QK8_0; b++) {
                int32_t sumi = 0;

                for (int j = 0; j < QK8_0; j++)
                        sumi += x[b].qs[j] * y[b].qs[j];
                s += mo_half_to_float(x[b].d) * mo_half_to_float(y[b].d) * (float)sumi;
        }
        return s;
}

static float dot_q4_0(int64_t n, const void *w, const void *a)
{
        const block_q4_0 *x = w;
        const block_q8_0 *y = a;
        float s = 0;

        for (int64_t b = 0; b < n / QK4_0; b++) {
                int32_t sumi = 0;

                for (int j = 0; j < QK4_0 / 2; j++) {
                        sumi += ((x[b].qs[j] & 0x0F) - 8) * y[b].qs[j];
                        sumi += ((x[b].qs[j] >> 4) - 8) * y[b].qs[j + 16];
                }
                s += mo_half_to_float(x[b].d) * mo_half_to_float(y[b].d) * (float)sumi;
        }
        return s;
}

static float dot_q5_0(int64_t n, const void *w, const void *a)
{
        const block_q5_0 *x = w;
        const block_q8_0 *y = a;
        float s = 0;

        for (int64_t b = 0; b < n / QK5_0; b++) {
                uint32_t h = mo_load_u32le(x[b].qh);
                int32_t sumi = 0;

                for (int j = 0; j < QK5_0 / 2; j++) {
                        int lo = (x[b].qs[j] & 0x0F) | (int)(((h >> j) & 1) << 4);
                        int hi = (x[b].qs[j] >> 4) | (int)(((h >> (j + 16)) & 1) << 4);

                        sumi += (lo - 16) * y[b].qs[j] + (hi - 16) * y[b].qs[j + 16];
                }
                s += mo_half_to_float(x[b].d) * mo_half_to_float(y[b].d) * (float)sumi;
        }
        return s;
}

/* Q4_K and Q5_K share everything but the fifth bit. */
static float dot_q45_k(int64_t n, const void *w, const void *a, bool five)
{
        const block_q8_k *y = a;
        float s = 0;

        for (int64_t b = 0; b < n / QK_K; b++) {
                const uint8_t *blk = (const uint8_t *)w + b * (five ? sizeof(block_q5_k) :
                                                               sizeof(block_q4_k));
                const block_q4_k *x4 = (const block_q4_k *)blk;
                const block_q5_k *x5 = (const block_q5_k *)blk;
                const uint8_t *qs = five ? x5->qs : x4->qs;
                uint8_t sc[8], mn[8];
                int32_t sumi = 0, summ = 0;

                mo_unpack_k4_scales(x4->scales, sc, mn);
                for (int c = 0; c < 4; c++) {
                        int32_t lo = 0, hi = 0;

                        for (int l = 0; l < 32; l++) {
                                int ql = qs[32 * c + l] & 0x0F, qh = qs[32 * c + l] >> 4;

                                if (five) {
                                        ql |= ((x5->qh[l] >> (2 * c)) & 1) << 4;
                                        qh |= ((x5->qh[l] >> (2 * c + 1)) & 1) << 4;
                                }
                                lo += ql * y[b].qs[64 * c + l];
                                hi += qh * y[b].qs[64 * c + 32 + l];
                        }
                        sumi += sc[2 * c] * lo + sc[2 * c + 1] * hi;
                }
                for (int j = 0; j < 8; j++)
                        summ += mn[j] * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
                s += y[b].d * mo_half_to_float(x4->d) * (float)sumi -
                     y[b].d * mo_half_to_float(x4->dmin) * (float)summ;
        }
        return s;
}

static float dot_q4_k(int64_t n, const void *w, const void *a)
{
        return dot_q45_k(n, w, a, false);
}

static float dot_q5_k(int64_t n, const void *w, const void *a)
{
        return dot_q45_k(n, w, a, true);
}

/* Q6_K values are 0..63 minus 32; the 32 comes off through the activation
 * sums of each 16 (bsums), which share the weight's per-16 scale. */
static float dot_q6_k(int64_t n, const void *w, const void *a)
{
        const block_q6_k *x = w;
        const block_q8_k *y = a;
        float s = 0;

        for (int64_t b = 0; b < n / QK_K; b++) {
                int32_t sumi = 0, corr = 0;

                for (int h = 0; h < 2; h++) {
                        const uint8_t *ql = x[b].ql + 64 * h, *qh = x[b].qh + 32 * h;
                        const int8_t *q8 = y[b].qs + 128 * h;
                        const int8_t *sc = x[b].scales + 8 * h;

                        for (int g = 0; g < 8; g++) {
                                int32_t p = 0;

                                for (int k = 0; k < 16; k++) {
                                        int l = (g & 1) * 16 + k, part = g >> 1;
                                        int lo = part & 1 ? ql[l + 32] : ql[l];
                                        int v = (part < 2 ? lo & 0x0F : lo >> 4) |
                                                ((qh[l] >> (2 * part)) & 3) << 4;

                                        p += v * q8[16 * g + k];
                                }
                                sumi += sc[g] * p;
                        }
                }
                for (int g = 0; g < 16; g++)
                        corr += x[b].scales[g] * y[b].bsums[g];
                s += y[b].d * mo_half_to_float(x[b].d) * (float)(sumi - 32 * corr);
        }
        return s;
}

typedef float (*dot_fn)(int64_t n, const void *w, const void *a);

#define DEFINE_GEMM(name)                                                            \
        static void gemm_##name(int64_t n, const void *w, size_t w_stride, int64_t nr, \
                                const void *a, size_t a_stride, int64_t nc,          \
                                float *y, int64_t y_stride)                          \
        {                                                                            \
                for (int64_t c = 0; c < nc; c++)                                     \
                        for (int64_t r = 0; r < nr; r++)                             \
                                y[c * y_stride + r] = dot_##name(                    \
                                        n, (const uint8_t *)w + r * w_stride,        \
                                        (const uint8_t *)a + c * a_stride);          \
        }

DEFINE_GEMM(f32)
DEFINE_GEMM(f16)
DEFINE_GEMM(bf16)
DEFINE_GEMM(q8_0)
DEFINE_GEMM(q4_0)
DEFINE_GEMM(q5_0)
DEFINE_GEMM(q4_k)
DEFINE_GEMM(q5_k)
DEFINE_GEMM(q6_k)

/* ---- element-wise kernels: libm's expf, one element at a time ---- */

static void swiglu_scalar(const float *gate, const float *up, float *out, int64_t n)
{
        for (int64_t i = 0; i < n; i++) {
                float g = gate[i];

                out[i] = g / (1.0f + expf(-g)) * up[i];
        }
}

static float softmax_scalar(float *s, int64_t n, float scale)
{
        float mx = -INFINITY, sum = 0;

        for (int64_t i = 0; i < n; i++) {
                s[i] *= scale;
                mx = MO_MAX(mx, s[i]);
        }
        for (int64_t i = 0; i < n; i++) {
                s[i] = expf(s[i] - mx);
                sum += s[i];
        }
        return sum;
}

static void mix_rows_scalar(int64_t g, int64_t nt, const float *p, int64_t p_stride, const float *const *rows,
                            int64_t n, float *out, int64_t out_stride)
{
        for (int64_t t = 0; t < nt; t++)
                for (int64_t h = 0; h < g; h++) {
                        float pt = p[h * p_stride + t], *o = out + h * out_stride;

                        for (int64_t k = 0; k < n; k++)
                                o[k] += pt * rows[t][k];
                }
}

void mo_cpu_kernels_scalar(struct mo_cpu_kernels *k)
{
        static pthread_once_t once = PTHREAD_ONCE_INIT;

        pthread_once(&once, f16_table_init);
        memset(k, 0, sizeof *k);
        k->level = MO_SIMD_SCALAR;
        k->gemm[MO_TYPE_F32] = gemm_f32;
        k->gemm[MO_TYPE_F16] = gemm_f16;
        k->gemm[MO_TYPE_BF16] = gemm_bf16;
        k->gemm[MO_TYPE_Q8_0] = gemm_q8_0;
        k->gemm[MO_TYPE_Q4_0] = gemm_q4_0;
        k->gemm[MO_TYPE_Q5_0] = gemm_q5_0;
        k->gemm[MO_TYPE_Q4_K] = gemm_q4_k;
        k->gemm[MO_TYPE_Q5_K] = gemm_q5_k;
        k->gemm[MO_TYPE_Q6_K] = gemm_q6_k;
        k->quant_q8_0 = mo_quantize_row_q8_0;
        k->quant_q8_k = mo_quantize_row_q8_k;
        k->swiglu = swiglu_scalar;
        k->softmax = softmax_scalar;
        k->mix_rows = mix_rows_scalar;
}
