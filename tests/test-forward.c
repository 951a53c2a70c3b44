/* test-forward: the forward pass against an independent reference.
 *
 * ref_forward below is a second, deliberately naive implementation of the
 * deepseek2 forward pass written straight from MODEL-SPEC.md: tensors are
 * read by name from the GGUF file and dequantized with the scalar reference
 * (kernels/quant.c), attention runs in the decompressed form, routing is
 * re-derived here, RoPE/YaRN frequencies are recomputed from the formulas,
 * and every sum is in double. It is the F32 oracle every engine path
 * (absorbed attention, batched steps, SIMD and quantized kernels, threads)
 * is held to. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/forward.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "engine/placement.h"
#include "kernels/quant.h"
#include "tools/fixture.h"
#include "testutil.h"

/* ---- the reference ---- */

struct ref {
        const struct mo_model *m;
        const struct mo_hparams *hp;
        float freq[256];
        float mscale, kq;
};

static const struct gguf_tensor *tensor(const struct ref *r, const char *fmt, ...)
{
        char name[128];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(name, sizeof name, fmt, ap);
        va_end(ap);
        return gguf_find_tensor(r->m->file, name);
}

/* Row `row` of a tensor (rows counted across all matrices of a 3-D tensor). */
static void row_of(const struct gguf_tensor *t, int64_t row, float *out)
{
        size_t rb = mo_row_bytes(t->type, t->ne[0]);

        mo_dequantize_row(t->type, (const char *)t->data + row * rb, out, t->ne[0]);
}

/* y[i] = sum_c W[first + i][c] x[c] for i < n. */
static void matvec(const struct gguf_tensor *t, int64_t first, int64_t n, const float *x, float *y)
{
        float *row = malloc(t->ne[0] * sizeof(float));

        for (int64_t i = 0; i < n; i++) {
                double s = 0;
                row_of(t, first + i, row);
                for (int64_t c = 0; c < t->ne[0]; c++)
                        s += (double)row[c] * x[c];
                y[i] = (float)s;
        }
        free(row);
}

static void rmsnorm(const float *x, const struct gguf_tensor *w, int64_t n, float eps, float *y)
{
        float *g = malloc(n * sizeof(float));
        double ss = 0;

        row_of(w, 0, g);
        for (int64_t i = 0; i < n; i++)
                ss += (double)x[i] * x[i];
        for (int64_t i = 0; i < n; i++)
                y[i] = (float)(x[i] / sqrt(ss / n + eps)) * g[i];
        free(g);
}

static float silu(float z)
{
        return z / (1.0f + expf(-z));
}

/* YaRN as MODEL-SPEC.md section 5 states it. */
static void ref_rope_setup(struct ref *r)
{
        const struct mo_hparams *hp = r->hp;
        double s = hp->yarn ? hp->yarn_factor : 1.0, d = hp->n_rot, base = hp->rope_base;
        double lo = 0, hi = 0, M = 1;
        bool yarn = hp->yarn && s != 1.0;

        if (yarn) {
                double c32 = d * log(hp->yarn_orig_ctx / (hp->yarn_beta_fast * 2 * M_PI)) / (2 * log(base));
                double c1 = d * log(hp->yarn_orig_ctx / (hp->yarn_beta_slow * 2 * M_PI)) / (2 * log(base));
                lo = fmax(0, floor(c32));
                hi = fmin(d - 1, ceil(c1));
        }
        for (int64_t i = 0; i < hp->n_rot / 2; i++) {
                double extrap = pow(base, -2.0 * i / d), ramp = 0;
                if (yarn)
                        ramp = fmin(1, fmax(0, (i - lo) / fmax(0.001, hi - lo)));
                r->freq[i] = (float)(extrap / s * ramp + extrap * (1 - ramp));
        }
        r->mscale = 1;
        if (yarn && hp->yarn_log_mul >= 0) {
                M = 1 + 0.1 * hp->yarn_log_mul * log(s);
        } else if (yarn) {
                M = 1 + 0.1 * log(s);
                r->mscale = (float)M;
        }
        r->kq = (float)(M * M / sqrt((double)(hp->n_nope + hp->n_rot)));
}

static void rope(const struct ref *r, float *x, int64_t p)
{
        for (int64_t i = 0; i < r->hp->n_rot / 2; i++) {
                double th = (double)p * r->freq[i], c = cos(th), s = sin(th);
                double a = x[2 * i], b = x[2 * i + 1];
                x[2 * i] = (float)((a * c - b * s) * r->mscale);
                x[2 * i + 1] = (float)((a * s + b * c) * r->mscale);
        }
}

/* W_UK[h][d][c] and W_UV[h][t][c] from whichever layout the file has. */
static float w_uk(const struct ref *r, int64_t l, int64_t h, int64_t d, int64_t c, float *row)
{
        const struct mo_hparams *hp = r->hp;
        const struct gguf_tensor *t;

        if (hp->split_mla) {
                t = tensor(r, "blk.%lld.attn_k_b.weight", (long long)l); /* [dn, Rkv, H] */
                row_of(t, h * hp->kv_lora + c, row);
                return row[d];
        }
        t = tensor(r, "blk.%lld.attn_kv_b.weight", (long long)l); /* [Rkv, H(dn+dv)] */
        row_of(t, h * (hp->n_nope + hp->n_v) + d, row);
        return row[c];
}

static void w_uv_row(const struct ref *r, int64_t l, int64_t h, int64_t t_, float *row)
{
        const struct mo_hparams *hp = r->hp;

        if (hp->split_mla)
                row_of(tensor(r, "blk.%lld.attn_v_b.weight", (long long)l), h * hp->n_v + t_, row);
        else
                row_of(tensor(r, "blk.%lld.attn_kv_b.weight", (long long)l),
                       h * (hp->n_nope + hp->n_v) + hp->n_nope + t_, row);
}

static void ref_attention(const struct ref *r, int64_t l, const float *h_in, int64_t p, float *cache,
                          float *out)
{
        const struct mo_hparams *hp = r->hp;
        int64_t H = hp->n_head, dn = hp->n_nope, dr = hp->n_rot, dv = hp->n_v, R = hp->kv_lora;
        int64_t dk = dn + dr, W = R + dr;
        float *q = malloc(H * dk * sizeof(float)), *a = malloc(W * sizeof(float));
        float *cq = malloc((hp->q_lora + 1) * sizeof(float)), *row = malloc((R + dk + dv) * sizeof(float));
        float *o = calloc(H * dv, sizeof(float));
        float *wuk = malloc(dn * R * sizeof(float)), *wuv = malloc(dv * R * sizeof(float));
        double *score = malloc((p + 1) * sizeof(double));
        float *kv = cache + (l * 4096 + p) * W; /* this token's cache row */

        if (hp->q_lora > 0) {
                matvec(tensor(r, "blk.%lld.attn_q_a.weight", (long long)l), 0, hp->q_lora, h_in, cq);
                rmsnorm(cq, tensor(r, "blk.%lld.attn_q_a_norm.weight", (long long)l), hp->q_lora, hp->rms_eps, cq);
                matvec(tensor(r, "blk.%lld.attn_q_b.weight", (long long)l), 0, H * dk, cq, q);
        } else {
                matvec(tensor(r, "blk.%lld.attn_q.weight", (long long)l), 0, H * dk, h_in, q);
        }
        matvec(tensor(r, "blk.%lld.attn_kv_a_mqa.weight", (long long)l), 0, W, h_in, a);
        rmsnorm(a, tensor(r, "blk.%lld.attn_kv_a_norm.weight", (long long)l), R, hp->rms_eps, kv);
        memcpy(kv + R, a + R, dr * sizeof(float));
        rope(r, kv + R, p);
        for (int64_t h = 0; h < H; h++) {
                float *qn = q + h * dk, *qp = q + h * dk + dn;
                double mx = -INFINITY, sum = 0;

                for (int64_t d = 0; d < dn; d++)
                        for (int64_t cc = 0; cc < R; cc++)
                                wuk[d * R + cc] = w_uk(r, l, h, d, cc, row);
                for (int64_t t_ = 0; t_ < dv; t_++)
                        w_uv_row(r, l, h, t_, wuv + t_ * R);
                rope(r, qp, p);
                for (int64_t j = 0; j <= p; j++) {
                        const float *c = cache + (l * 4096 + j) * W;
                        double s = 0;
                        for (int64_t d = 0; d < dn; d++) {
                                double k = 0;
                                for (int64_t cc = 0; cc < R; cc++)
                                        k += (double)wuk[d * R + cc] * c[cc];
                                s += qn[d] * k;
                        }
                        for (int64_t d = 0; d < dr; d++)
                                s += (double)qp[d] * c[R + d];
                        score[j] = r->kq * s;
                        mx = fmax(mx, score[j]);
                }
                for (int64_t j = 0; j <= p; j++)
                        sum += score[j] = exp(score[j] - mx);
                for (int64_t t_ = 0; t_ < dv; t_++) {
                        double acc = 0;
                        for (int64_t j = 0; j <= p; j++) {
                                const float *c = cache + (l * 4096 + j) * W;
                                double v = 0;
                                for (int64_t cc = 0; cc < R; cc++)
                                        v += (double)wuv[t_ * R + cc] * c[cc];
                                acc += score[j] / sum * v;
                        }
                        o[h * dv + t_] = (float)acc;
                }
        }
        matvec(tensor(r, "blk.%lld.attn_output.weight", (long long)l), 0, hp->n_embd, o, out);
        free(q), free(a), free(cq), free(row), free(o), free(score), free(wuk), free(wuv);
}

/* One SwiGLU FFN whose gate/up rows start at g0/u0 and down rows at d0. */
static void ffn(const struct gguf_tensor *gate, int64_t g0, const struct gguf_tensor *up, int64_t u0,
                const struct gguf_tensor *down, int64_t d0, int64_t F, int64_t E, const float *x, float *y)
{
        float *g = malloc(F * sizeof(float)), *u = malloc(F * sizeof(float));

        matvec(gate, g0, F, x, g);
        matvec(up, u0, F, x, u);
        for (int64_t i = 0; i < F; i++)
                g[i] = silu(g[i]) * u[i];
        matvec(down, d0, E, g, y);
        free(g), free(u);
}

/* Routing re-derived from DEEPSEEK-REFERENCE.md section 3.6. */
static void ref_route(const struct ref *r, int64_t l, const float *logit, int64_t *ids, float *w)
{
        const struct mo_hparams *hp = r->hp;
        int64_t X = hp->n_expert, K = hp->n_expert_used, G = hp->n_group, per = G > 1 ? X / G : X;
        const struct gguf_tensor *bias = tensor(r, "blk.%lld.exp_probs_b.bias", (long long)l);
        double *prob = malloc(X * sizeof(double)), *sel = malloc(X * sizeof(double)), mx = -INFINITY, sum = 0;
        float *b = calloc(X, sizeof(float));

        if (bias)
                row_of(bias, 0, b);
        for (int64_t e = 0; e < X; e++)
                mx = fmax(mx, logit[e]);
        for (int64_t e = 0; e < X; e++)
                sum += exp(logit[e] - mx);
        for (int64_t e = 0; e < X; e++) {
                prob[e] = hp->gating == MOE_SOFTMAX ? exp(logit[e] - mx) / sum : 1 / (1 + exp(-logit[e]));
                sel[e] = prob[e] + b[e];
        }
        if (G > 1) {
                double gs[256];
                bool keep[256] = { false };
                for (int64_t g = 0; g < G; g++) {
                        double m1 = -INFINITY, m2 = -INFINITY;
                        for (int64_t e = g * per; e < (g + 1) * per; e++) {
                                if (sel[e] > m1) {
                                        m2 = m1;
                                        m1 = sel[e];
                                } else if (sel[e] > m2) {
                                        m2 = sel[e];
                                }
                        }
                        gs[g] = m1 + m2;
                }
                for (int64_t k = 0; k < hp->n_group_used; k++) {
                        int64_t best = -1;
                        for (int64_t g = 0; g < G; g++)
                                if (!keep[g] && (best < 0 || gs[g] > gs[best]))
                                        best = g;
                        keep[best] = true;
                }
                for (int64_t e = 0; e < X; e++)
                        if (!keep[e / per])
                                sel[e] = -INFINITY;
        }
        sum = 0;
        for (int64_t k = 0; k < K; k++) {
                int64_t best = -1;
                for (int64_t e = 0; e < X; e++)
                        if (sel[e] > -INFINITY && (best < 0 || sel[e] > sel[best]))
                                best = e;
                ids[k] = best;
                w[k] = (float)prob[best];
                sum += w[k];
                sel[best] = -INFINITY;
        }
        for (int64_t k = 0; k < K; k++) {
                if (hp->expert_norm)
                        w[k] = (float)(w[k] / fmax(sum, 6.103515625e-5));
                if (hp->expert_scale != 0.0f && hp->expert_scale != 1.0f)
                        w[k] *= hp->expert_scale;
        }
        free(prob), free(sel), free(b);
}

static void ref_moe(const struct ref *r, int64_t l, const float *g, float *out)
{
        const struct mo_hparams *hp = r->hp;
        int64_t E = hp->n_embd, X = hp->n_expert, K = hp->n_expert_used, Fe = hp->n_ff_exp;
        const struct gguf_tensor *fused = tensor(r, "blk.%lld.ffn_gate_up_exps.weight", (long long)l);
        const struct gguf_tensor *down = tensor(r, "blk.%lld.ffn_down_exps.weight", (long long)l);
        float *logit = malloc(X * sizeof(float)), *y = malloc(E * sizeof(float)), w[64];
        int64_t ids[64];

        matvec(tensor(r, "blk.%lld.ffn_gate_inp.weight", (long long)l), 0, X, g, logit);
        ref_route(r, l, logit, ids, w);
        memset(out, 0, E * sizeof(float));
        for (int64_t k = 0; k < K; k++) {
                int64_t e = ids[k];
                if (fused)
                        ffn(fused, e * 2 * Fe, fused, e * 2 * Fe + Fe, down, e * E, Fe, E, g, y);
                else
                        ffn(tensor(r, "blk.%lld.ffn_gate_exps.weight", (long long)l), e * Fe,
                            tensor(r, "blk.%lld.ffn_up_exps.weight", (long long)l), e * Fe, down, e * E, Fe, E, g, y);
                for (int64_t i = 0; i < E; i++)
                        out[i] += w[k] * y[i];
        }
        if (hp->n_expert_shared > 0) {
                ffn(tensor(r, "blk.%lld.ffn_gate_shexp.weight", (long long)l), 0,
                    tensor(r, "blk.%lld.ffn_up_shexp.weight", (long long)l), 0,
                    tensor(r, "blk.%lld.ffn_down_shexp.weight", (long long)l), 0, hp->n_expert_shared * Fe, E, g, y);
                for (int64_t i = 0; i < E; i++)
                        out[i] += y[i];
        }
        free(logit), free(y);
}

/* Logits (n x V) of every position of one sequence, from scratch. */
static float *ref_forward(const struct mo_model *m, const int32_t *toks, int64_t n)
{
        struct ref r = { .m = m, .hp = &m->hp };
        const struct mo_hparams *hp = &m->hp;
        int64_t E = hp->n_embd, V = hp->n_vocab;
        float *logits = malloc(n * V * sizeof(float));
        float *cache = calloc(hp->n_layer * 4096 * (hp->kv_lora + hp->n_rot), sizeof(float));
        float *x = malloc(E * sizeof(float)), *h = malloc(E * sizeof(float)), *y = malloc(E * sizeof(float));
        const struct gguf_tensor *out = tensor(&r, "output.weight");

        assert_true(n <= 4096);
        ref_rope_setup(&r);
        for (int64_t p = 0; p < n; p++) {
                row_of(tensor(&r, "token_embd.weight"), toks[p], x);
                for (int64_t l = 0; l < hp->n_layer; l++) {
                        rmsnorm(x, tensor(&r, "blk.%lld.attn_norm.weight", (long long)l), E, hp->rms_eps, h);
                        ref_attention(&r, l, h, p, cache, y);
                        for (int64_t i = 0; i < E; i++)
                                x[i] += y[i];
                        rmsnorm(x, tensor(&r, "blk.%lld.ffn_norm.weight", (long long)l), E, hp->rms_eps, h);
                        if (l < hp->n_dense)
                                ffn(tensor(&r, "blk.%lld.ffn_gate.weight", (long long)l), 0,
                                    tensor(&r, "blk.%lld.ffn_up.weight", (long long)l), 0,
                                    tensor(&r, "blk.%lld.ffn_down.weight", (long long)l), 0, hp->n_ff, E, h, y);
                        else
                                ref_moe(&r, l, h, y);
                        for (int64_t i = 0; i < E; i++)
                                x[i] += y[i];
                }
                rmsnorm(x, tensor(&r, "output_norm.weight"), E, hp->rms_eps, h);
                matvec(out ? out : tensor(&r, "token_embd.weight"), 0, V, h, logits + p * V);
        }
        free(cache), free(x), free(h), free(y);
        return logits;
}

/* ---- the engine, driven directly ---- */

struct eng {
        struct mo_model *m;
        mo_backend *b;
        struct kv_cache *kv;
        struct fwd_ctx *f;
};

static void eng_open(struct eng *g, const char *path, int threads, int64_t max_tokens)
{
        struct moerr e = {0};
        struct kv_config kc;

        if (model_load(path, &g->m, &e) < 0 || mo_backend_cpu_new(threads, &g->b, &e) < 0)
                fail_msg("%s", e.msg);
        kc = (struct kv_config){ .n_layer = g->m->hp.n_layer, .row_width = g->m->hp.kv_lora + g->m->hp.n_rot,
                                 .block_tokens = 4, .n_blocks = 256 };
        if (kv_new(g->b, &kc, &g->kv, &e) < 0 || fwd_new(g->m, g->b, max_tokens, &g->f, &e) < 0)
                fail_msg("%s", e.msg);
}

static void eng_close(struct eng *g)
{
        fwd_free(g->f);
        kv_free(g->kv);
        mo_backend_free(g->b);
        model_free(g->m);
}

/* All logits of a sequence fed in chunks of `chunk` tokens. */
static float *eng_run(struct eng *g, const int32_t *toks, int64_t n, int64_t chunk)
{
        int64_t V = g->m->hp.n_vocab;
        float *logits = malloc(n * V * sizeof(float));
        struct kv_seq seq = {0};
        struct moerr e = {0};

        assert_int_equal(kv_seq_reserve(g->kv, &seq, n), 0);
        for (int64_t i = 0; i < n; i += chunk) {
                struct fwd_seq s = { .kv = &seq, .tokens = toks + i, .n_tokens = chunk < n - i ? chunk : n - i,
                                     .pos0 = i, .all_logits = true };
                if (fwd_step(g->f, g->kv, &s, 1, logits + i * V, &e) < 0)
                        fail_msg("%s", e.msg);
        }
        kv_seq_release(g->kv, &seq);
        return logits;
}

static void tokens(int32_t *t, int64_t n, int64_t vocab, uint64_t seed)
{
        for (int64_t i = 0; i < n; i++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                t[i] = (int32_t)((seed >> 33) % (uint64_t)vocab);
        }
}

/* Worst per-position relative error between two n x V logit sets. */
static double worst_rel(const float *a, const float *b, int64_t n, int64_t V)
{
        double w = 0;

        for (int64_t i = 0; i < n; i++)
                w = fmax(w, tu_rel_err(a + i * V, b + i * V, V));
        return w;
}

/* ---- tests ---- */

#define N_TOK 12

/* tiny with every expert used: top-k selection is discontinuous (a tiny
 * change of a router logit can swap an expert), so comparing quantized
 * weights with the F32-activation reference is only meaningful where the
 * routing cannot flip. The weights are continuous in the router logits. */
static const char *all_experts_fixture(int type)
{
        char name[64];
        struct fixture_spec s;
        struct moerr e = {0};
        char *path;

        snprintf(name, sizeof name, "all-experts-%s.gguf", mo_type_name(type));
        path = tu_path(name);
        assert_int_equal(fixture_shape("tiny", &s, &e), 0);
        s.name = "tiny-all-experts";
        s.n_expert_used = s.n_expert;
        s.n_group = 1;
        s.n_group_used = 1;
        s.weight_type = type;
        if (fixture_write(&s, path, &e) < 0)
                fail_msg("%s", e.msg);
        return path;
}

static double engine_vs_reference_at(const char *path, const char *label, int type, int64_t chunk)
{
        struct eng g = {0};
        int32_t t[N_TOK];
        float *ref, *got;
        double err;

        eng_open(&g, path, 2, 16);
        tokens(t, N_TOK, g.m->hp.n_vocab, 7);
        ref = ref_forward(g.m, t, N_TOK);
        got = eng_run(&g, t, N_TOK, chunk);
        err = worst_rel(got, ref, N_TOK, g.m->hp.n_vocab);
        printf("  %-16s %-5s chunk %2lld: worst relative error %.2e\n", label, mo_type_name(type),
               (long long)chunk, err);
        free(ref);
        free(got);
        eng_close(&g);
        return err;
}

static double engine_vs_reference(const char *shape, int type, int64_t chunk)
{
        return engine_vs_reference_at(tu_fixture(shape, type, false), shape, type, chunk);
}

/* Every layout and routing variant, in F32, prefilled whole and decoded
 * token by token, agrees with the reference. */
static void forward_f32_matches_reference_for_every_variant(void **state)
{
        static const char *const shapes[] = { "tiny", "tiny-softmax", "tiny-legacy", "tiny-noqlora",
                                              "tiny-fused", "tiny-tied", "tiny-noyarn", "tiny-yarn-nolog",
                                              "tiny-groups" };
        (void)state;
        for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
                assert_true(engine_vs_reference(shapes[i], MO_TYPE_F32, N_TOK) < 1e-4);
                assert_true(engine_vs_reference(shapes[i], MO_TYPE_F32, 1) < 1e-4);
        }
}

/* Quantized weights: the engine quantizes activations too (Q8_0 / Q8_K, as
 * llama.cpp does), so it differs from the F32-activation reference by that
 * rounding. Bounds are a few times the errors measured on these fixtures
 * (every expert used, see all_experts_fixture). */
static void forward_quantized_matches_reference(void **state)
{
        static const struct { int type; double bound; } cases[] = {
                { MO_TYPE_F16, 1e-5 },  { MO_TYPE_BF16, 1e-5 }, { MO_TYPE_Q8_0, 4e-2 },
                { MO_TYPE_Q6_K, 4e-2 }, { MO_TYPE_Q5_K, 4e-2 }, { MO_TYPE_Q5_0, 4e-2 },
                { MO_TYPE_Q4_K, 4e-2 }, { MO_TYPE_Q4_0, 4e-2 },
        };
        (void)state;
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
                assert_true(engine_vs_reference_at(all_experts_fixture(cases[i].type), "tiny-all-experts",
                                                   cases[i].type, 5) < cases[i].bound);
}

/* Absorbed attention (the engine's) equals the decompressed form. */
static void forward_absorbed_equals_decompressed(void **state)
{
        static const char *const shapes[] = { "tiny", "tiny-legacy", "tiny-noyarn" };
        (void)state;
        for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
                struct eng g = {0};
                int32_t t[N_TOK];
                float *a, *d;

                eng_open(&g, tu_fixture(shapes[i], MO_TYPE_F32, false), 2, 16);
                tokens(t, N_TOK, g.m->hp.n_vocab, 3);
                a = eng_run(&g, t, N_TOK, 4);
                fwd_set_decompressed(g.f, true);
                d = eng_run(&g, t, N_TOK, 4);
                assert_true(worst_rel(a, d, N_TOK, g.m->hp.n_vocab) < 1e-4);
                free(a);
                free(d);
                eng_close(&g);
        }
}

/* One prefill step and token-by-token decoding give the same logits. */
static void forward_prefill_equals_token_by_token(void **state)
{
        static const int types[] = { MO_TYPE_F32, MO_TYPE_Q8_0, MO_TYPE_Q4_K };
        (void)state;
        for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
                struct eng g = {0};
                int32_t t[N_TOK];
                float *whole, *single;
                double err;

                eng_open(&g, tu_fixture("tiny", types[i], false), 2, 16);
                tokens(t, N_TOK, g.m->hp.n_vocab, 11);
                whole = eng_run(&g, t, N_TOK, N_TOK);
                single = eng_run(&g, t, N_TOK, 1);
                err = worst_rel(whole, single, N_TOK, g.m->hp.n_vocab);
                printf("  prefill vs decode %s: %.2e\n", mo_type_name(types[i]), err);
                assert_true(err < 1e-5);
                free(whole);
                free(single);
                eng_close(&g);
        }
}

/* Sequences of different lengths at different positions in one step get
 * the logits each gets alone. */
static void forward_batch_matches_each_alone(void **state)
{
        enum { S = 4 };
        static const int64_t pre[S] = { 0, 3, 7, 1 }, len[S] = { 1, 5, 2, 6 };
        struct eng g = {0};
        struct kv_seq kvs[S] = {{0}};
        struct fwd_seq seqs[S];
        struct moerr e = {0};
        int32_t t[S][16];
        float *batch, *alone[S];
        int64_t V, off = 0;

        (void)state;
        eng_open(&g, tu_fixture("tiny", MO_TYPE_Q8_0, false), 2, 32);
        V = g.m->hp.n_vocab;
        for (int s = 0; s < S; s++) {
                tokens(t[s], pre[s] + len[s], V, 100 + s);
                alone[s] = eng_run(&g, t[s], pre[s] + len[s], 1);
        }
        /* Prefill each sequence's first part on its own, then one mixed step. */
        for (int s = 0; s < S; s++) {
                assert_int_equal(kv_seq_reserve(g.kv, &kvs[s], pre[s] + len[s]), 0);
                if (pre[s]) {
                        float *tmp = malloc(V * sizeof(float));
                        struct fwd_seq p = { .kv = &kvs[s], .tokens = t[s], .n_tokens = pre[s] };
                        assert_int_equal(fwd_step(g.f, g.kv, &p, 1, tmp, &e), 0);
                        free(tmp);
                }
                seqs[s] = (struct fwd_seq){ .kv = &kvs[s], .tokens = t[s] + pre[s], .n_tokens = len[s],
                                            .pos0 = pre[s], .all_logits = true };
        }
        batch = malloc(14 * V * sizeof(float));
        if (fwd_step(g.f, g.kv, seqs, S, batch, &e) < 0)
                fail_msg("%s", e.msg);
        for (int s = 0; s < S; s++) {
                double err = worst_rel(batch + off * V, alone[s] + pre[s] * V, len[s], V);
                assert_true(err < 1e-5);
                off += len[s];
                assert_int_equal(kvs[s].n_tokens, pre[s] + len[s]);
                kv_seq_release(g.kv, &kvs[s]);
                free(alone[s]);
        }
        free(batch);
        eng_close(&g);
}

/* The experts of a layer go in waves of at most pair_cap (token, expert)
 * pairs; the smallest wave gives the bits of the default single wave. */
static void forward_expert_waves_do_not_change_logits(void **state)
{
        struct eng g = {0};
        int32_t t[N_TOK];
        float *one, *many;
        int64_t V;

        (void)state;
        eng_open(&g, tu_fixture("tiny", MO_TYPE_Q8_0, false), 2, N_TOK);
        V = g.m->hp.n_vocab;
        tokens(t, N_TOK, V, 9);
        assert_true(g.m->hp.n_expert_used > 1);
        assert_int_equal(fwd_set_wave_pairs(g.f, 1 << 20), N_TOK * g.m->hp.n_expert_used);
        one = eng_run(&g, t, N_TOK, N_TOK);
        assert_int_equal(fwd_set_wave_pairs(g.f, 1), N_TOK); /* clamped to max_tokens */
        many = eng_run(&g, t, N_TOK, N_TOK);
        assert_memory_equal(one, many, N_TOK * V * sizeof(float));
        free(one);
        free(many);
        eng_close(&g);
}

/* The result does not depend on the number of worker threads. */
static void forward_is_identical_across_thread_counts(void **state)
{
        float *l[3];
        int32_t t[N_TOK];
        int64_t V = 0;

        (void)state;
        for (int th = 1; th <= 3; th++) {
                struct eng g = {0};
                eng_open(&g, tu_fixture("tiny", MO_TYPE_Q4_K, false), th, 16);
                V = g.m->hp.n_vocab;
                tokens(t, N_TOK, V, 5);
                l[th - 1] = eng_run(&g, t, N_TOK, 5);
                eng_close(&g);
        }
        assert_memory_equal(l[0], l[1], N_TOK * V * sizeof(float));
        assert_memory_equal(l[0], l[2], N_TOK * V * sizeof(float));
        for (int i = 0; i < 3; i++)
                free(l[i]);
}

static void forward_rejects_bad_batches(void **state)
{
        struct eng g = {0};
        struct kv_seq kv = {0};
        struct moerr e = {0};
        int32_t t[20] = { 0 };
        float *logits;

        (void)state;
        eng_open(&g, tu_fixture("tiny", MO_TYPE_F32, false), 1, 8);
        logits = malloc(20 * g.m->hp.n_vocab * sizeof(float));
        assert_int_equal(kv_seq_reserve(g.kv, &kv, 8), 0);

        t[0] = (int32_t)g.m->hp.n_vocab;
        struct fwd_seq s = { .kv = &kv, .tokens = t, .n_tokens = 1 };
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "outside the vocabulary"));
        t[0] = 0;

        s.n_tokens = 9; /* more than the batch holds */
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -E2BIG);

        s.n_tokens = 4;
        s.pos0 = 6; /* beyond what is cached */
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -EINVAL);

        s.pos0 = 0;
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), 0);
        s.pos0 = 4;
        s.n_tokens = 8; /* the cache holds 8 tokens for this sequence */
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -ENOSPC);

        kv_seq_release(g.kv, &kv);
        free(logits);
        eng_close(&g);
}

/* A copy of the file at from, at tu_path(name). */
static const char *copy_file(const char *from, const char *name)
{
        const char *to = tu_path(name);
        FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
        char buf[65536];
        size_t n;

        assert_non_null(in);
        assert_non_null(out);
        while ((n = fread(buf, 1, sizeof buf, in)) > 0)
                assert_int_equal(fwrite(buf, 1, n, out), n);
        fclose(in);
        assert_int_equal(fclose(out), 0);
        return to;
}

/* The model file is cut short while the engine runs on it (a copy over
 * it, in place): the step that reads the missing pages, and every one
 * after, fails with a message, and nothing crashes. */
static void forward_fails_cleanly_when_its_file_is_cut_short(void **state)
{
        const char *path = copy_file(tu_fixture("tiny", MO_TYPE_Q8_0, false), "cut-short.gguf");
        struct eng g = {0};
        struct kv_seq kv = {0};
        struct moerr e = {0};
        int32_t t[4] = { 1, 2, 3, 4 };
        struct stat st;
        float *logits;

        (void)state;
        eng_open(&g, path, 2, 8);
        logits = malloc(4 * g.m->hp.n_vocab * sizeof(float));
        assert_int_equal(kv_seq_reserve(g.kv, &kv, 8), 0);
        struct fwd_seq s = { .kv = &kv, .tokens = t, .n_tokens = 2 };
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(truncate(path, st.st_size / 2), 0);

        s.tokens = t + 2;
        s.pos0 = 2;
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -EIO);
        assert_non_null(strstr(e.msg, "model file was cut short"));
        assert_int_equal(kv.n_tokens, 2); /* the failed step took no place in the cache */
        assert_int_equal(fwd_step(g.f, g.kv, &s, 1, logits, &e), -EIO);

        kv_seq_release(g.kv, &kv);
        free(logits);
        eng_close(&g);
        unlink(path);
}

/* ---- experts sharded over virtual devices ---- */

static const char *const sharded_shapes[] = { "tiny", "tiny-softmax", "tiny-legacy", "tiny-noqlora",
                                              "tiny-fused", "tiny-tied", "tiny-noyarn",
                                              "tiny-yarn-nolog", "tiny-groups" };

/* Sharding only moves rows and keeps every sum in the unsharded order, so
 * the logits must be equal to the bit, not merely close. */
static void assert_same_logits(const float *got, const float *want, int64_t n, int64_t V,
                               const char *shape, int n_dev, const char *what)
{
        if (memcmp(got, want, (size_t)(n * V) * sizeof(float)) != 0)
                fail_msg("%s, %d devices, %s: logits differ (worst relative error %.2e)", shape, n_dev,
                         what, worst_rel(got, want, n, V));
}

/* Prefill (one step) and decode (token by token) under the current
 * sharding, each against the unsharded logits. */
static void sharded_run(struct eng *g, const int32_t *t, const float *pre, const float *dec,
                        const char *shape, int n_dev, const char *placement)
{
        char what[64];
        float *l;

        snprintf(what, sizeof what, "%s, prefill", placement);
        l = eng_run(g, t, N_TOK, N_TOK);
        assert_same_logits(l, pre, N_TOK, g->m->hp.n_vocab, shape, n_dev, what);
        free(l);
        snprintf(what, sizeof what, "%s, decode", placement);
        l = eng_run(g, t, N_TOK, 1);
        assert_same_logits(l, dec, N_TOK, g->m->hp.n_vocab, shape, n_dev, what);
        free(l);
}

/* Every routed (token, expert) pair of the runs so far was counted once. */
static void assert_loads(const struct eng *g, struct placement *p, uint64_t tokens)
{
        const struct mo_hparams *hp = &g->m->hp;

        for (int64_t l = 0; l < hp->n_layer; l++) {
                uint64_t sum = 0;
                for (int x = 0; x < placement_experts(p); x++)
                        sum += placement_load(p, (int)l, x);
                assert_int_equal(sum, l < hp->n_dense ? 0 : tokens * (uint64_t)hp->n_expert_used);
        }
}

/* The last device holds every expert of every layer, the others none. */
static void pin_all_to_last(struct placement *p, int64_t n_layer)
{
        int32_t owners[256];
        struct moerr e = {0};

        assert_true(placement_experts(p) <= 256);
        for (int x = 0; x < placement_experts(p); x++)
                owners[x] = placement_devices(p) - 1;
        for (int64_t l = 0; l < n_layer; l++)
                assert_int_equal(placement_set(p, (int)l, owners, &e), 0);
}

/* Placements that differ from the initial contiguous one, in all layers. */
static int moved_experts(struct placement *p, int64_t n_layer)
{
        int X = placement_experts(p), N = placement_devices(p), moved = 0;

        for (int64_t l = 0; l < n_layer; l++)
                for (int x = 0; x < X; x++)
                        moved += placement_owner(p, (int)l, x) != x * N / X;
        return moved;
}

/* One model sharded over 1 to 4 virtual devices under the initial
 * placement, a rebalanced one and one with every expert on one device;
 * returns how many experts the rebalances moved. */
static int sharded_vs_unsharded(const char *path, const char *label)
{
        struct eng g = {0};
        struct moerr e = {0};
        int32_t t[N_TOK];
        float *pre, *dec;
        int moved = 0;

        eng_open(&g, path, 2, 16);
        tokens(t, N_TOK, g.m->hp.n_vocab, 13);
        pre = eng_run(&g, t, N_TOK, N_TOK);
        dec = eng_run(&g, t, N_TOK, 1);
        for (int n = 1; n <= 4; n++) {
                struct placement *p;
                if (fwd_set_devices(g.f, n, &e) < 0)
                        fail_msg("%s", e.msg);
                p = fwd_placement(g.f);
                assert_true((p != NULL) == (n > 1));
                sharded_run(&g, t, pre, dec, label, n, "contiguous");
                if (!p)
                        continue;
                assert_loads(&g, p, 2 * N_TOK);
                assert_int_equal(placement_rebalance(p, 0, &e), 0);
                moved += moved_experts(p, g.m->hp.n_layer);
                sharded_run(&g, t, pre, dec, label, n, "rebalanced");
                pin_all_to_last(p, g.m->hp.n_layer);
                sharded_run(&g, t, pre, dec, label, n, "all on one device");
        }
        printf("  %-16s sharded over 1-4 devices: bit-identical\n", label);
        free(pre);
        free(dec);
        eng_close(&g);
        return moved;
}

/* Every routing and layout variant, and tiny with all 8 experts used (a
 * token's sum then has 8 terms, where any change of order would show;
 * with 2, float addition is commutative): the logits of prefill and
 * decode equal the unsharded ones bit for bit. */
static void forward_sharded_equals_unsharded(void **state)
{
        int moved = 0;

        (void)state;
        for (size_t i = 0; i < sizeof sharded_shapes / sizeof *sharded_shapes; i++)
                moved += sharded_vs_unsharded(tu_fixture(sharded_shapes[i], MO_TYPE_F32, false),
                                              sharded_shapes[i]);
        moved += sharded_vs_unsharded(all_experts_fixture(MO_TYPE_F32), "tiny-all-experts");
        assert_true(moved > 0); /* the rebalanced runs did test other maps */
}

/* One step over sequences of different lengths at different positions,
 * with n_dev devices: the logits of every row. */
static float *mixed_batch(const char *path, int n_dev, int64_t *n_rows, int64_t *V)
{
        enum { S = 5 };
        static const int64_t pre[S] = { 0, 3, 7, 1, 2 }, len[S] = { 1, 5, 2, 6, 1 };
        struct eng g = {0};
        struct kv_seq kvs[S] = {{0}};
        struct fwd_seq seqs[S];
        struct moerr e = {0};
        int32_t t[S][16];
        float *out;

        eng_open(&g, path, 2, 32);
        *V = g.m->hp.n_vocab;
        if (fwd_set_devices(g.f, n_dev, &e) < 0)
                fail_msg("%s", e.msg);
        *n_rows = 0;
        for (int s = 0; s < S; s++) {
                tokens(t[s], pre[s] + len[s], *V, 200 + s);
                assert_int_equal(kv_seq_reserve(g.kv, &kvs[s], pre[s] + len[s]), 0);
                if (pre[s]) {
                        float *tmp = malloc(*V * sizeof(float));
                        struct fwd_seq p = { .kv = &kvs[s], .tokens = t[s], .n_tokens = pre[s] };
                        assert_int_equal(fwd_step(g.f, g.kv, &p, 1, tmp, &e), 0);
                        free(tmp);
                }
                seqs[s] = (struct fwd_seq){ .kv = &kvs[s], .tokens = t[s] + pre[s], .n_tokens = len[s],
                                            .pos0 = pre[s], .all_logits = s % 2 == 0 };
                *n_rows += seqs[s].all_logits ? len[s] : 1;
        }
        out = malloc(*n_rows * *V * sizeof(float));
        if (fwd_step(g.f, g.kv, seqs, S, out, &e) < 0)
                fail_msg("%s", e.msg);
        for (int s = 0; s < S; s++)
                kv_seq_release(g.kv, &kvs[s]);
        eng_close(&g);
        return out;
}

/* A mixed batch of prefill chunks and decode tokens, quantized weights
 * (activations quantized per row in the kernels), 2 to 4 devices. */
static void forward_sharded_mixed_batch_equals_unsharded(void **state)
{
        const char *paths[2] = { tu_fixture("tiny", MO_TYPE_Q4_K, false), all_experts_fixture(MO_TYPE_Q8_0) };

        (void)state;
        for (int i = 0; i < 2; i++) {
                int64_t n, V;
                float *want = mixed_batch(paths[i], 0, &n, &V);
                for (int d = 2; d <= 4; d++) {
                        int64_t n2;
                        float *got = mixed_batch(paths[i], d, &n2, &V);
                        assert_int_equal(n2, n);
                        assert_same_logits(got, want, n, V, paths[i], d, "mixed batch");
                        free(got);
                }
                free(want);
        }
}

static void forward_set_devices_rejects_bad_counts(void **state)
{
        struct eng g = {0};
        struct moerr e = {0};

        (void)state;
        eng_open(&g, tu_fixture("tiny", MO_TYPE_F32, false), 1, 8);
        assert_int_equal(fwd_set_devices(g.f, -1, &e), -EINVAL);
        assert_int_equal(fwd_set_devices(g.f, 65, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "65 devices"));
        assert_null(fwd_placement(g.f));
        assert_int_equal(fwd_set_devices(g.f, 3, &e), 0);
        assert_int_equal(placement_devices(fwd_placement(g.f)), 3);
        assert_int_equal(fwd_set_devices(g.f, 1, &e), 0);
        assert_null(fwd_placement(g.f));
        eng_close(&g);
}

int main(void)
{
        const char *want = getenv("MOED_CPU_SIMD");
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(forward_f32_matches_reference_for_every_variant),
                cmocka_unit_test(forward_quantized_matches_reference),
                cmocka_unit_test(forward_absorbed_equals_decompressed),
                cmocka_unit_test(forward_prefill_equals_token_by_token),
                cmocka_unit_test(forward_batch_matches_each_alone),
                cmocka_unit_test(forward_expert_waves_do_not_change_logits),
                cmocka_unit_test(forward_is_identical_across_thread_counts),
                cmocka_unit_test(forward_rejects_bad_batches),
                cmocka_unit_test(forward_fails_cleanly_when_its_file_is_cut_short),
                cmocka_unit_test(forward_sharded_equals_unsharded),
                cmocka_unit_test(forward_sharded_mixed_batch_equals_unsharded),
                cmocka_unit_test(forward_set_devices_rejects_bad_counts),
        };
        /* A lowered level must really be the one running, or the extra runs
         * in tests/meson.build would test nothing new. */
        printf("CPU kernels: %s\n", mo_cpu_simd_level());
        if (want && strcmp(want, mo_cpu_simd_level()) != 0) {
                fprintf(stderr, "MOED_CPU_SIMD=%s but the kernels run %s\n", want, mo_cpu_simd_level());
                return 1;
        }
        return cmocka_run_group_tests(tests, NULL, NULL);
}
