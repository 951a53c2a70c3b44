/* matmul.c: blocking and threading of y = W·x over the dot kernels.
 * Decode (m small) is a stream over the weights: rows are cut into chunks
 * that the threads claim in turn. Prefill (m large) cuts the work into
 * [weight rows x activation rows] tasks sized so that the weight chunk and
 * the activation block stay in L2 while the kernel reuses each group of
 * four weight rows from L1 against every activation row of the block. */
#include "kernels/cpu/matmul.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"

/* Weight bytes per task for prefill, and activation rows per task: both
 * live in L2 (1-2 MiB per core on current x86 servers) with room to spare. */
#define TASK_WEIGHT_BYTES (256 * 1024)
#define TASK_ACT_ROWS 64
/* Below this many multiply-adds the pool's wake-up costs more than it saves. */
#define SERIAL_MACS (64 * 1024)

void *mo_cpu_scratch_get(struct mo_cpu_scratch *s, size_t bytes)
{
        void *p;

        if (bytes <= s->size)
                return s->p;
        bytes = (bytes + 4095) / 4096 * 4096;
        p = aligned_alloc(64, bytes);
        if (!p)
                return NULL;
        free(s->p);
        s->p = p;
        s->size = bytes;
        return p;
}

void mo_cpu_scratch_release(struct mo_cpu_scratch *s)
{
        free(s->p);
        s->p = NULL;
        s->size = 0;
}

struct quant_job {
        const struct mo_cpu_kernels *k;
        int dot_type;
        int64_t n;
        const float *x;
        int64_t x_stride;
        uint8_t *q;
        size_t q_stride;
};

static void quantize_rows(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct quant_job *j = arg;

        for (int64_t i = begin; i < end; i++) {
                const float *src = j->x + i * j->x_stride;
                void *dst = j->q + (size_t)i * j->q_stride;

                if (j->dot_type == MO_TYPE_Q8_0)
                        j->k->quant_q8_0(src, dst, j->n);
                else
                        j->k->quant_q8_k(src, dst, j->n);
        }
}

struct gemm_job {
        mo_gemm_fn gemm;
        const mo_weight *w;
        const uint8_t *a;
        size_t a_stride;
        float *y;
        int64_t y_stride, m;
        int64_t rows_per_task, cols_per_task, col_tasks;
};

static void gemm_tasks(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct gemm_job *j = arg;

        for (int64_t t = begin; t < end; t++) {
                int64_t r0 = t / j->col_tasks * j->rows_per_task;
                int64_t c0 = t % j->col_tasks * j->cols_per_task;
                int64_t nr = MO_MIN(j->rows_per_task, j->w->nrows - r0);
                int64_t nc = MO_MIN(j->cols_per_task, j->m - c0);

                j->gemm(j->w->ncols, (const uint8_t *)j->w->data + (size_t)r0 * j->w->row_bytes,
                        j->w->row_bytes, nr, j->a + (size_t)c0 * j->a_stride, j->a_stride, nc,
                        j->y + c0 * j->y_stride + r0, j->y_stride);
        }
}

static int64_t round_up4(int64_t v)
{
        return (v + 3) / 4 * 4;
}

/* Task shape: decode wants contiguous weight chunks, several per thread
 * so that a late thread does not hold up the others; prefill wants chunks
 * that fit L2 next to the activation block. */
static void plan_tasks(struct gemm_job *j, int threads)
{
        int64_t nrows = j->w->nrows;

        j->cols_per_task = MO_MIN(j->m, TASK_ACT_ROWS);
        j->col_tasks = (j->m + j->cols_per_task - 1) / j->cols_per_task;
        if (j->m <= 3) {
                j->rows_per_task = round_up4(MO_MAX(nrows / (8 * threads), 4));
        } else {
                int64_t fit = (int64_t)(TASK_WEIGHT_BYTES / MO_MAX(j->w->row_bytes, 1));
                int64_t spread = nrows * j->col_tasks / (4 * threads);

                j->rows_per_task = round_up4(MO_MAX(MO_MIN(fit, spread / j->col_tasks), 4));
        }
}

int mo_cpu_matmul(struct mo_pool *pool, const struct mo_cpu_kernels *k,
                  struct mo_cpu_scratch *s, const mo_weight *w,
                  const float *x, int64_t x_stride, float *y, int64_t y_stride,
                  int64_t m)
{
        struct gemm_job j = { .w = w, .y = y, .y_stride = y_stride, .m = m };
        int dot_type;
        int64_t n_tasks;

        if (w->type < 0 || w->type >= MO_TYPE_COUNT || !k->gemm[w->type] ||
            mo_row_bytes(w->type, w->ncols) == 0 || w->row_bytes < mo_row_bytes(w->type, w->ncols))
                return -EINVAL;
        if (m <= 0 || w->nrows <= 0)
                return 0;
        j.gemm = k->gemm[w->type];
        dot_type = mo_vec_dot_type(w->type);
        if (dot_type == MO_TYPE_F32) {
                j.a = (const uint8_t *)x;
                j.a_stride = (size_t)x_stride * sizeof(float);
        } else {
                struct quant_job q = { .k = k, .dot_type = dot_type, .n = w->ncols, .x = x,
                                       .x_stride = x_stride };

                q.q_stride = mo_row_bytes(dot_type, w->ncols);
                if (q.q_stride == 0)
                        return -EINVAL;
                q.q = mo_cpu_scratch_get(s, q.q_stride * (size_t)m);
                if (!q.q)
                        return -ENOMEM;
                mo_pool_for(pool, m, MO_MAX(1, 8192 / w->ncols), quantize_rows, &q);
                j.a = q.q;
                j.a_stride = q.q_stride;
        }
        plan_tasks(&j, mo_pool_threads(pool));
        n_tasks = (w->nrows + j.rows_per_task - 1) / j.rows_per_task * j.col_tasks;
        if (w->nrows * w->ncols * m < SERIAL_MACS)
                gemm_tasks(&j, 0, n_tasks, 0);
        else
                mo_pool_for(pool, n_tasks, 1, gemm_tasks, &j);
        return 0;
}
