/* backend: the seam between the model (engine/) and compute (kernels/).
 *
 * One table of operations per device kind, in the manner of ggml's backend
 * interface but imperative: engine/forward.c calls these in order and never
 * learns which device runs them. Activations are F32, row-major; weights
 * stay in their stored type (mo_weight). Pointers to activations are memory
 * of the backend (host memory for the CPU backend, device memory for CUDA):
 * allocate them with ops->alloc and move data with upload/download. Index
 * arrays (token ids, row lists, weights of scattered rows, block tables,
 * positions) are always host memory: a device backend copies them itself. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"

/* A 2-D weight view in its stored type: nrows rows of ncols elements, row r
 * at data + r*row_bytes. y = W·x maps ncols inputs to nrows outputs. A slice
 * of a 3-D tensor (one expert, one head) is a view with data moved. */
typedef struct mo_weight {
        int type;          /* enum mo_type */
        int64_t ncols;     /* inputs: ne0 */
        int64_t nrows;     /* outputs: ne1 */
        size_t row_bytes;  /* stride between rows */
        const void *data;
} mo_weight;

/* RoPE as llama.cpp applies it to deepseek2: adjacent pairs (x[2i],
 * x[2i+1]) of the first n_dims values rotate by pos*freq[i], and both are
 * multiplied by mscale. freq already includes YaRN's interpolation ramp. */
typedef struct mo_rope {
        int64_t n_dims;     /* even */
        const float *freq;  /* n_dims/2 entries, host memory */
        float mscale;
} mo_rope;

/* Absorbed MLA attention for one sequence over its paged latent cache.
 * Cache rows are [c (kv_lora) | k_pe (rope)]; row of token j lives in
 * kv + (block_table[j / block_tokens] * block_tokens + j % block_tokens)
 * * row_width, row_width = kv_lora + rope. Query row i (0 <= i < n_q) sits
 * at position pos0 + i and attends causally to tokens 0 .. pos0 + i.
 *   score(j) = scale * (q_lat . c_j + q_pe . k_pe_j)
 *   out_lat  = sum_j softmax(score)_j * c_j */
typedef struct mo_mla_args {
        const float *q_lat;   /* [n_q][n_head][kv_lora] */
        const float *q_pe;    /* [n_q][n_head][rope], already rotated */
        float *out_lat;       /* [n_q][n_head][kv_lora] */
        int64_t n_q, n_head, kv_lora, rope;
        const float *kv;      /* the layer's cache arena */
        const int32_t *block_table; /* host memory */
        int64_t block_tokens;
        int64_t pos0;
        float scale;
} mo_mla_args;

/* One product of a matmul_many call: y[i] = W x[i] for i < m, strides in
 * floats as for matmul. */
typedef struct mo_matmul_job {
        const mo_weight *w;
        const float *x;
        int64_t x_stride;
        float *y;
        int64_t y_stride;
        int64_t m;
} mo_matmul_job;

typedef struct mo_backend mo_backend;

struct mo_backend_ops {
        const char *name;
        void (*destroy)(mo_backend *b);

        void *(*alloc)(mo_backend *b, size_t bytes); /* zeroed; NULL on failure */
        void (*free)(mo_backend *b, void *p);
        void (*upload)(mo_backend *b, void *dst, const void *src, size_t bytes);
        void (*download)(mo_backend *b, void *dst, const void *src, size_t bytes);
        void (*zero)(mo_backend *b, void *dst, size_t bytes);
        void (*copy)(mo_backend *b, void *dst, const void *src, size_t bytes);

        /* y[i][r] = sum_c W[r][c] * x[i][c], for i < m. Row i of x starts at
         * x + i*x_stride, of y at y + i*y_stride (strides in floats). */
        void (*matmul)(mo_backend *b, const mo_weight *w,
                       const float *x, int64_t x_stride,
                       float *y, int64_t y_stride, int64_t m);
        /* n independent products, the same bits as n matmul calls; no
         * job's y may overlap another job's x or y. A backend runs them as
         * one piece of work: the experts of a MoE layer, gate and up of an
         * FFN or the heads of k_b would otherwise be dozens of small
         * launches, each too small to keep every core streaming. Jobs
         * that read the same x share its conversion. NULL: the engine
         * calls matmul for each job. */
        void (*matmul_many)(mo_backend *b, const mo_matmul_job *jobs, int n);
        /* y[i] = W[ids[i]] converted to F32 (embedding lookup). */
        void (*get_rows)(mo_backend *b, const mo_weight *w,
                         const int32_t *ids, int64_t n, float *y);
        /* y[i] = x[i] / sqrt(mean(x[i]^2) + eps) * g, rows of n; in place ok. */
        void (*rmsnorm)(mo_backend *b, const float *x, int64_t x_stride,
                        const float *g, int64_t n, int64_t m, float eps,
                        float *y, int64_t y_stride);
        /* In place, for token i < m and head h < n_head: rotate the n_dims
         * values at x + i*row_stride + h*head_stride by position pos[i]. */
        void (*rope)(mo_backend *b, float *x, int64_t m, int64_t n_head,
                     int64_t row_stride, int64_t head_stride,
                     const int32_t *pos, const mo_rope *r);
        /* out[k] = silu(gate[k]) * up[k], k < n; out may alias gate. */
        void (*swiglu)(mo_backend *b, const float *gate, const float *up,
                       float *out, int64_t n);
        /* y[k] += x[k], k < n. */
        void (*add)(mo_backend *b, float *y, const float *x, int64_t n);
        /* dst[i] = src[rows[i]] (rows of dim floats), i < n. */
        void (*gather_rows)(mo_backend *b, const float *src, int64_t dim,
                            const int32_t *rows, int64_t n, float *dst);
        /* dst[rows[i]] += w[i] * src[i], i < n; rows and w in host memory. */
        void (*scatter_add_rows)(mo_backend *b, const float *src, int64_t dim,
                                 const int32_t *rows, const float *w,
                                 int64_t n, float *dst);
        void (*mla_attn)(mo_backend *b, const mo_mla_args *a);
        /* mla_attn for n sequences, the same bits as n calls, as one piece
         * of work: in a decode step every sequence has one query row, far
         * too little to wake the cores for on its own. NULL: the engine
         * calls mla_attn for each. */
        void (*mla_attn_many)(mo_backend *b, const mo_mla_args *a, int n);
        /* Waits until every queued operation has finished. */
        void (*sync)(mo_backend *b);
        /* Backend memory is ordinary host memory (the CPU backend): the
         * host may read results in place after sync, without a download. */
        bool host_memory;
};

struct mo_backend {
        const struct mo_backend_ops *ops;
        void *ctx;
};

/* The CPU backend: a pool of n_threads workers (0 = one per online CPU),
 * SIMD kernels chosen at run time (AVX-512, AVX2, portable). */
int mo_backend_cpu_new(int n_threads, mo_backend **out, struct moerr *e);
/* Which SIMD level the CPU kernels run: "avx512", "avx2" or "scalar".
 * MOED_CPU_SIMD=scalar|avx2|avx512 in the environment lowers it (for tests
 * and benchmarks of each path). */
const char *mo_cpu_simd_level(void);
int mo_cpu_threads(const mo_backend *b);

static inline void mo_backend_free(mo_backend *b)
{
        if (b)
                b->ops->destroy(b);
}
