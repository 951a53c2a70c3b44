/* cuda-internal: what the CUDA backend's .cu files share: the per-device
 * context, error reporting, the staging of host index arrays, the weight
 * map, growable device scratch, and the op entry points that
 * cuda-backend.cu gathers into its ops table. Not for C callers. */
#pragma once
#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "common/moerr.h"
#include "kernels/backend.h"
/* quant.h checks its block layouts with C11's _Static_assert. */
#define _Static_assert static_assert
#include "kernels/quant.h"
#undef _Static_assert
}
#include "kernels/cuda/cuda-backend.h"

#define CUDA_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CUDA_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Device memory that grows on demand and is never shrunk. */
struct cuda_buf {
        void *p;
        size_t size;
};

/* One uploaded stretch of host memory and where its copy lives. */
struct cuda_range {
        uintptr_t host;
        size_t bytes;
        char *dev;
};

/* A hash slot: host address of a weight -> its device copy, valid for
 * avail bytes from there. */
struct cuda_slot {
        uintptr_t key;
        char *dev;
        size_t avail;
};

struct cuda_ctx {
        struct mo_backend b;
        int device;
        char name[256];
        int sm_count;
        size_t smem_optin;  /* dynamic shared memory a block may opt into */
        cudaStream_t stream;
        cublasHandle_t blas;

        /* Staging of host index arrays: a pinned ring and its device twin,
         * used in halves; a half is reused only after the copies queued out
         * of it have run (fence events). */
        char *pin, *dring;
        size_t ring_size, ring_head;
        int ring_half;
        cudaEvent_t fence[2];

        /* Weights: sorted ranges, a hash of exact addresses, allocations. */
        struct cuda_range *ranges;
        size_t n_ranges, cap_ranges;
        struct cuda_slot *slots;
        size_t n_slots, cap_slots; /* cap a power of two */
        void **allocs;
        size_t n_allocs, cap_allocs;
        uint64_t weight_bytes;

        /* Scratch of the ops. */
        struct cuda_buf act_hi, act_lo, act_scale, tile, mla_part, tmp;
};

static inline struct cuda_ctx *cuda_ctx_of(mo_backend *b)
{
        return (struct cuda_ctx *)b->ctx;
}

/* Says once per process that an op failed and why; ops have no error
 * return, so they also poison their output with NaN. */
void cuda_report(const char *op, const char *why);
/* false (and reported) unless r is cudaSuccess; clears a non-sticky error. */
bool cuda_check(const char *op, cudaError_t r);
/* Checks the launch just queued. */
bool cuda_launched(const char *op);
/* Makes the context's device current for the calling thread. */
bool cuda_enter(struct cuda_ctx *c, const char *op);

/* A device copy of n bytes of host memory, valid for the ops queued after
 * it on the context's stream; NULL (reported) on failure. */
const void *cuda_stage(struct cuda_ctx *c, const void *host, size_t bytes, const char *op);
/* The device copy of a weight (uploaded on first use); device pointers
 * pass through unchanged. NULL (reported) on failure. */
const char *cuda_weight(struct cuda_ctx *c, const void *host, size_t bytes, const char *op);
/* Scratch of at least bytes; waits for queued work before growing. */
void *cuda_scratch(struct cuda_ctx *c, struct cuda_buf *s, size_t bytes, const char *op);
void cuda_buf_release(struct cuda_buf *s);

/* NaN into rows of y (m rows of n floats, stride floats apart). */
void cuda_fill_nan(struct cuda_ctx *c, float *y, int64_t m, int64_t n, int64_t stride);

/* The ops, one per entry of struct mo_backend_ops. */
void cuda_op_matmul(mo_backend *b, const mo_weight *w, const float *x, int64_t x_stride,
                    float *y, int64_t y_stride, int64_t m);
void cuda_op_get_rows(mo_backend *b, const mo_weight *w, const int32_t *ids, int64_t n,
                      float *y);
void cuda_op_rmsnorm(mo_backend *b, const float *x, int64_t x_stride, const float *g,
                     int64_t n, int64_t m, float eps, float *y, int64_t y_stride);
void cuda_op_rope(mo_backend *b, float *x, int64_t m, int64_t n_head, int64_t row_stride,
                  int64_t head_stride, const int32_t *pos, const mo_rope *r);
void cuda_op_swiglu(mo_backend *b, const float *gate, const float *up, float *out, int64_t n);
void cuda_op_add(mo_backend *b, float *y, const float *x, int64_t n);
void cuda_op_gather_rows(mo_backend *b, const float *src, int64_t dim, const int32_t *rows,
                         int64_t n, float *dst);
void cuda_op_scatter_add_rows(mo_backend *b, const float *src, int64_t dim,
                              const int32_t *rows, const float *w, int64_t n, float *dst);
void cuda_op_mla_attn(mo_backend *b, const mo_mla_args *a);

/* Per-device setup of the attention kernels (shared memory limits). */
int cuda_mla_init(struct cuda_ctx *c, struct moerr *e);
/* Whether the kernels of this build have code the device can run. */
int cuda_kernels_check(struct cuda_ctx *c, struct moerr *e);

/* Grid size for n items of `per_block` each, capped for grid-stride loops. */
static inline unsigned cuda_blocks(int64_t n, int per_block)
{
        int64_t b = (n + per_block - 1) / per_block;

        return (unsigned)CUDA_MAX(1, CUDA_MIN(b, (int64_t)1 << 20));
}
