/* dot: the CPU dot-product kernels (portable, AVX2, AVX-512) and the
 * run-time choice between them. One kernel per weight type computes a small
 * matrix of dot products between weight rows and activation rows already in
 * mo_vec_dot_type form; matmul.c decides the blocking and the threads. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/quant.h"

enum mo_simd {
        MO_SIMD_SCALAR = 0,
        MO_SIMD_AVX2 = 1,
        MO_SIMD_AVX512 = 2,
};

/* y[c*y_stride + r] = dot(weight row r, activation row c) for r < nr,
 * c < nc, over n elements. Weight row r is at w + r*w_stride, activation
 * row c at a + c*a_stride (bytes). Every element is summed in the same order
 * whatever nr, nc and the caller's blocking are, so results do not depend on
 * the thread count or on how many activation rows come at once. */
typedef void (*mo_gemm_fn)(int64_t n, const void *w, size_t w_stride, int64_t nr,
                           const void *a, size_t a_stride, int64_t nc,
                           float *y, int64_t y_stride);

/* Activation quantizers: bit for bit what mo_quantize_row_q8_0/_q8_k
 * write (the tests hold them to it), only faster. */
typedef void (*mo_quant_q8_0_fn)(const float *x, block_q8_0 *y, int64_t n);
typedef void (*mo_quant_q8_k_fn)(const float *x, block_q8_k *y, int64_t n);

/* out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i];
 * out may alias either input. */
typedef void (*mo_swiglu_fn)(const float *gate, const float *up, float *out, int64_t n);
/* s[i] = e^(scale x s[i] - max) in place, max over the scaled s; returns
 * the sum of the new s. */
typedef float (*mo_softmax_fn)(float *s, int64_t n, float scale);

/* out[h][k] += p[h * p_stride + t] * rows[t][k] for t < nt in order, h < g,
 * k < n (out[h] at out + h * out_stride): the attention's weighted sum of
 * cached rows for g heads. Each element adds its terms one by one in
 * order of t, so the caller may cut the tokens anywhere. */
typedef void (*mo_mix_rows_fn)(int64_t g, int64_t nt, const float *p, int64_t p_stride,
                               const float *const *rows, int64_t n, float *out, int64_t out_stride);

/* At the scalar level the element-wise kernels use libm's expf and are
 * the reference; the SIMD levels' e^x is within 2 ulp of the true value.
 * Each element is computed the same way wherever it falls in the array. */
struct mo_cpu_kernels {
        enum mo_simd level;
        mo_gemm_fn gemm[MO_TYPE_COUNT]; /* NULL for types without a kernel */
        mo_quant_q8_0_fn quant_q8_0;
        mo_quant_q8_k_fn quant_q8_k;
        mo_swiglu_fn swiglu;
        mo_softmax_fn softmax;
        mo_mix_rows_fn mix_rows;
};

/* The kernels of the current level: the best the CPU supports, lowered by
 * MOED_CPU_SIMD. Decided once, on first use. */
const struct mo_cpu_kernels *mo_cpu_kernels(void);
/* The kernels of one level, or NULL if the CPU (or build) cannot run it;
 * for tests and benchmarks that compare levels in one process. */
const struct mo_cpu_kernels *mo_cpu_kernels_at(enum mo_simd level);
/* Highest level this CPU and build support, ignoring MOED_CPU_SIMD. */
enum mo_simd mo_cpu_simd_max(void);
const char *mo_simd_name(enum mo_simd level);

/* Per-level tables, filled by dot.c, dot-avx2.c and dot-avx512.c. */
void mo_cpu_kernels_scalar(struct mo_cpu_kernels *k);
void mo_cpu_kernels_avx2(struct mo_cpu_kernels *k);
void mo_cpu_kernels_avx512(struct mo_cpu_kernels *k);
/* The same level built with VNNI; used in its place when the CPU has it. */
void mo_cpu_kernels_avx512_vnni(struct mo_cpu_kernels *k);
/* Whether the AVX-512 table in use is the VNNI build. */
bool mo_cpu_has_vnni(void);
/* The AVX2 quantizers, shared by the AVX-512 table. */
void mo_quantize_q8_0_avx2(const float *x, block_q8_0 *y, int64_t n);
void mo_quantize_q8_k_avx2(const float *x, block_q8_k *y, int64_t n);
/* The AVX2 element-wise and mixing kernels, shared by the AVX-512 table:
 * on Zen 4 eight lanes run the floats as fast as sixteen. */
void mo_swiglu_avx2(const float *gate, const float *up, float *out, int64_t n);
float mo_softmax_avx2(float *s, int64_t n, float scale);
void mo_mix_rows_avx2(int64_t g, int64_t nt, const float *p, int64_t p_stride, const float *const *rows,
                      int64_t n, float *out, int64_t out_stride);
