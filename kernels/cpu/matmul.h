/* matmul: y = W·x on the CPU for m activation rows: activations quantized
 * once to the weight's dot type, then weight rows x activation rows split
 * into cache-sized tasks over the pool. */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/pool.h"

/* A growable, 64-byte aligned buffer owned by one backend (one caller at a
 * time, like the pool). */
struct mo_cpu_scratch {
        void *p;
        size_t size;
};

/* NULL if it cannot grow to bytes. Contents are not kept across growth. */
void *mo_cpu_scratch_get(struct mo_cpu_scratch *s, size_t bytes);
void mo_cpu_scratch_release(struct mo_cpu_scratch *s);

/* y[i][r] = sum_c W[r][c] * x[i][c] for i < m (strides in floats, as in
 * backend.h). -EINVAL for a weight type without a kernel or a shape that
 * does not fit it, -ENOMEM if a scratch buffer cannot grow; y is left
 * untouched then. act holds the converted activations, plan the call's
 * bookkeeping. */
int mo_cpu_matmul(struct mo_pool *pool, const struct mo_cpu_kernels *k,
                  struct mo_cpu_scratch *act, struct mo_cpu_scratch *plan, const mo_weight *w,
                  const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t m);
/* backend.h's matmul_many: every job's activations converted in one pass
 * over the pool (once for consecutive jobs reading the same x), then every
 * job's tasks claimed from one list, so that many small products keep all
 * threads streaming weights. Results are those of mo_cpu_matmul per job.
 * Errors as mo_cpu_matmul, checked for all jobs before any is run. */
int mo_cpu_matmul_many(struct mo_pool *pool, const struct mo_cpu_kernels *k,
                       struct mo_cpu_scratch *act, struct mo_cpu_scratch *plan,
                       const mo_matmul_job *jobs, int n);
