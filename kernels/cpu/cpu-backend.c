/* cpu-backend.c: the CPU implementation of struct mo_backend_ops: host
 * memory, a worker pool, and the element-wise, normalisation, RoPE and MLA
 * attention ops; matmul lives in matmul.c, the SIMD kernels in dot*.c.
 * Every op is synchronous and computes each output element on exactly one
 * thread in a fixed order, so results never depend on the thread count. */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "kernels/backend.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/pool.h"
#include "kernels/quant.h"

/* Element-wise work below this many floats stays on the calling thread. */
#define SERIAL_FLOATS 32768

struct cpu_ctx {
        struct mo_backend b;
        struct mo_pool *pool;
        const struct mo_cpu_kernels *k;
        struct mo_cpu_scratch act;       /* quantized activations, rope tables */
        struct mo_cpu_scratch plan;      /* a matmul call's task lists */
        struct mo_cpu_scratch mla_plan;  /* an attention call's task counts */
        struct mo_cpu_scratch *per_thread; /* attention scores and queries */
};

static struct cpu_ctx *ctx_of(mo_backend *b)
{
        return b->ctx;
}

/* Grain that gives each thread about one chunk, never below the serial
 * threshold (in items of `width` floats). */
static int64_t grain_for(struct cpu_ctx *c, int64_t n, int64_t width)
{
        int64_t min_items = MO_MAX(1, SERIAL_FLOATS / MO_MAX(width, 1));
        int threads = mo_pool_threads(c->pool);

        return MO_MAX(min_items, (n + threads - 1) / threads);
}

static void fill_nan(float *y, int64_t n)
{
        for (int64_t i = 0; i < n; i++)
                y[i] = NAN;
}

/* Ops have no error return; a failure poisons the output with NaN (which
 * the engine's checks catch) and says why once per process. */
static void report_once(const char *op, int r)
{
        static atomic_bool said;

        if (!atomic_exchange(&said, true))
                fprintf(stderr, "moed cpu backend: %s failed: %s (output set to NaN)\n", op,
                        strerror(-r));
}

/* ---- memory --------------------------------------------------------------- */

static void *cpu_alloc(mo_backend *b, size_t bytes)
{
        size_t sz = (MO_MAX(bytes, 1) + 63) / 64 * 64;
        void *p;

        if (sz < bytes)
                return NULL;
        p = aligned_alloc(64, sz);
        if (p)
                memset(p, 0, sz);
        return p;
}

static void cpu_free(mo_backend *b, void *p)
{
        free(p);
}

static void cpu_memcpy(mo_backend *b, void *dst, const void *src, size_t bytes)
{
        if (bytes)
                memmove(dst, src, bytes);
}

static void cpu_zero(mo_backend *b, void *dst, size_t bytes)
{
        if (bytes)
                memset(dst, 0, bytes);
}

static void cpu_sync(mo_backend *b)
{
        /* Every op has finished when it returns. */
}

/* ---- matmul and embedding -------------------------------------------------- */

static void cpu_matmul(mo_backend *b, const mo_weight *w, const float *x, int64_t x_stride,
                       float *y, int64_t y_stride, int64_t m)
{
        struct cpu_ctx *c = ctx_of(b);
        int r = mo_cpu_matmul(c->pool, c->k, &c->act, &c->plan, w, x, x_stride, y, y_stride, m);

        if (r < 0) {
                report_once("matmul", r);
                for (int64_t i = 0; i < m; i++)
                        fill_nan(y + i * y_stride, w->nrows);
        }
}

static void cpu_matmul_many(mo_backend *b, const mo_matmul_job *jobs, int n)
{
        struct cpu_ctx *c = ctx_of(b);
        int r = mo_cpu_matmul_many(c->pool, c->k, &c->act, &c->plan, jobs, n);

        if (r < 0) {
                report_once("matmul_many", r);
                for (int j = 0; j < n; j++)
                        for (int64_t i = 0; i < jobs[j].m; i++)
                                fill_nan(jobs[j].y + i * jobs[j].y_stride, jobs[j].w->nrows);
        }
}

struct rows_job {
        const mo_weight *w;
        const int32_t *ids;
        float *y;
};

static void get_rows_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct rows_job *j = arg;

        for (int64_t i = begin; i < end; i++) {
                float *dst = j->y + i * j->w->ncols;
                int32_t id = j->ids[i];

                if (id < 0 || id >= j->w->nrows)
                        fill_nan(dst, j->w->ncols);
                else
                        mo_dequantize_row(j->w->type, (const uint8_t *)j->w->data +
                                          (size_t)id * j->w->row_bytes, dst, j->w->ncols);
        }
}

static void cpu_get_rows(mo_backend *b, const mo_weight *w, const int32_t *ids, int64_t n,
                         float *y)
{
        struct cpu_ctx *c = ctx_of(b);
        const struct mo_type_info *t = mo_type_get(w->type);
        struct rows_job j = { w, ids, y };

        if (!t || !t->computable || mo_row_bytes(w->type, w->ncols) == 0) {
                report_once("get_rows", -EINVAL);
                fill_nan(y, n * w->ncols);
                return;
        }
        mo_pool_for(c->pool, n, grain_for(c, n, w->ncols), get_rows_part, &j);
}

/* ---- normalisation and element-wise ----------------------------------------- */

struct norm_job {
        const float *x, *g;
        float *y;
        int64_t x_stride, y_stride, n;
        float eps;
};

/* As ggml: squares in float, summed in double; y = (x * scale) * g. */
static void rmsnorm_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct norm_job *j = arg;

        for (int64_t i = begin; i < end; i++) {
                const float *x = j->x + i * j->x_stride;
                float *y = j->y + i * j->y_stride;
                double sum = 0;
                float mean, scale;

                for (int64_t k = 0; k < j->n; k++)
                        sum += (double)(x[k] * x[k]);
                mean = (float)(sum / (double)j->n);
                scale = 1.0f / sqrtf(mean + j->eps);
                for (int64_t k = 0; k < j->n; k++)
                        y[k] = x[k] * scale * j->g[k];
        }
}

static void cpu_rmsnorm(mo_backend *b, const float *x, int64_t x_stride, const float *g,
                        int64_t n, int64_t m, float eps, float *y, int64_t y_stride)
{
        struct cpu_ctx *c = ctx_of(b);
        struct norm_job j = { x, g, y, x_stride, y_stride, n, eps };

        if (n > 0)
                mo_pool_for(c->pool, m, grain_for(c, m, n), rmsnorm_part, &j);
}

struct rope_job {
        float *x;
        int64_t n_head, row_stride, head_stride, half;
        const float *cs; /* per row: half cosines then half sines, scaled */
};

static void rope_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct rope_job *j = arg;

        for (int64_t i = begin; i < end; i++) {
                const float *cs = j->cs + i * 2 * j->half, *sn = cs + j->half;

                for (int64_t h = 0; h < j->n_head; h++) {
                        float *v = j->x + i * j->row_stride + h * j->head_stride;

                        for (int64_t p = 0; p < j->half; p++) {
                                float x0 = v[2 * p], x1 = v[2 * p + 1];

                                v[2 * p] = x0 * cs[p] - x1 * sn[p];
                                v[2 * p + 1] = x0 * sn[p] + x1 * cs[p];
                        }
                }
        }
}

static void cpu_rope(mo_backend *b, float *x, int64_t m, int64_t n_head, int64_t row_stride,
                     int64_t head_stride, const int32_t *pos, const mo_rope *r)
{
        struct cpu_ctx *c = ctx_of(b);
        struct rope_job j = { x, n_head, row_stride, head_stride, r->n_dims / 2, NULL };
        float *cs;

        if (m <= 0 || j.half <= 0)
                return;
        /* cos/sin once per token, shared by every head. */
        cs = mo_cpu_scratch_get(&c->act, sizeof(float) * 2 * (size_t)(j.half * m));
        if (!cs) {
                report_once("rope", -ENOMEM);
                for (int64_t i = 0; i < m; i++)
                        for (int64_t h = 0; h < n_head; h++)
                                fill_nan(x + i * row_stride + h * head_stride, r->n_dims);
                return;
        }
        for (int64_t i = 0; i < m; i++)
                for (int64_t p = 0; p < j.half; p++) {
                        float theta = (float)pos[i] * r->freq[p];

                        cs[i * 2 * j.half + p] = cosf(theta) * r->mscale;
                        cs[i * 2 * j.half + j.half + p] = sinf(theta) * r->mscale;
                }
        j.cs = cs;
        mo_pool_for(c->pool, m, grain_for(c, m, n_head * r->n_dims), rope_part, &j);
}

struct ew_job {
        const float *a, *b;
        float *out;
        const struct mo_cpu_kernels *k;
};

static void swiglu_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct ew_job *j = arg;

        j->k->swiglu(j->a + begin, j->b + begin, j->out + begin, end - begin);
}

static void cpu_swiglu(mo_backend *b, const float *gate, const float *up, float *out, int64_t n)
{
        struct cpu_ctx *c = ctx_of(b);
        struct ew_job j = { gate, up, out, c->k };

        mo_pool_for(c->pool, n, grain_for(c, n, 1), swiglu_part, &j);
}

static void add_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct ew_job *j = arg;

        for (int64_t k = begin; k < end; k++)
                j->out[k] += j->a[k];
}

static void cpu_add(mo_backend *b, float *y, const float *x, int64_t n)
{
        struct cpu_ctx *c = ctx_of(b);
        struct ew_job j = { x, NULL, y, c->k };

        mo_pool_for(c->pool, n, grain_for(c, n, 1), add_part, &j);
}

/* ---- row movement ------------------------------------------------------------ */

struct move_job {
        const float *src;
        float *dst;
        int64_t dim, n;
        const int32_t *rows;
        const float *w;
};

static void gather_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct move_job *j = arg;

        for (int64_t i = begin; i < end; i++)
                memcpy(j->dst + i * j->dim, j->src + (int64_t)j->rows[i] * j->dim,
                       sizeof(float) * (size_t)j->dim);
}

static void cpu_gather_rows(mo_backend *b, const float *src, int64_t dim, const int32_t *rows,
                            int64_t n, float *dst)
{
        struct cpu_ctx *c = ctx_of(b);
        struct move_job j = { src, dst, dim, n, rows, NULL };

        mo_pool_for(c->pool, n, grain_for(c, n, dim), gather_part, &j);
}

/* Threads split the columns, not the rows: a destination row may appear
 * several times, and each column then still adds its terms in index order. */
static void scatter_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct move_job *j = arg;

        for (int64_t i = 0; i < j->n; i++) {
                const float *s = j->src + i * j->dim;
                float *d = j->dst + (int64_t)j->rows[i] * j->dim;
                float wi = j->w[i];

                for (int64_t k = begin; k < end; k++)
                        d[k] += wi * s[k];
        }
}

static void cpu_scatter_add_rows(mo_backend *b, const float *src, int64_t dim,
                                 const int32_t *rows, const float *w, int64_t n, float *dst)
{
        struct cpu_ctx *c = ctx_of(b);
        struct move_job j = { src, dst, dim, n, rows, w };
        int64_t grain = MO_MAX(64, grain_for(c, dim, n));

        if (n > 0)
                mo_pool_for(c->pool, dim, (grain + 15) / 16 * 16, scatter_part, &j);
}

/* ---- MLA attention ------------------------------------------------------------ */

/* The tasks of one mla_attn_many call: sequence s owns tasks
 * [task_end[s-1], task_end[s]), n_q rows of tasks_per_row head groups. */
struct mla_job {
        const mo_mla_args *a;
        const int64_t *task_end;
        int n;
        const struct mo_cpu_kernels *k;
        struct mo_cpu_scratch *per_thread;
        int64_t heads_per_task, tasks_per_row, n_ctx_max;
};

/* Scores of `g` heads against every visible token, one physical block at a
 * time, with the F32 kernel (cache rows are the "weights", queries the
 * activations). */
static void mla_scores(const struct mla_job *j, const mo_mla_args *a, const float *qcat, int64_t g,
                       int64_t n_ctx, float *scores)
{
        int64_t width = a->kv_lora + a->rope;

        for (int64_t t0 = 0; t0 < n_ctx; t0 += a->block_tokens) {
                int64_t phys = a->block_table[t0 / a->block_tokens];
                const float *rows = a->kv + phys * a->block_tokens * width;

                j->k->gemm[MO_TYPE_F32](width, rows, (size_t)width * sizeof(float),
                                        MO_MIN(a->block_tokens, n_ctx - t0), qcat,
                                        (size_t)width * sizeof(float), g, scores + t0,
                                        j->n_ctx_max);
        }
}

/* out[h] = sum_t p[h][t] * c_t / sum[h]: each cached row is read once for
 * the whole group of heads, the block table resolved for a run of tokens
 * at a time. */
static void mla_mix(const struct mla_job *j, const mo_mla_args *a, const float *p, const float *sums,
                    int64_t g, int64_t n_ctx, float *out, int64_t out_head_stride)
{
        enum { RUN = 64 };
        const float *rows[RUN];
        int64_t width = a->kv_lora + a->rope, kl = a->kv_lora;

        for (int64_t h = 0; h < g; h++)
                memset(out + h * out_head_stride, 0, sizeof(float) * (size_t)kl);
        for (int64_t t0 = 0; t0 < n_ctx; t0 += RUN) {
                int64_t tn = MO_MIN(RUN, n_ctx - t0);

                for (int64_t i = 0; i < tn; i++) {
                        int64_t t = t0 + i, phys = a->block_table[t / a->block_tokens];

                        rows[i] = a->kv + (phys * a->block_tokens + t % a->block_tokens) * width;
                }
                j->k->mix_rows(g, tn, p + t0, j->n_ctx_max, rows, kl, out, out_head_stride);
        }
        for (int64_t h = 0; h < g; h++) {
                float inv = 1.0f / sums[h];
                float *o = out + h * out_head_stride;

                for (int64_t k = 0; k < kl; k++)
                        o[k] *= inv;
        }
}

/* Query row i of sequence a, heads h0 .. h0 + g - 1. */
static void mla_task(const struct mla_job *j, const mo_mla_args *a, int64_t i, int64_t h0, int64_t g,
                     float *qcat)
{
        int64_t width = a->kv_lora + a->rope, n_ctx = a->pos0 + i + 1;
        float *scores = qcat + j->heads_per_task * width;
        float sums[64];

        for (int64_t h = 0; h < g; h++) {
                int64_t qi = i * a->n_head + h0 + h;

                memcpy(qcat + h * width, a->q_lat + qi * a->kv_lora, sizeof(float) * (size_t)a->kv_lora);
                memcpy(qcat + h * width + a->kv_lora, a->q_pe + qi * a->rope, sizeof(float) * (size_t)a->rope);
        }
        mla_scores(j, a, qcat, g, n_ctx, scores);
        for (int64_t h = 0; h < g; h++)
                sums[h] = j->k->softmax(scores + h * j->n_ctx_max, n_ctx, a->scale);
        mla_mix(j, a, scores, sums, g, n_ctx, a->out_lat + (i * a->n_head + h0) * a->kv_lora, a->kv_lora);
}

static void mla_part(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct mla_job *j = arg;
        int s = 0;

        while (j->task_end[s] <= begin)
                s++;
        for (int64_t task = begin; task < end; task++) {
                int64_t local;
                const mo_mla_args *a;

                while (task >= j->task_end[s])
                        s++;
                a = &j->a[s];
                local = task - (s ? j->task_end[s - 1] : 0);
                mla_task(j, a, local / j->tasks_per_row, local % j->tasks_per_row * j->heads_per_task,
                         MO_MIN(j->heads_per_task, a->n_head - local % j->tasks_per_row * j->heads_per_task),
                         j->per_thread[tid].p);
        }
}

static bool mla_args_valid(const mo_mla_args *a, int n)
{
        for (int s = 0; s < n; s++)
                if (a[s].n_head != a[0].n_head || a[s].kv_lora != a[0].kv_lora || a[s].rope != a[0].rope ||
                    a[s].n_q < 0 || a[s].pos0 < 0)
                        return false;
        return true;
}

static void mla_fail(const mo_mla_args *a, int n, const char *why, int r)
{
        report_once(why, r);
        for (int s = 0; s < n; s++)
                if (a[s].n_q > 0 && a[s].n_head > 0 && a[s].kv_lora > 0)
                        fill_nan(a[s].out_lat, a[s].n_q * a[s].n_head * a[s].kv_lora);
}

static void cpu_mla_attn_many(mo_backend *b, const mo_mla_args *a, int n)
{
        struct cpu_ctx *c = ctx_of(b);
        int threads = mo_pool_threads(c->pool);
        struct mla_job j = { .a = a, .n = n, .k = c->k, .per_thread = c->per_thread };
        int64_t width, rows = 0, *task_end;
        size_t need;

        if (n <= 0 || a[0].n_head <= 0)
                return;
        if (!mla_args_valid(a, n))
                return mla_fail(a, n, "mla_attn: sequences of different shapes", -EINVAL);
        if (!(task_end = mo_cpu_scratch_get(&c->mla_plan, sizeof(int64_t) * (size_t)n)))
                return mla_fail(a, n, "mla_attn", -ENOMEM);
        width = a[0].kv_lora + a[0].rope;
        for (int s = 0; s < n; s++) {
                rows += a[s].n_q;
                j.n_ctx_max = MO_MAX(j.n_ctx_max, a[s].pos0 + a[s].n_q);
        }
        if (rows == 0)
                return;
        /* Groups of heads share each read of a cached row, and every task
         * reads its sequence's whole context twice: as few tasks as give
         * each thread one (16 heads of 2 per task took 1.5x as long as 8
         * of 8 at 4096 tokens), and at most 64 heads (the sums buffer). */
        j.heads_per_task = MO_MAX(1, MO_MIN(64, a[0].n_head * rows / threads));
        j.heads_per_task = MO_MIN(j.heads_per_task, a[0].n_head);
        j.tasks_per_row = (a[0].n_head + j.heads_per_task - 1) / j.heads_per_task;
        for (int s = 0; s < n; s++)
                task_end[s] = (s ? task_end[s - 1] : 0) + j.tasks_per_row * a[s].n_q;
        j.task_end = task_end;
        need = sizeof(float) * (size_t)(j.heads_per_task * (width + j.n_ctx_max));
        for (int t = 0; t < threads; t++)
                if (!mo_cpu_scratch_get(&c->per_thread[t], need))
                        return mla_fail(a, n, "mla_attn", -ENOMEM);
        mo_pool_for(c->pool, task_end[n - 1], 1, mla_part, &j);
}

static void cpu_mla_attn(mo_backend *b, const mo_mla_args *a)
{
        cpu_mla_attn_many(b, a, 1);
}

/* ---- construction ---------------------------------------------------------------- */

static void cpu_destroy(mo_backend *b)
{
        struct cpu_ctx *c = ctx_of(b);

        for (int t = 0; t < mo_pool_threads(c->pool); t++)
                mo_cpu_scratch_release(&c->per_thread[t]);
        mo_pool_free(c->pool);
        mo_cpu_scratch_release(&c->act);
        mo_cpu_scratch_release(&c->plan);
        mo_cpu_scratch_release(&c->mla_plan);
        free(c->per_thread);
        free(c);
}

static const struct mo_backend_ops cpu_ops = {
        .name = "cpu",
        .destroy = cpu_destroy,
        .alloc = cpu_alloc,
        .free = cpu_free,
        .upload = cpu_memcpy,
        .download = cpu_memcpy,
        .zero = cpu_zero,
        .copy = cpu_memcpy,
        .matmul = cpu_matmul,
        .matmul_many = cpu_matmul_many,
        .get_rows = cpu_get_rows,
        .rmsnorm = cpu_rmsnorm,
        .rope = cpu_rope,
        .swiglu = cpu_swiglu,
        .add = cpu_add,
        .gather_rows = cpu_gather_rows,
        .scatter_add_rows = cpu_scatter_add_rows,
        .mla_attn = cpu_mla_attn,
        .mla_attn_many = cpu_mla_attn_many,
        .sync = cpu_sync,
        .host_memory = true,
};

int mo_backend_cpu_new(int n_threads, mo_backend **out, struct moerr *e)
{
        _cleanup_free_ struct cpu_ctx *c = calloc(1, sizeof *c);
        int r;

        if (!c)
                return moerr_set(e, -ENOMEM, "cpu backend: out of memory");
        c->k = mo_cpu_kernels();
        r = mo_pool_new(n_threads, &c->pool, e);
        if (r < 0)
                return moerr_prefix(e, r, "cpu backend");
        c->per_thread = calloc((size_t)mo_pool_threads(c->pool), sizeof *c->per_thread);
        if (!c->per_thread) {
                mo_pool_free(c->pool);
                return moerr_set(e, -ENOMEM, "cpu backend: out of memory");
        }
        c->b.ops = &cpu_ops;
        c->b.ctx = c;
        *out = &TAKE_PTR(c)->b;
        return 0;
}

const char *mo_cpu_simd_level(void)
{
        return mo_simd_name(mo_cpu_kernels()->level);
}

int mo_cpu_threads(const mo_backend *b)
{
        const struct cpu_ctx *c = b->ctx;

        return mo_pool_threads(c->pool);
}
