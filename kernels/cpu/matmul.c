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
/* The most weight bytes one decode task streams: a small expert's matrix
 * (295 KB in Q4_K on the bench shape) in one piece. */
#define STREAM_TASK_BYTES (512 * 1024)
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

/* One activation matrix converted to its dot type, shared by the jobs
 * that read it. */
struct quant_job {
        int dot_type;
        int64_t n;
        const float *x;
        int64_t x_stride;
        uint8_t *q;
        size_t q_stride;
};

struct gemm_job {
        mo_gemm_fn gemm;
        const mo_weight *w;
        const uint8_t *a;
        size_t a_stride;
        float *y;
        int64_t y_stride, m;
        int64_t rows_per_task, cols_per_task, col_tasks;
};

/* Everything one matmul_many call runs: its products and the activations
 * they read, with cumulative counts so that a flat item index (a row to
 * quantize, a task to multiply) finds its job by binary search. */
struct many_plan {
        const struct mo_cpu_kernels *k;
        struct gemm_job *g;
        int64_t *task_end; /* tasks of g[0..i] */
        int n;
        struct quant_job *q;
        int64_t *row_end;  /* activation rows of q[0..i] */
        int nq;
};

/* The i with ends[i-1] <= item < ends[i]. */
static int find_part(const int64_t *ends, int n, int64_t item)
{
        int lo = 0, hi = n - 1;

        while (lo < hi) {
                int mid = lo + (hi - lo) / 2;

                if (ends[mid] > item)
                        hi = mid;
                else
                        lo = mid + 1;
        }
        return lo;
}

static void quantize_rows(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct many_plan *p = arg;
        int i = find_part(p->row_end, p->nq, begin);

        for (int64_t item = begin; item < end; item++) {
                const struct quant_job *j;
                int64_t row;

                while (item >= p->row_end[i])
                        i++;
                j = &p->q[i];
                row = item - (i ? p->row_end[i - 1] : 0);
                if (j->dot_type == MO_TYPE_Q8_0)
                        p->k->quant_q8_0(j->x + row * j->x_stride, (void *)(j->q + row * j->q_stride), j->n);
                else
                        p->k->quant_q8_k(j->x + row * j->x_stride, (void *)(j->q + row * j->q_stride), j->n);
        }
}

static void gemm_task(const struct gemm_job *j, int64_t t)
{
        int64_t r0 = t / j->col_tasks * j->rows_per_task;
        int64_t c0 = t % j->col_tasks * j->cols_per_task;
        int64_t nr = MO_MIN(j->rows_per_task, j->w->nrows - r0);
        int64_t nc = MO_MIN(j->cols_per_task, j->m - c0);

        j->gemm(j->w->ncols, (const uint8_t *)j->w->data + (size_t)r0 * j->w->row_bytes,
                j->w->row_bytes, nr, j->a + (size_t)c0 * j->a_stride, j->a_stride, nc,
                j->y + c0 * j->y_stride + r0, j->y_stride);
}

static void gemm_tasks(void *arg, int64_t begin, int64_t end, int tid)
{
        const struct many_plan *p = arg;
        int i = find_part(p->task_end, p->n, begin);

        for (int64_t t = begin; t < end; t++) {
                while (t >= p->task_end[i])
                        i++;
                gemm_task(&p->g[i], t - (i ? p->task_end[i - 1] : 0));
        }
}

static int64_t round_up(int64_t v, int64_t to)
{
        return (v + to - 1) / to * to;
}

/* Task shape: decode wants contiguous weight chunks, several per thread
 * so that a late thread does not hold up the others; prefill wants chunks
 * that fit L2 next to the activation block. `share` is this job's part of
 * the call's work: a job among many needs fewer chunks of its own, in
 * decode and in batches alike (a batch's experts were cut into tasks of
 * 64 rows each, as if each were alone, and ran 5-15% slower for it). */
static void plan_tasks(struct gemm_job *j, int threads, double share)
{
        int64_t nrows = j->w->nrows;

        j->cols_per_task = MO_MIN(j->m, TASK_ACT_ROWS);
        j->col_tasks = (j->m + j->cols_per_task - 1) / j->cols_per_task;
        if (j->m <= 3) {
                int64_t chunks = MO_MAX((int64_t)(8 * threads * share + 0.5), 1);
                int64_t fit = (int64_t)(STREAM_TASK_BYTES / MO_MAX(j->w->row_bytes, 1));

                j->rows_per_task = round_up(MO_MAX(MO_MIN(nrows / chunks, fit), 4), 4);
        } else {
                int64_t fit = (int64_t)(TASK_WEIGHT_BYTES / MO_MAX(j->w->row_bytes, 1));
                int64_t spread = (int64_t)((double)nrows * j->col_tasks / MO_MAX(4 * threads * share, 1.0));

                /* Whole groups of 16 rows: the batch kernels put 16 weight
                 * rows in the lanes, and a task's partial group costs as
                 * much as a full one. */
                j->rows_per_task = round_up(MO_MAX(MO_MIN(fit, spread / j->col_tasks), 4), 16);
        }
}

static bool job_valid(const mo_matmul_job *j)
{
        const mo_weight *w = j->w;

        return w->type >= 0 && w->type < MO_TYPE_COUNT && mo_row_bytes(w->type, w->ncols) != 0 &&
               w->row_bytes >= mo_row_bytes(w->type, w->ncols) && j->m >= 0;
}

/* Whether job j can read the activations converted for job j-1. */
static bool same_input(const mo_matmul_job *a, const mo_matmul_job *b)
{
        return a->x == b->x && a->x_stride == b->x_stride && a->m == b->m &&
               a->w->ncols == b->w->ncols && mo_vec_dot_type(a->w->type) == mo_vec_dot_type(b->w->type);
}

/* Fills the quantization half of the plan: one quant_job per run of jobs
 * reading the same x, its rows placed in the act scratch. */
static int plan_quant(struct many_plan *p, const mo_matmul_job *jobs, struct mo_cpu_scratch *act)
{
        size_t total = 0, off = 0;
        uint8_t *base = NULL;
        int nq = 0;

        for (int i = 0; i < p->n; i++) {
                int dt = mo_vec_dot_type(jobs[i].w->type);

                if (dt == MO_TYPE_F32 || jobs[i].m == 0 || (i > 0 && same_input(&jobs[i], &jobs[i - 1])))
                        continue;
                if (mo_row_bytes(dt, jobs[i].w->ncols) == 0)
                        return -EINVAL;
                total += mo_row_bytes(dt, jobs[i].w->ncols) * (size_t)jobs[i].m;
        }
        if (total && !(base = mo_cpu_scratch_get(act, total)))
                return -ENOMEM;
        for (int i = 0; i < p->n; i++) {
                const mo_matmul_job *j = &jobs[i];
                int dt = mo_vec_dot_type(j->w->type);
                struct quant_job *q;

                if (dt == MO_TYPE_F32 || j->m == 0) {
                        p->g[i].a = (const uint8_t *)j->x;
                        p->g[i].a_stride = (size_t)j->x_stride * sizeof(float);
                        continue;
                }
                if (i > 0 && same_input(j, &jobs[i - 1])) {
                        p->g[i].a = p->g[i - 1].a;
                        p->g[i].a_stride = p->g[i - 1].a_stride;
                        continue;
                }
                q = &p->q[nq];
                *q = (struct quant_job){ .dot_type = dt, .n = j->w->ncols, .x = j->x,
                                         .x_stride = j->x_stride, .q = base + off,
                                         .q_stride = mo_row_bytes(dt, j->w->ncols) };
                off += q->q_stride * (size_t)j->m;
                p->row_end[nq] = (nq ? p->row_end[nq - 1] : 0) + j->m;
                p->g[i].a = q->q;
                p->g[i].a_stride = q->q_stride;
                nq++;
        }
        p->nq = nq;
        return 0;
}

/* The plan's arrays, carved from one scratch buffer. */
static int plan_alloc(struct many_plan *p, int n, struct mo_cpu_scratch *s)
{
        size_t bytes = (size_t)n * (sizeof *p->g + sizeof *p->q + 2 * sizeof(int64_t));
        uint8_t *m = mo_cpu_scratch_get(s, bytes);

        if (!m)
                return -ENOMEM;
        p->g = (struct gemm_job *)m;
        p->q = (struct quant_job *)(p->g + n);
        p->task_end = (int64_t *)(p->q + n);
        p->row_end = p->task_end + n;
        p->n = n;
        return 0;
}

int mo_cpu_matmul_many(struct mo_pool *pool, const struct mo_cpu_kernels *k,
                       struct mo_cpu_scratch *act, struct mo_cpu_scratch *plan,
                       const mo_matmul_job *jobs, int n)
{
        struct many_plan p = { .k = k };
        double work = 0, macs = 0;
        int threads = mo_pool_threads(pool), r;

        for (int i = 0; i < n; i++) {
                if (!job_valid(&jobs[i]) || !k->gemm[jobs[i].w->type])
                        return -EINVAL;
                work += (double)jobs[i].w->nrows * (double)jobs[i].w->row_bytes;
                macs += (double)jobs[i].w->nrows * (double)jobs[i].w->ncols * (double)jobs[i].m;
        }
        if (n <= 0 || macs == 0)
                return 0;
        if ((r = plan_alloc(&p, n, plan)) < 0 || (r = plan_quant(&p, jobs, act)) < 0)
                return r;
        for (int i = 0; i < n; i++) {
                struct gemm_job *g = &p.g[i];
                int64_t tasks = 0;

                g->gemm = k->gemm[jobs[i].w->type];
                g->w = jobs[i].w;
                g->y = jobs[i].y;
                g->y_stride = jobs[i].y_stride;
                g->m = jobs[i].m;
                if (g->m > 0 && g->w->nrows > 0) {
                        plan_tasks(g, threads, (double)g->w->nrows * (double)g->w->row_bytes / work);
                        tasks = (g->w->nrows + g->rows_per_task - 1) / g->rows_per_task * g->col_tasks;
                }
                p.task_end[i] = (i ? p.task_end[i - 1] : 0) + tasks;
        }
        if (p.nq)
                mo_pool_for(pool, p.row_end[p.nq - 1], MO_MAX(1, 8192 / p.q[0].n), quantize_rows, &p);
        if (macs < SERIAL_MACS)
                gemm_tasks(&p, 0, p.task_end[n - 1], 0);
        else
                mo_pool_for(pool, p.task_end[n - 1], 1, gemm_tasks, &p);
        return 0;
}

int mo_cpu_matmul(struct mo_pool *pool, const struct mo_cpu_kernels *k,
                  struct mo_cpu_scratch *act, struct mo_cpu_scratch *plan, const mo_weight *w,
                  const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t m)
{
        mo_matmul_job j = { .w = w, .x = x, .x_stride = x_stride, .y = y, .y_stride = y_stride,
                            .m = m };

        return mo_cpu_matmul_many(pool, k, act, plan, &j, 1);
}
