/* forward: the deepseek2 forward pass over a batch of sequences, written
 * once against the backend interface. The layer loop reads like the model
 * (MODEL-SPEC.md section 4); all arithmetic happens in kernels/, except the
 * expert routing decision, which runs on the host over the router logits. */
#include "engine/forward.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/gguf.h"
#include "engine/moe.h"
#include "engine/placement.h"
#include "kernels/collective.h"
#include "kernels/quant.h"

struct fwd_ctx {
        struct mo_model *m;
        mo_backend *b;
        int64_t max_tokens;
        bool decompressed;

        /* backend memory, sized for max_tokens rows */
        float *x;        /* [T][E] residual stream */
        float *h;        /* [T][E] normed input of a block */
        float *tmp;      /* [T][E] block output */
        float *moe_out;  /* [T][E] routed experts' sum */
        float *cq;       /* [T][Rq] */
        float *q;        /* [T][H][nope+rope] */
        float *kva;      /* [T][Rkv+rope] new cache rows */
        float *q_lat;    /* [T][H][Rkv] */
        float *q_pe;     /* [T][H][rope] */
        float *o_lat;    /* [T][H][Rkv] */
        float *o;        /* [T][H][v] */
        float *gate, *up; /* [T][max FFN] */
        float *router;   /* [T][X] */
        float *xe, *ye;  /* [P][E] a wave of experts' inputs and outputs */
        int64_t pair_cap; /* P: (token, expert) pairs one wave of experts takes */
        int64_t pair_alloc; /* the most pair_cap may be: xe and ye rows */
        float *logits;   /* [n_logits_cap][V] */
        int64_t n_logits_cap;

        /* host memory */
        int32_t *tok, *pos, *out_rows;
        float *router_host;
        int32_t *exp_ids;
        float *exp_w;
        int64_t *exp_start;
        int32_t *exp_order;
        int32_t *rows_e;
        float *w_e;
        float *route_scratch;
        mo_matmul_job *jobs; /* products run together (matmul_many) */
        mo_mla_args *attn;   /* [T] one per sequence of a step */

        /* decompressed reference: per layer W_UK [H][nope][Rkv], W_UV [H][v][Rkv] */
        float **wuk, **wuv;

        /* experts sharded over virtual devices (fwd_set_devices), or NULL */
        struct fwd_shard *sh;
};

#define OPS(f) ((f)->b->ops)

/* ---- experts sharded over devices: the state ---- */

/* Rows of n_embd floats in one device's memory, grown on demand. */
struct dev_rows {
        float *p;
        int64_t cap;
};

/* One device of the sharded MoE and its buffers for the two all-to-alls. */
struct fwd_dev {
        mo_backend *b;
        struct dev_rows send, recv; /* dispatch: token rows out, in */
        struct dev_rows back, comb; /* combine: expert outputs out, in */
};

/* The batch is cut into n contiguous slices, device s "holding" slice s as
 * data-parallel attention would leave it; a token's row goes once to each
 * device owning one of its experts (not once per expert: with k experts a
 * token often meets the same device twice), and every (token, expert)
 * output comes back on its own, unweighted, so the slice's device can add
 * them in the unsharded order (see shard_combine). */
struct fwd_shard {
        int n;
        struct placement *place;
        struct mo_coll *coll;
        struct fwd_dev *dev;    /* n */
        /* host plan of one layer, for up to max_tokens tokens */
        int32_t *src;           /* [T] device whose slice holds token t */
        uint64_t *mask;         /* [T] devices owning t's experts */
        int32_t *slot;          /* [T][n] row of token t in device p's recv */
        int32_t *disp_rows;     /* [T * min(K, n)] tokens in every device's send order */
        int64_t *disp_n;        /* [n][n] token rows s -> p */
        int64_t *back_n;        /* [n][n] expert output rows p -> s */
        int64_t *cur;           /* [n][n] cursors into the buffers */
};

static void shard_free(struct fwd_shard *sh)
{
        if (!sh)
                return;
        for (int d = 0; sh->dev && d < sh->n; d++) {
                struct dev_rows *r[] = { &sh->dev[d].send, &sh->dev[d].recv, &sh->dev[d].back,
                                         &sh->dev[d].comb };
                for (size_t i = 0; i < ARRAY_SIZE(r); i++)
                        if (r[i]->p)
                                sh->dev[d].b->ops->free(sh->dev[d].b, r[i]->p);
        }
        placement_free(sh->place);
        mo_coll_free(sh->coll);
        free(sh->dev);
        free(sh->src);
        free(sh->mask);
        free(sh->slot);
        free(sh->disp_rows);
        free(sh->disp_n);
        free(sh->back_n);
        free(sh->cur);
        free(sh);
}

/* Every virtual device computes on the context's backend; a device's
 * scratch for one expert (xe, gate, up, ye) is the context's too, since the
 * devices take turns. On GPUs each would have its own backend and scratch. */
static int shard_new(struct fwd_ctx *f, int n, struct fwd_shard **out, struct moerr *e)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t T = f->max_tokens, K = MO_MAX(hp->n_expert_used, 1);
        mo_backend *devs[MO_COLL_MAX_DEVICES];
        struct fwd_shard *sh = calloc(1, sizeof *sh);
        int r;

        if (!sh)
                return moerr_set(e, -ENOMEM, "out of memory");
        sh->n = n;
        sh->dev = calloc(n, sizeof *sh->dev);
        sh->src = calloc(T, sizeof *sh->src);
        sh->mask = calloc(T, sizeof *sh->mask);
        sh->slot = calloc(T * n, sizeof *sh->slot);
        sh->disp_rows = calloc(T * MO_MIN(K, n), sizeof *sh->disp_rows);
        sh->disp_n = calloc(n * n, sizeof *sh->disp_n);
        sh->back_n = calloc(n * n, sizeof *sh->back_n);
        sh->cur = calloc(n * n, sizeof *sh->cur);
        if (!sh->dev || !sh->src || !sh->mask || !sh->slot || !sh->disp_rows || !sh->disp_n ||
            !sh->back_n || !sh->cur) {
                shard_free(sh);
                return moerr_set(e, -ENOMEM, "out of memory for %d devices", n);
        }
        for (int d = 0; d < n; d++)
                devs[d] = sh->dev[d].b = f->b;
        if ((r = placement_new((int)hp->n_layer, (int)hp->n_expert, n, &sh->place, e)) < 0 ||
            (r = mo_coll_local_new(n, devs, &sh->coll, e)) < 0) {
                shard_free(sh);
                return r;
        }
        *out = sh;
        return 0;
}

/* Pairs one wave of experts may take beyond max_tokens: enough that a
 * decode batch's experts go at once, bounded so that a long prefill's
 * scratch does not grow with the number of experts used. */
#define MAX_WAVE_PAIRS 1024

static float *dev_alloc(struct fwd_ctx *f, int64_t n_floats, bool *ok)
{
        float *p = OPS(f)->alloc(f->b, (size_t)(n_floats > 0 ? n_floats : 1) * sizeof(float));

        if (!p)
                *ok = false;
        return p;
}

static int64_t max_ffn(const struct mo_hparams *hp)
{
        int64_t n = MO_MAX(hp->n_ff, hp->n_ff_exp);

        return MO_MAX(n, hp->n_expert_shared * hp->n_ff_exp);
}

int fwd_new(struct mo_model *m, mo_backend *b, int64_t max_tokens, struct fwd_ctx **out,
            struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        int64_t T = max_tokens, E = hp->n_embd, H = hp->n_head, dk = hp->n_nope + hp->n_rot;
        int64_t X = MO_MAX(hp->n_expert, 1), K = MO_MAX(hp->n_expert_used, 1);
        struct fwd_ctx *f;
        bool ok = true;

        if (max_tokens <= 0 || max_tokens > (1 << 20))
                return moerr_set(e, -EINVAL, "batch size %lld is out of range", (long long)max_tokens);
        f = calloc(1, sizeof *f);
        if (!f)
                return moerr_set(e, -ENOMEM, "out of memory");
        f->m = m;
        f->b = b;
        f->max_tokens = T;
        f->x = dev_alloc(f, T * E, &ok);
        f->h = dev_alloc(f, T * E, &ok);
        f->tmp = dev_alloc(f, T * E, &ok);
        f->moe_out = dev_alloc(f, T * E, &ok);
        f->cq = dev_alloc(f, T * hp->q_lora, &ok);
        f->q = dev_alloc(f, T * H * dk, &ok);
        f->kva = dev_alloc(f, T * (hp->kv_lora + hp->n_rot), &ok);
        f->q_lat = dev_alloc(f, T * H * hp->kv_lora, &ok);
        f->q_pe = dev_alloc(f, T * H * hp->n_rot, &ok);
        f->o_lat = dev_alloc(f, T * H * hp->kv_lora, &ok);
        f->o = dev_alloc(f, T * H * hp->n_v, &ok);
        f->pair_cap = f->pair_alloc = MO_MIN(T * K, MO_MAX(T, MAX_WAVE_PAIRS));
        f->gate = dev_alloc(f, MO_MAX(T * max_ffn(hp), f->pair_cap * hp->n_ff_exp), &ok);
        f->up = dev_alloc(f, MO_MAX(T * max_ffn(hp), f->pair_cap * hp->n_ff_exp), &ok);
        f->router = dev_alloc(f, T * X, &ok);
        f->xe = dev_alloc(f, f->pair_cap * E, &ok);
        f->ye = dev_alloc(f, f->pair_cap * E, &ok);
        f->tok = calloc(T, sizeof *f->tok);
        f->pos = calloc(T, sizeof *f->pos);
        f->out_rows = calloc(T, sizeof *f->out_rows);
        f->router_host = calloc(T * X, sizeof *f->router_host);
        f->exp_ids = calloc(T * K, sizeof *f->exp_ids);
        f->exp_w = calloc(T * K, sizeof *f->exp_w);
        f->exp_start = calloc(X + 1, sizeof *f->exp_start);
        f->exp_order = calloc(T * K, sizeof *f->exp_order);
        f->rows_e = calloc(T * K, sizeof *f->rows_e);
        f->w_e = calloc(T * K, sizeof *f->w_e);
        f->route_scratch = calloc(2 * X, sizeof *f->route_scratch);
        f->jobs = calloc(MO_MAX(2 * X, H), sizeof *f->jobs);
        f->attn = calloc(T, sizeof *f->attn);
        if (!ok || !f->tok || !f->pos || !f->out_rows || !f->router_host || !f->exp_ids || !f->exp_w ||
            !f->exp_start || !f->exp_order || !f->rows_e || !f->w_e || !f->route_scratch || !f->jobs ||
            !f->attn) {
                fwd_free(f);
                return moerr_set(e, -ENOMEM, "out of memory for a batch of %lld tokens", (long long)T);
        }
        *out = f;
        return 0;
}

void fwd_free(struct fwd_ctx *f)
{
        if (!f)
                return;
        float **dev[] = { &f->x, &f->h, &f->tmp, &f->moe_out, &f->cq, &f->q, &f->kva, &f->q_lat,
                          &f->q_pe, &f->o_lat, &f->o, &f->gate, &f->up, &f->router, &f->xe,
                          &f->ye, &f->logits };

        for (size_t i = 0; i < ARRAY_SIZE(dev); i++)
                if (*dev[i])
                        OPS(f)->free(f->b, *dev[i]);
        if (f->wuk)
                for (int64_t l = 0; l < f->m->hp.n_layer; l++) {
                        free(f->wuk[l]);
                        free(f->wuv[l]);
                }
        free(f->wuk);
        free(f->wuv);
        free(f->tok);
        free(f->pos);
        free(f->out_rows);
        free(f->router_host);
        free(f->exp_ids);
        free(f->exp_w);
        free(f->exp_start);
        free(f->exp_order);
        free(f->rows_e);
        free(f->w_e);
        free(f->route_scratch);
        free(f->jobs);
        free(f->attn);
        shard_free(f->sh);
        free(f);
}

int64_t fwd_set_wave_pairs(struct fwd_ctx *f, int64_t pairs)
{
        f->pair_cap = MO_MAX(MO_MIN(pairs, f->pair_alloc), f->max_tokens);
        return f->pair_cap;
}

void fwd_set_decompressed(struct fwd_ctx *f, bool on)
{
        f->decompressed = on;
}

int fwd_set_devices(struct fwd_ctx *f, int n_devices, struct moerr *e)
{
        if (n_devices < 0 || n_devices > MO_COLL_MAX_DEVICES)
                return moerr_set(e, -EINVAL, "%d devices: 0 to %d", n_devices, MO_COLL_MAX_DEVICES);
        if (n_devices > 1 && f->m->hp.n_expert < 1)
                return moerr_set(e, -EINVAL, "the model has no routed experts to shard");
        shard_free(f->sh);
        f->sh = NULL;
        if (n_devices <= 1)
                return 0;
        return shard_new(f, n_devices, &f->sh, e);
}

struct placement *fwd_placement(struct fwd_ctx *f)
{
        return f->sh ? f->sh->place : NULL;
}

/* ---- blocks ---- */

static void matmul(struct fwd_ctx *f, const mo_weight *w, const float *x, int64_t x_stride,
                   float *y, int64_t y_stride, int64_t n)
{
        OPS(f)->matmul(f->b, w, x, x_stride, y, y_stride, n);
}

static void rmsnorm(struct fwd_ctx *f, const float *x, int64_t stride, const float *g, int64_t dim,
                    int64_t n, float *y, int64_t y_stride)
{
        OPS(f)->rmsnorm(f->b, x, stride, g, dim, n, f->m->hp.rms_eps, y, y_stride);
}

/* Products that the backend may run as one piece of work (bit for bit
 * what one matmul each gives). */
static void matmul_many(mo_backend *b, const mo_matmul_job *jobs, int n)
{
        if (b->ops->matmul_many) {
                b->ops->matmul_many(b, jobs, n);
                return;
        }
        for (int i = 0; i < n; i++)
                b->ops->matmul(b, jobs[i].w, jobs[i].x, jobs[i].x_stride, jobs[i].y, jobs[i].y_stride,
                               jobs[i].m);
}

/* y = down(silu(gate(x)) * up(x)) for n rows of x. */
static void swiglu_ffn(struct fwd_ctx *f, const mo_weight *gate, const mo_weight *up,
                       const mo_weight *down, const float *x, int64_t n, float *y)
{
        int64_t E = f->m->hp.n_embd, F = gate->nrows;
        mo_matmul_job gu[2] = {
                { gate, x, E, f->gate, F, n },
                { up, x, E, f->up, F, n },
        };

        matmul_many(f->b, gu, 2);
        OPS(f)->swiglu(f->b, f->gate, f->up, f->gate, n * F);
        matmul(f, down, f->gate, F, y, E, n);
}

/* Queries and the new cache rows of n tokens: q = [q_nope | q_pe] per head,
 * kva = [c | k_pe]; the rotary parts rotated, c normalised. */
static void mla_project(struct fwd_ctx *f, const struct mo_layer *L, int64_t n)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t E = hp->n_embd, H = hp->n_head, dk = hp->n_nope + hp->n_rot;
        int64_t R = hp->kv_lora + hp->n_rot;

        mo_matmul_job in[2] = {
                { &L->attn_kv_a_mqa, f->h, E, f->kva, R, n },
                hp->q_lora > 0 ? (mo_matmul_job){ &L->attn_q_a, f->h, E, f->cq, hp->q_lora, n } :
                                 (mo_matmul_job){ &L->attn_q, f->h, E, f->q, H * dk, n },
        };

        /* Both read the normed input: one conversion, one pass. */
        matmul_many(f->b, in, 2);
        if (hp->q_lora > 0) {
                rmsnorm(f, f->cq, hp->q_lora, L->attn_q_a_norm, hp->q_lora, n, f->cq, hp->q_lora);
                matmul(f, &L->attn_q_b, f->cq, hp->q_lora, f->q, H * dk, n);
        }
        rmsnorm(f, f->kva, R, L->attn_kv_a_norm, hp->kv_lora, n, f->kva, R);
        OPS(f)->rope(f->b, f->kva + hp->kv_lora, n, 1, R, 0, f->pos, &f->m->rope);
        for (int64_t i = 0; i < n * H; i++)
                OPS(f)->copy(f->b, f->q_pe + i * hp->n_rot, f->q + i * dk + hp->n_nope,
                             hp->n_rot * sizeof(float));
        OPS(f)->rope(f->b, f->q_pe, n, H, H * hp->n_rot, hp->n_rot, f->pos, &f->m->rope);
}

static void kv_store(struct fwd_ctx *f, struct kv_cache *kv, const struct fwd_seq *s, int64_t il,
                     int64_t row0)
{
        int64_t R = f->m->hp.kv_lora + f->m->hp.n_rot;

        for (int64_t i = 0; i < s->n_tokens; i++)
                OPS(f)->copy(f->b, kv_row(kv, s->kv, il, s->pos0 + i), f->kva + (row0 + i) * R,
                             R * sizeof(float));
}

/* Absorbed MLA: queries move into latent space (q_lat = W_UK^T q_nope),
 * attention runs over the cached latents, and the result moves out through
 * W_UV; K and V are never materialised. */
static void mla_absorbed(struct fwd_ctx *f, const struct mo_layer *L, struct kv_cache *kv,
                         const struct fwd_seq *seqs, int n_seqs, int64_t il, int64_t n)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t H = hp->n_head, dk = hp->n_nope + hp->n_rot, Rkv = hp->kv_lora;
        int64_t row0 = 0;

        for (int64_t h = 0; h < H; h++)
                f->jobs[h] = (mo_matmul_job){ &L->k_b[h], f->q + h * dk, H * dk, f->q_lat + h * Rkv,
                                              H * Rkv, n };
        matmul_many(f->b, f->jobs, (int)H);
        for (int s = 0; s < n_seqs; s++) {
                f->attn[s] = (mo_mla_args){
                        .q_lat = f->q_lat + row0 * H * Rkv,
                        .q_pe = f->q_pe + row0 * H * hp->n_rot,
                        .out_lat = f->o_lat + row0 * H * Rkv,
                        .n_q = seqs[s].n_tokens,
                        .n_head = H,
                        .kv_lora = Rkv,
                        .rope = hp->n_rot,
                        .kv = kv_layer(kv, il),
                        .block_table = seqs[s].kv->blocks,
                        .block_tokens = kv_get_config(kv)->block_tokens,
                        .pos0 = seqs[s].pos0,
                        .scale = f->m->kq_scale,
                };
                row0 += seqs[s].n_tokens;
        }
        if (OPS(f)->mla_attn_many)
                OPS(f)->mla_attn_many(f->b, f->attn, n_seqs);
        else
                for (int s = 0; s < n_seqs; s++)
                        OPS(f)->mla_attn(f->b, &f->attn[s]);
        for (int64_t h = 0; h < H; h++)
                f->jobs[h] = (mo_matmul_job){ &L->v_b[h], f->o_lat + h * Rkv, H * Rkv,
                                              f->o + h * hp->n_v, H * hp->n_v, n };
        matmul_many(f->b, f->jobs, (int)H);
}

static int decompressed_weights(struct fwd_ctx *f, int64_t il)
{
        const struct mo_hparams *hp = &f->m->hp;
        const struct mo_layer *L = &f->m->layers[il];
        int64_t H = hp->n_head, Rkv = hp->kv_lora, dn = hp->n_nope, dv = hp->n_v;
        _cleanup_free_ float *row = malloc(MO_MAX(dn, Rkv) * sizeof(float));
        float *wuk, *wuv;

        if (!f->wuk) {
                f->wuk = calloc(hp->n_layer, sizeof *f->wuk);
                f->wuv = calloc(hp->n_layer, sizeof *f->wuv);
                if (!f->wuk || !f->wuv)
                        return -ENOMEM;
        }
        if (f->wuk[il])
                return 0;
        wuk = f->wuk[il] = malloc(H * dn * Rkv * sizeof(float));
        wuv = f->wuv[il] = malloc(H * dv * Rkv * sizeof(float));
        if (!wuk || !wuv || !row)
                return -ENOMEM;
        for (int64_t h = 0; h < H; h++) {
                const mo_weight *kb = &L->k_b[h], *vb = &L->v_b[h];
                for (int64_t c = 0; c < Rkv; c++) { /* k_b rows are W_UK columns */
                        mo_dequantize_row(kb->type, (const char *)kb->data + c * kb->row_bytes, row, dn);
                        for (int64_t d = 0; d < dn; d++)
                                wuk[(h * dn + d) * Rkv + c] = row[d];
                }
                for (int64_t t = 0; t < dv; t++)
                        mo_dequantize_row(vb->type, (const char *)vb->data + t * vb->row_bytes,
                                          wuv + (h * dv + t) * Rkv, Rkv);
        }
        return 0;
}

static double dotd(const float *a, const float *b, int64_t n)
{
        double s = 0;

        for (int64_t i = 0; i < n; i++)
                s += (double)a[i] * b[i];
        return s;
}

/* Reference attention in the decompressed form, straight from the paper:
 * k_nope and v are rebuilt from each cached latent. Host memory only. */
static int mla_decompressed(struct fwd_ctx *f, struct kv_cache *kv, const struct fwd_seq *seqs,
                            int n_seqs, int64_t il)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t H = hp->n_head, dk = hp->n_nope + hp->n_rot, Rkv = hp->kv_lora;
        int64_t dn = hp->n_nope, dv = hp->n_v, row0 = 0;
        _cleanup_free_ double *score = NULL;
        _cleanup_free_ float *k = malloc(MO_MAX(dn, dv) * sizeof(float));
        int r;

        if ((r = decompressed_weights(f, il)) < 0)
                return r;
        for (int s = 0; s < n_seqs; s++) {
                int64_t n_ctx = seqs[s].pos0 + seqs[s].n_tokens;
                free(score);
                score = malloc(n_ctx * sizeof *score);
                if (!score || !k)
                        return -ENOMEM;
                for (int64_t i = 0; i < seqs[s].n_tokens; i++) {
                        int64_t p = seqs[s].pos0 + i, gi = row0 + i;
                        for (int64_t h = 0; h < H; h++) {
                                const float *qn = f->q + (gi * H + h) * dk;
                                const float *qp = f->q_pe + (gi * H + h) * hp->n_rot;
                                const float *wuk = f->wuk[il] + h * dn * Rkv;
                                const float *wuv = f->wuv[il] + h * dv * Rkv;
                                double mx = -INFINITY, sum = 0;
                                float *o = f->o + gi * H * dv + h * dv;

                                for (int64_t j = 0; j <= p; j++) {
                                        const float *c = kv_row(kv, seqs[s].kv, il, j);
                                        for (int64_t d = 0; d < dn; d++)
                                                k[d] = (float)dotd(wuk + d * Rkv, c, Rkv);
                                        score[j] = f->m->kq_scale * (dotd(qn, k, dn) + dotd(qp, c + Rkv, hp->n_rot));
                                        mx = fmax(mx, score[j]);
                                }
                                for (int64_t j = 0; j <= p; j++)
                                        sum += score[j] = exp(score[j] - mx);
                                for (int64_t t = 0; t < dv; t++)
                                        o[t] = 0;
                                for (int64_t j = 0; j <= p; j++) {
                                        const float *c = kv_row(kv, seqs[s].kv, il, j);
                                        for (int64_t t = 0; t < dv; t++)
                                                o[t] += (float)(score[j] / sum * dotd(wuv + t * Rkv, c, Rkv));
                                }
                        }
                }
                row0 += seqs[s].n_tokens;
        }
        return 0;
}

/* The router's choice for each of n tokens (exp_ids, exp_w), and the pairs
 * grouped by expert (exp_start, exp_order). */
static void moe_route_batch(struct fwd_ctx *f, const struct mo_layer *L, int64_t n)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t E = hp->n_embd, X = hp->n_expert, K = hp->n_expert_used;
        struct moe_router router = f->m->router_proto;

        matmul(f, &L->ffn_gate_inp, f->h, E, f->router, X, n);
        OPS(f)->download(f->b, f->router_host, f->router, n * X * sizeof(float));
        router.bias = L->exp_probs_b;
        for (int64_t i = 0; i < n; i++)
                moe_route(&router, f->router_host + i * X, f->exp_ids + i * K, f->exp_w + i * K,
                          f->route_scratch);
        moe_group_by_expert((int)X, (int)K, n, f->exp_ids, f->exp_start, f->exp_order);
}

/* ye = down(silu(gate(xe)) * up(xe)) for the c rows expert x received, on
 * the backend of the device holding it. */
static void expert_ffn(struct fwd_ctx *f, mo_backend *b, const struct mo_layer *L, int64_t x,
                       int64_t c)
{
        int64_t E = f->m->hp.n_embd, Fe = f->m->hp.n_ff_exp;

        b->ops->matmul(b, &L->gate_exps[x], f->xe, E, f->gate, Fe, c);
        b->ops->matmul(b, &L->up_exps[x], f->xe, E, f->up, Fe, c);
        b->ops->swiglu(b, f->gate, f->up, f->gate, c * Fe);
        b->ops->matmul(b, &L->down_exps[x], f->gate, Fe, f->ye, E, c);
}

/* Experts x0 .. x1-1 at once: their tokens' rows gathered in pair order
 * (expert by expert, tokens in order within each), then gate and up of
 * every expert as one matmul_many, one swiglu, every down as another, and
 * the weighted outputs added into moe_out. Each row's products are those
 * of expert_ffn, and every token still adds its terms in ascending expert
 * id: the order the sharded combine keeps too. */
static void moe_wave(struct fwd_ctx *f, const struct mo_layer *L, int64_t x0, int64_t x1)
{
        int64_t E = f->m->hp.n_embd, Fe = f->m->hp.n_ff_exp, K = f->m->hp.n_expert_used;
        int64_t p0 = f->exp_start[x0], np = f->exp_start[x1] - p0;
        int n = 0;

        if (np == 0)
                return;
        for (int64_t j = 0; j < np; j++) {
                int32_t pair = f->exp_order[p0 + j];
                f->rows_e[j] = pair / (int32_t)K;
                f->w_e[j] = f->exp_w[pair];
        }
        OPS(f)->gather_rows(f->b, f->h, E, f->rows_e, np, f->xe);
        for (int64_t x = x0; x < x1; x++) {
                int64_t c = f->exp_start[x + 1] - f->exp_start[x], off = f->exp_start[x] - p0;
                if (c == 0)
                        continue;
                f->jobs[n++] = (mo_matmul_job){ &L->gate_exps[x], f->xe + off * E, E,
                                                f->gate + off * Fe, Fe, c };
                f->jobs[n++] = (mo_matmul_job){ &L->up_exps[x], f->xe + off * E, E,
                                                f->up + off * Fe, Fe, c };
        }
        matmul_many(f->b, f->jobs, n);
        OPS(f)->swiglu(f->b, f->gate, f->up, f->gate, np * Fe);
        n = 0;
        for (int64_t x = x0; x < x1; x++) {
                int64_t c = f->exp_start[x + 1] - f->exp_start[x], off = f->exp_start[x] - p0;
                if (c == 0)
                        continue;
                f->jobs[n++] = (mo_matmul_job){ &L->down_exps[x], f->gate + off * Fe, Fe,
                                                f->ye + off * E, E, c };
        }
        matmul_many(f->b, f->jobs, n);
        OPS(f)->scatter_add_rows(f->b, f->ye, E, f->rows_e, f->w_e, np, f->moe_out);
}

/* Unsharded: the experts in id order, in waves of at most pair_cap
 * (token, expert) pairs (one expert never has more than max_tokens). */
static void moe_local(struct fwd_ctx *f, const struct mo_layer *L)
{
        int64_t X = f->m->hp.n_expert;

        for (int64_t x0 = 0, x1; x0 < X; x0 = x1) {
                for (x1 = x0 + 1; x1 < X && f->exp_start[x1 + 1] - f->exp_start[x0] <= f->pair_cap; x1++)
                        ;
                moe_wave(f, L, x0, x1);
        }
}

/* ---- experts sharded over devices: one layer ---- */

static int ensure_rows(struct fwd_dev *d, struct dev_rows *r, int64_t rows, int64_t dim)
{
        if (rows <= r->cap)
                return 0;
        if (r->p)
                d->b->ops->free(d->b, r->p);
        r->cap = MO_MAX(rows, 2 * r->cap);
        r->p = d->b->ops->alloc(d->b, (size_t)(r->cap * dim) * sizeof(float));
        if (!r->p)
                r->cap = 0;
        return r->p ? 0 : -ENOMEM;
}

/* Token t lies in slice s = the s with s*n/N <= t < (s+1)*n/N. */
static void shard_slices(struct fwd_shard *sh, int64_t n)
{
        for (int s = 0; s < sh->n; s++)
                for (int64_t t = s * n / sh->n; t < (s + 1) * n / sh->n; t++)
                        sh->src[t] = s;
}

/* Counts both all-to-alls: token t goes to every device in mask[t] once;
 * each (token, expert) output comes back from the expert's owner. */
static void shard_count(struct fwd_ctx *f, const int32_t *own, int64_t n)
{
        struct fwd_shard *sh = f->sh;
        int N = sh->n;
        int64_t K = f->m->hp.n_expert_used;

        memset(sh->disp_n, 0, (size_t)(N * N) * sizeof *sh->disp_n);
        memset(sh->back_n, 0, (size_t)(N * N) * sizeof *sh->back_n);
        for (int64_t t = 0; t < n; t++) {
                uint64_t m = 0;
                for (int64_t k = 0; k < K; k++) {
                        int p = own[f->exp_ids[t * K + k]];
                        m |= 1ull << p;
                        sh->back_n[p * N + sh->src[t]]++;
                }
                sh->mask[t] = m;
                for (; m; m &= m - 1)
                        sh->disp_n[sh->src[t] * N + __builtin_ctzll(m)]++;
        }
}

/* Where each token row goes: disp_rows lists, device after device, the
 * tokens each sends (by destination, then token); slot[t][p] is the row of
 * t in p's recv. A recv buffer holds its rows by source, then token: that
 * is token order, since the slices are in token order. */
static void shard_layout(struct fwd_ctx *f, int64_t n)
{
        struct fwd_shard *sh = f->sh;
        int N = sh->n;
        int32_t next[MO_COLL_MAX_DEVICES] = { 0 };
        int64_t at = 0;

        for (int i = 0; i < N * N; i++) {
                sh->cur[i] = at;
                at += sh->disp_n[i];
        }
        for (int64_t t = 0; t < n; t++)
                for (uint64_t m = sh->mask[t]; m; m &= m - 1) {
                        int p = __builtin_ctzll(m);
                        sh->disp_rows[sh->cur[sh->src[t] * N + p]++] = (int32_t)t;
                        sh->slot[t * N + p] = next[p]++;
                }
}

static int shard_buffers(struct fwd_shard *sh, int64_t E)
{
        for (int d = 0; d < sh->n; d++) {
                struct fwd_dev *v = &sh->dev[d];
                if (ensure_rows(v, &v->send, mo_coll_send_rows(sh->n, sh->disp_n, d), E) < 0 ||
                    ensure_rows(v, &v->recv, mo_coll_recv_rows(sh->n, sh->disp_n, d), E) < 0 ||
                    ensure_rows(v, &v->back, mo_coll_send_rows(sh->n, sh->back_n, d), E) < 0 ||
                    ensure_rows(v, &v->comb, mo_coll_recv_rows(sh->n, sh->back_n, d), E) < 0)
                        return -ENOMEM;
        }
        return 0;
}

/* The dispatch all-to-all (send -> recv), or the return (back -> comb). */
static int shard_exchange(struct fwd_shard *sh, bool back, int64_t E)
{
        const float *send[MO_COLL_MAX_DEVICES];
        float *recv[MO_COLL_MAX_DEVICES];

        for (int d = 0; d < sh->n; d++) {
                send[d] = back ? sh->dev[d].back.p : sh->dev[d].send.p;
                recv[d] = back ? sh->dev[d].comb.p : sh->dev[d].recv.p;
        }
        return sh->coll->ops->all_to_all(sh->coll, send, back ? sh->back_n : sh->disp_n, recv, E);
}

/* Each device gathers the rows it sends from the normed activations, then
 * the rows move. */
static int shard_dispatch(struct fwd_ctx *f)
{
        struct fwd_shard *sh = f->sh;
        int64_t E = f->m->hp.n_embd, at = 0;

        for (int s = 0; s < sh->n; s++) {
                struct fwd_dev *v = &sh->dev[s];
                int64_t rows = mo_coll_send_rows(sh->n, sh->disp_n, s);
                if (rows > 0)
                        v->b->ops->gather_rows(v->b, f->h, E, sh->disp_rows + at, rows, v->send.p);
                at += rows;
        }
        return shard_exchange(sh, false, E);
}

/* Pairs from j that come from the slice of pair j's token: an expert's
 * pairs are in token order, so each slice's are one run. */
static int64_t slice_run(const struct fwd_ctx *f, const int32_t *pairs, int64_t j, int64_t c)
{
        int64_t K = f->m->hp.n_expert_used, e = j + 1;
        int32_t s = f->sh->src[pairs[j] / K];

        while (e < c && f->sh->src[pairs[e] / K] == s)
                e++;
        return e - j;
}

/* cur[p][s]: where the rows of device p for slice s begin, in p's back
 * buffer (by_sender) or in s's comb buffer. */
static void shard_cursors(struct fwd_shard *sh, bool by_sender)
{
        int N = sh->n;

        for (int p = 0; p < N; p++)
                for (int s = 0; s < N; s++) {
                        int64_t at = 0;
                        if (by_sender)
                                for (int q = 0; q < s; q++)
                                        at += sh->back_n[p * N + q];
                        else
                                for (int q = 0; q < p; q++)
                                        at += sh->back_n[q * N + s];
                        sh->cur[p * N + s] = at;
                }
}

/* Every device runs its experts, in id order, over the rows it received.
 * An expert's rows are its tokens in token order, as unsharded, so its
 * products are the same; its outputs go to the back buffer by slice. */
static void shard_experts(struct fwd_ctx *f, const struct mo_layer *L, const int32_t *own)
{
        struct fwd_shard *sh = f->sh;
        int N = sh->n;
        int64_t E = f->m->hp.n_embd, X = f->m->hp.n_expert, K = f->m->hp.n_expert_used;

        shard_cursors(sh, true);
        for (int64_t x = 0; x < X; x++) {
                const int32_t *pairs = f->exp_order + f->exp_start[x];
                int64_t c = f->exp_start[x + 1] - f->exp_start[x];
                struct fwd_dev *v = &sh->dev[own[x]];
                if (c == 0)
                        continue;
                for (int64_t j = 0; j < c; j++)
                        f->rows_e[j] = sh->slot[pairs[j] / K * N + own[x]];
                v->b->ops->gather_rows(v->b, v->recv.p, E, f->rows_e, c, f->xe);
                expert_ffn(f, v->b, L, x, c);
                for (int64_t j = 0, r; j < c; j += r) {
                        int64_t *at = &sh->cur[own[x] * N + sh->src[pairs[j] / K]];
                        r = slice_run(f, pairs, j, c);
                        v->b->ops->copy(v->b, v->back.p + *at * E, f->ye + j * E,
                                        (size_t)(r * E) * sizeof(float));
                        *at += r;
                }
        }
}

/* Every device adds its slice's expert outputs into moe_out, expert after
 * expert in id order: per token the order moe_local adds in, whatever the
 * placement and the device count, so the sums are bit-for-bit the same.
 * (Summing on the expert's device first would save return traffic but
 * make the order depend on the placement.) The virtual devices take turns
 * within each expert and share one moe_out; a GPU would loop over the
 * experts on its own, into its slice's rows. */
static void shard_combine(struct fwd_ctx *f, const int32_t *own)
{
        struct fwd_shard *sh = f->sh;
        int N = sh->n;
        int64_t E = f->m->hp.n_embd, X = f->m->hp.n_expert, K = f->m->hp.n_expert_used;

        shard_cursors(sh, false);
        for (int64_t x = 0; x < X; x++) {
                const int32_t *pairs = f->exp_order + f->exp_start[x];
                int64_t c = f->exp_start[x + 1] - f->exp_start[x];
                for (int64_t j = 0, r; j < c; j += r) {
                        int s = sh->src[pairs[j] / K];
                        struct fwd_dev *v = &sh->dev[s];
                        int64_t *at = &sh->cur[own[x] * N + s];
                        r = slice_run(f, pairs, j, c);
                        for (int64_t i = 0; i < r; i++) {
                                f->rows_e[i] = pairs[j + i] / (int32_t)K;
                                f->w_e[i] = f->exp_w[pairs[j + i]];
                        }
                        v->b->ops->scatter_add_rows(v->b, v->comb.p + *at * E, E, f->rows_e, f->w_e, r,
                                                    f->moe_out);
                        *at += r;
                }
        }
}

/* The routed experts of layer il over the devices: plan, dispatch the
 * token rows, compute, send the outputs back, combine. */
static int moe_sharded(struct fwd_ctx *f, const struct mo_layer *L, int64_t il, int64_t n)
{
        struct fwd_shard *sh = f->sh;
        const int32_t *own = placement_map(sh->place, (int)il);
        int64_t E = f->m->hp.n_embd;
        int r;

        /* cannot fail: moe_route only chooses experts that exist */
        placement_observe(sh->place, (int)il, f->exp_ids, n * f->m->hp.n_expert_used);
        shard_slices(sh, n);
        shard_count(f, own, n);
        shard_layout(f, n);
        if ((r = shard_buffers(sh, E)) < 0 || (r = shard_dispatch(f)) < 0)
                return r;
        shard_experts(f, L, own);
        if ((r = shard_exchange(sh, true, E)) < 0)
                return r;
        shard_combine(f, own);
        return 0;
}

static int moe_ffn(struct fwd_ctx *f, const struct mo_layer *L, int64_t il, int64_t n)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t E = hp->n_embd;
        int r;

        moe_route_batch(f, L, n);
        OPS(f)->zero(f->b, f->moe_out, n * E * sizeof(float));
        if (!f->sh)
                moe_local(f, L);
        else if ((r = moe_sharded(f, L, il, n)) < 0)
                return r;
        if (hp->n_expert_shared > 0) {
                swiglu_ffn(f, &L->gate_shexp, &L->up_shexp, &L->down_shexp, f->h, n, f->tmp);
                OPS(f)->add(f->b, f->moe_out, f->tmp, n * E);
        }
        return 0;
}

static int layer(struct fwd_ctx *f, int64_t il, struct kv_cache *kv, const struct fwd_seq *seqs,
                 int n_seqs, int64_t n)
{
        const struct mo_hparams *hp = &f->m->hp;
        const struct mo_layer *L = &f->m->layers[il];
        int64_t E = hp->n_embd, row0 = 0;
        int r;

        /* attention */
        rmsnorm(f, f->x, E, L->attn_norm, E, n, f->h, E);
        mla_project(f, L, n);
        for (int s = 0; s < n_seqs; s++) {
                kv_store(f, kv, &seqs[s], il, row0);
                row0 += seqs[s].n_tokens;
        }
        if (f->decompressed) {
                OPS(f)->sync(f->b);
                if ((r = mla_decompressed(f, kv, seqs, n_seqs, il)) < 0)
                        return r;
        } else {
                mla_absorbed(f, L, kv, seqs, n_seqs, il, n);
        }
        matmul(f, &L->attn_output, f->o, hp->n_head * hp->n_v, f->tmp, E, n);
        OPS(f)->add(f->b, f->x, f->tmp, n * E);

        /* feed-forward: dense in the leading layers, experts after */
        rmsnorm(f, f->x, E, L->ffn_norm, E, n, f->h, E);
        if (il < hp->n_dense) {
                swiglu_ffn(f, &L->ffn_gate, &L->ffn_up, &L->ffn_down, f->h, n, f->tmp);
                OPS(f)->add(f->b, f->x, f->tmp, n * E);
        } else {
                if ((r = moe_ffn(f, L, il, n)) < 0)
                        return r;
                OPS(f)->add(f->b, f->x, f->moe_out, n * E);
        }
        return 0;
}

static int ensure_logits(struct fwd_ctx *f, int64_t n_out)
{
        if (n_out <= f->n_logits_cap)
                return 0;
        if (f->logits)
                OPS(f)->free(f->b, f->logits);
        f->logits = OPS(f)->alloc(f->b, (size_t)n_out * f->m->hp.n_vocab * sizeof(float));
        f->n_logits_cap = f->logits ? n_out : 0;
        return f->logits ? 0 : -ENOMEM;
}

/* Lays the batch out as rows: token ids, positions, and which rows give logits. */
static int batch_rows(struct fwd_ctx *f, struct kv_cache *kv, const struct fwd_seq *seqs, int n_seqs,
                      int64_t *n_rows, int64_t *n_out, struct moerr *e)
{
        int64_t n = 0, o = 0, block = kv_get_config(kv)->block_tokens;

        for (int s = 0; s < n_seqs; s++) {
                const struct fwd_seq *q = &seqs[s];
                if (q->n_tokens <= 0 || q->pos0 < 0 || q->pos0 > q->kv->n_tokens)
                        return moerr_set(e, -EINVAL, "sequence %d: bad span (%lld tokens at %lld, %lld cached)",
                                         s, (long long)q->n_tokens, (long long)q->pos0,
                                         (long long)q->kv->n_tokens);
                if (q->n_tokens > f->max_tokens - n)
                        return moerr_set(e, -E2BIG, "batch holds more than %lld tokens", (long long)f->max_tokens);
                if (q->pos0 + q->n_tokens > q->kv->n_blocks * block)
                        return moerr_set(e, -ENOSPC, "sequence %d: cache holds %lld tokens, %lld needed", s,
                                         (long long)(q->kv->n_blocks * block), (long long)(q->pos0 + q->n_tokens));
                for (int64_t i = 0; i < q->n_tokens; i++, n++) {
                        if (q->tokens[i] < 0 || q->tokens[i] >= f->m->hp.n_vocab)
                                return moerr_set(e, -EINVAL, "token id %d is outside the vocabulary", q->tokens[i]);
                        f->tok[n] = q->tokens[i];
                        f->pos[n] = (int32_t)(q->pos0 + i);
                        if (q->all_logits || i == q->n_tokens - 1)
                                f->out_rows[o++] = (int32_t)n;
                }
        }
        *n_rows = n;
        *n_out = o;
        return 0;
}

bool fwd_logits_in_place(const struct fwd_ctx *f)
{
        return OPS(f)->host_memory;
}

float *fwd_logits(const struct fwd_ctx *f)
{
        return OPS(f)->host_memory ? f->logits : NULL;
}

static int model_file_damaged(struct moerr *e)
{
        return moerr_set(e, -EIO, "the model file was cut short or overwritten while in use; "
                                  "restore it and load the model again");
}

int fwd_step(struct fwd_ctx *f, struct kv_cache *kv, struct fwd_seq *seqs, int n_seqs, float *logits,
             struct moerr *e)
{
        const struct mo_hparams *hp = &f->m->hp;
        int64_t E = hp->n_embd, n = 0, n_out = 0;
        int r;

        if (!logits && !OPS(f)->host_memory)
                return moerr_set(e, -EINVAL, "this backend needs a logits buffer");
        if ((r = batch_rows(f, kv, seqs, n_seqs, &n, &n_out, e)) < 0)
                return r;
        if (n == 0)
                return 0;
        if (gguf_damaged(f->m->file))
                return model_file_damaged(e);
        if ((r = ensure_logits(f, n_out)) < 0)
                return moerr_set(e, r, "out of memory for %lld rows of logits", (long long)n_out);

        OPS(f)->get_rows(f->b, &f->m->token_embd, f->tok, n, f->x);
        for (int64_t il = 0; il < hp->n_layer; il++)
                if ((r = layer(f, il, kv, seqs, n_seqs, n)) < 0)
                        return moerr_set(e, r, "layer %lld failed", (long long)il);

        OPS(f)->gather_rows(f->b, f->x, E, f->out_rows, n_out, f->h);
        rmsnorm(f, f->h, E, f->m->output_norm, E, n_out, f->h, E);
        matmul(f, &f->m->output, f->h, E, f->logits, hp->n_vocab, n_out);
        if (logits)
                OPS(f)->download(f->b, logits, f->logits,
                                 (size_t)n_out * hp->n_vocab * sizeof(float));
        else
                OPS(f)->sync(f->b);
        /* Pages the step read may have been zeros: nothing of it stands. */
        if (gguf_damaged(f->m->file))
                return model_file_damaged(e);
        for (int s = 0; s < n_seqs; s++)
                seqs[s].kv->n_tokens = seqs[s].pos0 + seqs[s].n_tokens;
        return 0;
}
