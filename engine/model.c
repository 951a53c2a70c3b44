/* model: binds a deepseek2 GGUF file to the structures the forward pass
 * reads. Hyperparameters follow llama.cpp's defaults and quirks (see
 * DEEPSEEK-REFERENCE.md section 1); every tensor is checked for presence,
 * shape and a type moed can compute with before anything runs. */
#include "engine/model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "kernels/quant.h"

#define ARCH "deepseek2"
/* Upper bounds that keep every size product far from overflow while
 * admitting any real model (V3: 7168 hidden, 129280 vocab, 256 experts). */
#define MAX_DIM (1 << 20)
#define MAX_LAYERS 4096
#define MAX_EXPERTS 65536

/* Owned allocations (transposed or converted weights), freed with the model. */
struct owned {
        void **ptrs;
        size_t n, cap;
};

static void *model_own(struct mo_model *m, size_t bytes)
{
        struct owned *o = m->owned;
        void *p;

        if (o->n == o->cap) {
                size_t cap = o->cap ? 2 * o->cap : 16;
                void **np = realloc(o->ptrs, cap * sizeof *np);
                if (!np)
                        return NULL;
                o->ptrs = np;
                o->cap = cap;
        }
        p = calloc(1, bytes ? bytes : 1);
        if (p)
                o->ptrs[o->n++] = p;
        return p;
}

/* ---- hyperparameters ---- */

static int get_u32_req(const struct gguf *g, const char *suffix, int64_t *v, struct moerr *e)
{
        char key[128];
        uint32_t u;
        int r;

        snprintf(key, sizeof key, ARCH ".%s", suffix);
        r = gguf_get_u32(g, key, &u, e);
        if (r < 0)
                return r == -ENOENT ? moerr_set(e, -EINVAL, "required key '%s' is missing", key) : r;
        *v = u;
        return 0;
}

static int get_u32_opt(const struct gguf *g, const char *suffix, int64_t def, int64_t *v,
                       struct moerr *e)
{
        char key[128];
        uint32_t u;
        int r;

        snprintf(key, sizeof key, ARCH ".%s", suffix);
        r = gguf_get_u32(g, key, &u, e);
        if (r == -ENOENT) {
                *v = def;
                return 0;
        }
        if (r < 0)
                return r;
        *v = u;
        return 0;
}

static int get_f32_opt(const struct gguf *g, const char *suffix, float def, float *v,
                       bool *present, struct moerr *e)
{
        char key[128];
        int r;

        snprintf(key, sizeof key, ARCH ".%s", suffix);
        r = gguf_get_f32(g, key, v, e);
        if (present)
                *present = r == 0;
        if (r == -ENOENT) {
                *v = def;
                return 0;
        }
        if (r == 0 && !isfinite(*v))
                return moerr_set(e, -EINVAL, "key '%s' is not a finite number", key);
        return r;
}

static int check_arch(const struct gguf *g, struct moerr *e)
{
        const char *s;
        size_t len;
        int r;

        r = gguf_get_str(g, "general.architecture", &s, &len, e);
        if (r < 0)
                return moerr_prefix(e, r, "not a model file");
        if (len != strlen(ARCH) || memcmp(s, ARCH, len) != 0)
                return moerr_set(e, -EINVAL, "architecture '%.*s' is not supported (moed runs '" ARCH "': "
                                 "DeepSeek-V2, V2-Lite, V2.5, V3, R1)", (int)MO_MIN(len, 64), s);
        return 0;
}

static int read_rope(const struct gguf *g, struct mo_hparams *hp, struct moerr *e)
{
        char key[128];
        const char *s = "linear";
        size_t len = strlen(s);
        bool has_log_mul;
        int r;

        r = get_f32_opt(g, "rope.freq_base", 10000.0f, &hp->rope_base, NULL, e);
        if (r < 0)
                return r;
        snprintf(key, sizeof key, ARCH ".rope.scaling.type");
        r = gguf_get_str(g, key, &s, &len, e);
        if (r < 0 && r != -ENOENT)
                return r;
        hp->yarn = len == 4 && memcmp(s, "yarn", 4) == 0;
        if (!hp->yarn && !(len == 6 && memcmp(s, "linear", 6) == 0) &&
            !(len == 4 && memcmp(s, "none", 4) == 0))
                return moerr_set(e, -EINVAL, "rope scaling '%.*s' is not supported (yarn, linear, none)",
                                 (int)MO_MIN(len, 32), s);
        r = get_f32_opt(g, "rope.scaling.factor", 0.0f, &hp->yarn_factor, NULL, e);
        if (r < 0)
                return r;
        if (hp->yarn_factor <= 0.0f)
                hp->yarn_factor = 1.0f; /* llama.cpp: factor 0 means freq_scale 1 */
        if (!hp->yarn && hp->yarn_factor != 1.0f)
                return moerr_set(e, -EINVAL, "linear rope scaling (factor %g) is not used by DeepSeek models "
                                 "and not supported", hp->yarn_factor);
        r = get_u32_opt(g, "rope.scaling.original_context_length", hp->n_ctx_train, &hp->yarn_orig_ctx, e);
        if (r < 0)
                return r;
        r = get_f32_opt(g, "rope.scaling.yarn_log_multiplier", 0.0f, &hp->yarn_log_mul, &has_log_mul, e);
        if (r < 0)
                return r;
        /* llama.cpp divides the stored value (0.1 x mscale_all_dim) by 0.1. */
        hp->yarn_log_mul = has_log_mul ? hp->yarn_log_mul / 0.1f : -1.0f;
        r = get_f32_opt(g, "rope.scaling.yarn_beta_fast", 32.0f, &hp->yarn_beta_fast, NULL, e);
        if (r < 0)
                return r;
        return get_f32_opt(g, "rope.scaling.yarn_beta_slow", 1.0f, &hp->yarn_beta_slow, NULL, e);
}

static int read_moe(const struct gguf *g, struct mo_hparams *hp, struct moerr *e)
{
        char key[128];
        int64_t gating;
        bool norm = false;
        int r;

        if ((r = get_u32_opt(g, "leading_dense_block_count", 0, &hp->n_dense, e)) < 0 ||
            (r = get_u32_req(g, "expert_feed_forward_length", &hp->n_ff_exp, e)) < 0 ||
            (r = get_u32_opt(g, "expert_count", 0, &hp->n_expert, e)) < 0 ||
            (r = get_u32_opt(g, "expert_used_count", 0, &hp->n_expert_used, e)) < 0 ||
            (r = get_u32_req(g, "expert_shared_count", &hp->n_expert_shared, e)) < 0 ||
            (r = get_u32_opt(g, "expert_gating_func", MOE_SOFTMAX, &gating, e)) < 0 ||
            (r = get_u32_opt(g, "expert_group_count", 0, &hp->n_group, e)) < 0 ||
            (r = get_u32_opt(g, "expert_group_used_count", 0, &hp->n_group_used, e)) < 0 ||
            (r = get_f32_opt(g, "expert_weights_scale", 0.0f, &hp->expert_scale, NULL, e)) < 0)
                return r;
        snprintf(key, sizeof key, ARCH ".expert_weights_norm");
        r = gguf_get_bool(g, key, &norm, e);
        if (r < 0 && r != -ENOENT)
                return r;
        hp->expert_norm = norm;
        if (gating != MOE_SOFTMAX && gating != MOE_SIGMOID)
                return moerr_set(e, -EINVAL, "expert_gating_func %lld is unknown (1 softmax, 2 sigmoid)",
                                 (long long)gating);
        hp->gating = (enum moe_gating)gating;
        return 0;
}

static int read_attention(const struct gguf *g, struct mo_hparams *hp, struct moerr *e)
{
        int64_t head_kv, k_mla, v_mla, k_len, v_len;
        int r;

        if ((r = get_u32_req(g, "attention.head_count", &hp->n_head, e)) < 0 ||
            (r = get_u32_opt(g, "attention.head_count_kv", hp->n_head, &head_kv, e)) < 0 ||
            (r = get_u32_req(g, "attention.kv_lora_rank", &hp->kv_lora, e)) < 0 ||
            (r = get_u32_opt(g, "attention.key_length_mla", 0, &k_mla, e)) < 0 ||
            (r = get_u32_opt(g, "attention.value_length_mla", 0, &v_mla, e)) < 0)
                return r;
        if (hp->n_head <= 0 || hp->n_head > MAX_DIM)
                return moerr_set(e, -EINVAL, "attention.head_count %lld is out of range",
                                 (long long)hp->n_head);
        if ((r = get_u32_opt(g, "attention.key_length", hp->n_embd / hp->n_head, &k_len, e)) < 0 ||
            (r = get_u32_opt(g, "attention.value_length", k_len, &v_len, e)) < 0)
                return r;
        /* llama.cpp reads q_lora_rank unless the model looks like V2-Lite
         * (26 or 27 layers), where it stays 0; elsewhere the key is required. */
        if (hp->n_layer == 26 || hp->n_layer == 27)
                hp->q_lora = 0;
        else if ((r = get_u32_req(g, "attention.q_lora_rank", &hp->q_lora, e)) < 0)
                return r;
        hp->split_mla = k_mla > 0 && v_mla > 0;
        if ((r = get_u32_opt(g, "rope.dimension_count", hp->split_mla ? k_mla : k_len, &hp->n_rot, e)) < 0)
                return r;
        hp->n_nope = (hp->split_mla ? k_mla : k_len) - hp->n_rot;
        hp->n_v = hp->split_mla ? v_mla : v_len;
        return 0;
}

static int check_range(const char *what, int64_t v, int64_t lo, int64_t hi, struct moerr *e)
{
        if (v < lo || v > hi)
                return moerr_set(e, -EINVAL, "%s = %lld is out of range [%lld, %lld]", what,
                                 (long long)v, (long long)lo, (long long)hi);
        return 0;
}

static int check_hparams(const struct mo_hparams *hp, struct moerr *e)
{
        bool moe = hp->n_dense < hp->n_layer;
        int r;

        if ((r = check_range("embedding_length", hp->n_embd, 1, MAX_DIM, e)) < 0 ||
            (r = check_range("block_count", hp->n_layer, 1, MAX_LAYERS, e)) < 0 ||
            (r = check_range("leading_dense_block_count", hp->n_dense, 0, hp->n_layer, e)) < 0 ||
            (r = check_range("attention.q_lora_rank", hp->q_lora, 0, MAX_DIM, e)) < 0 ||
            (r = check_range("attention.kv_lora_rank", hp->kv_lora, 1, MAX_DIM, e)) < 0 ||
            (r = check_range("rope.dimension_count", hp->n_rot, 2, 2 * ARRAY_SIZE(((struct mo_model *)0)->rope_freq), e)) < 0 ||
            (r = check_range("qk nope dimension (key length - rope)", hp->n_nope, 1, MAX_DIM, e)) < 0 ||
            (r = check_range("value length", hp->n_v, 1, MAX_DIM, e)) < 0 ||
            (r = check_range("vocab size", hp->n_vocab, 1, 1 << 24, e)) < 0)
                return r;
        if (hp->n_rot % 2)
                return moerr_set(e, -EINVAL, "rope.dimension_count %lld is odd", (long long)hp->n_rot);
        if (hp->n_dense > 0 && (r = check_range("feed_forward_length", hp->n_ff, 1, MAX_DIM, e)) < 0)
                return r;
        if (!moe)
                return 0;
        if ((r = check_range("expert_count", hp->n_expert, 1, MAX_EXPERTS, e)) < 0 ||
            (r = check_range("expert_used_count", hp->n_expert_used, 1, hp->n_expert, e)) < 0 ||
            (r = check_range("expert_feed_forward_length", hp->n_ff_exp, 1, MAX_DIM, e)) < 0 ||
            (r = check_range("expert_shared_count", hp->n_expert_shared, 0, 1024, e)) < 0)
                return r;
        if (hp->n_group > 1) {
                if (hp->n_expert % hp->n_group)
                        return moerr_set(e, -EINVAL, "expert_count %lld is not divisible by expert_group_count %lld",
                                         (long long)hp->n_expert, (long long)hp->n_group);
                if (hp->n_expert / hp->n_group < 2)
                        return moerr_set(e, -EINVAL, "expert groups need at least 2 experts each");
                if ((r = check_range("expert_group_used_count", hp->n_group_used, 1, hp->n_group, e)) < 0)
                        return r;
                if (hp->n_group_used * (hp->n_expert / hp->n_group) < hp->n_expert_used)
                        return moerr_set(e, -EINVAL, "expert_group_used_count %lld leaves fewer experts than "
                                         "expert_used_count %lld", (long long)hp->n_group_used,
                                         (long long)hp->n_expert_used);
        }
        return 0;
}

static int read_hparams(const struct gguf *g, struct mo_hparams *hp, struct moerr *e)
{
        uint64_t n_tokens = 0;
        enum gguf_vtype et;
        int r;

        memset(hp, 0, sizeof *hp);
        if ((r = get_u32_req(g, "context_length", &hp->n_ctx_train, e)) < 0 ||
            (r = get_u32_req(g, "embedding_length", &hp->n_embd, e)) < 0 ||
            (r = get_u32_req(g, "block_count", &hp->n_layer, e)) < 0 ||
            (r = get_u32_opt(g, "feed_forward_length", 0, &hp->n_ff, e)) < 0)
                return r;
        if ((r = check_range("embedding_length", hp->n_embd, 1, MAX_DIM, e)) < 0)
                return r;
        if ((r = read_attention(g, hp, e)) < 0 || (r = read_moe(g, hp, e)) < 0 ||
            (r = read_rope(g, hp, e)) < 0)
                return r;
        r = gguf_get_f32(g, ARCH ".attention.layer_norm_rms_epsilon", &hp->rms_eps, e);
        if (r < 0)
                return r == -ENOENT ? moerr_set(e, -EINVAL, "required key '" ARCH
                                                ".attention.layer_norm_rms_epsilon' is missing") : r;
        if (!(hp->rms_eps > 0.0f && hp->rms_eps < 1.0f))
                return moerr_set(e, -EINVAL, "layer_norm_rms_epsilon %g is out of range", hp->rms_eps);
        if (gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n_tokens, NULL) < 0)
                n_tokens = 0;
        if ((r = get_u32_opt(g, "vocab_size", (int64_t)n_tokens, &hp->n_vocab, e)) < 0)
                return r;
        return check_hparams(hp, e);
}

/* ---- tensors ---- */

/* Finds a tensor and checks its shape exactly (dims beyond n are 1). */
static int find_tensor(const struct mo_model *m, const char *name, int n, const int64_t *ne,
                       bool optional, const struct gguf_tensor **out, struct moerr *e)
{
        const struct gguf_tensor *t = gguf_find_tensor(m->file, name);

        *out = NULL;
        if (!t)
                return optional ? 0 : moerr_set(e, -EINVAL, "tensor '%s' is missing", name);
        for (int i = 0; i < GGUF_MAX_DIMS; i++) {
                int64_t want = i < n ? ne[i] : 1;
                if (t->ne[i] != want)
                        return moerr_set(e, -EINVAL, "tensor '%s' has shape [%lld, %lld, %lld], expected "
                                         "[%lld, %lld, %lld]", name, (long long)t->ne[0], (long long)t->ne[1],
                                         (long long)t->ne[2], (long long)ne[0], (long long)(n > 1 ? ne[1] : 1),
                                         (long long)(n > 2 ? ne[2] : 1));
        }
        *out = t;
        return 0;
}

static int check_computable(const struct gguf_tensor *t, struct moerr *e)
{
        const struct mo_type_info *ti = mo_type_get(t->type);

        if (!ti || !ti->computable)
                return moerr_set(e, -EOPNOTSUPP, "tensor '%s' has type %s, which moed cannot compute with "
                                 "(supported: F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K)",
                                 t->name, mo_type_name(t->type));
        return 0;
}

static mo_weight weight_view(const struct gguf_tensor *t, int64_t index, int64_t nrows)
{
        size_t row_bytes = mo_row_bytes(t->type, t->ne[0]);

        return (mo_weight){
                .type = t->type,
                .ncols = t->ne[0],
                .nrows = nrows,
                .row_bytes = row_bytes,
                .data = (const char *)t->data + (size_t)index * row_bytes,
        };
}

static int bind_matrix(struct mo_model *m, const char *name, int64_t ncols, int64_t nrows,
                       bool optional, mo_weight *w, struct moerr *e)
{
        const struct gguf_tensor *t;
        int r;

        r = find_tensor(m, name, 2, (int64_t[]){ ncols, nrows }, optional, &t, e);
        if (r < 0 || !t)
                return r;
        if ((r = check_computable(t, e)) < 0)
                return r;
        *w = weight_view(t, 0, nrows);
        return 0;
}

/* A 1-D F32 vector (norm weights, biases); other float types are converted. */
static int bind_vector(struct mo_model *m, const char *name, int64_t n, bool optional,
                       const float **out, struct moerr *e)
{
        const struct gguf_tensor *t;
        float *conv;
        int r;

        *out = NULL;
        r = find_tensor(m, name, 1, &n, optional, &t, e);
        if (r < 0 || !t)
                return r;
        if (t->type == MO_TYPE_F32 && ((uintptr_t)t->data % sizeof(float)) == 0) {
                *out = t->data;
                return 0;
        }
        if ((r = check_computable(t, e)) < 0)
                return r;
        conv = model_own(m, n * sizeof(float));
        if (!conv)
                return moerr_set(e, -ENOMEM, "out of memory converting '%s'", name);
        mo_dequantize_row(t->type, t->data, conv, n);
        *out = conv;
        return 0;
}

/* n_mat matrices of nrows x ncols stacked in one 3-D tensor, as views.
 * rows_per gives the stride between matrices in rows (2*Fe for the fused
 * gate_up tensor), first the row offset of the view inside each. */
static int bind_stack(struct mo_model *m, const struct gguf_tensor *t, int64_t n_mat,
                      int64_t nrows, int64_t rows_per, int64_t first, mo_weight **out,
                      struct moerr *e)
{
        mo_weight *v;
        int r;

        if ((r = check_computable(t, e)) < 0)
                return r;
        v = model_own(m, n_mat * sizeof *v);
        if (!v)
                return moerr_set(e, -ENOMEM, "out of memory binding '%s'", t->name);
        for (int64_t i = 0; i < n_mat; i++)
                v[i] = weight_view(t, i * rows_per + first, nrows);
        *out = v;
        return 0;
}

static int bind_stack3(struct mo_model *m, const char *name, int64_t ncols, int64_t nrows,
                       int64_t n_mat, mo_weight **out, struct moerr *e)
{
        const struct gguf_tensor *t;
        int r;

        r = find_tensor(m, name, 3, (int64_t[]){ ncols, nrows, n_mat }, false, &t, e);
        if (r < 0)
                return r;
        return bind_stack(m, t, n_mat, nrows, nrows, 0, out, e);
}

/* Older files store W_UK inside attn_kv_b as nope rows of kv_lora per head;
 * the absorbed form needs its transpose (kv_lora rows of nope), which no
 * quantized block layout can express, so it is materialised once in F32. */
static int bind_legacy_kv_b(struct mo_model *m, struct mo_layer *L, const char *name,
                            struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        int64_t per_head = hp->n_nope + hp->n_v;
        const struct gguf_tensor *t;
        _cleanup_free_ float *row = NULL;
        float *kt;
        int r;

        r = find_tensor(m, name, 2, (int64_t[]){ hp->kv_lora, hp->n_head * per_head }, false, &t, e);
        if (r < 0)
                return r;
        if ((r = check_computable(t, e)) < 0)
                return r;
        L->k_b = model_own(m, hp->n_head * sizeof *L->k_b);
        L->v_b = model_own(m, hp->n_head * sizeof *L->v_b);
        kt = model_own(m, (size_t)hp->n_head * hp->kv_lora * hp->n_nope * sizeof(float));
        row = malloc(hp->kv_lora * sizeof(float));
        if (!L->k_b || !L->v_b || !kt || !row)
                return moerr_set(e, -ENOMEM, "out of memory transposing '%s'", name);
        for (int64_t h = 0; h < hp->n_head; h++) {
                float *kh = kt + h * hp->kv_lora * hp->n_nope;
                for (int64_t d = 0; d < hp->n_nope; d++) {
                        mo_weight wr = weight_view(t, h * per_head + d, 1);
                        mo_dequantize_row(t->type, wr.data, row, hp->kv_lora);
                        for (int64_t c = 0; c < hp->kv_lora; c++)
                                kh[c * hp->n_nope + d] = row[c];
                }
                L->k_b[h] = (mo_weight){ .type = MO_TYPE_F32, .ncols = hp->n_nope, .nrows = hp->kv_lora,
                                         .row_bytes = hp->n_nope * sizeof(float), .data = kh };
                L->v_b[h] = weight_view(t, h * per_head + hp->n_nope, hp->n_v);
        }
        return 0;
}

static int bind_attention(struct mo_model *m, struct mo_layer *L, int64_t il, struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        int64_t dk = hp->n_nope + hp->n_rot;
        char n[96];
        int r;

#define NAME(s) (snprintf(n, sizeof n, "blk.%lld." s, (long long)il), n)
        if ((r = bind_vector(m, NAME("attn_norm.weight"), hp->n_embd, false, &L->attn_norm, e)) < 0)
                return r;
        if (hp->q_lora > 0) {
                if ((r = bind_matrix(m, NAME("attn_q_a.weight"), hp->n_embd, hp->q_lora, false, &L->attn_q_a, e)) < 0 ||
                    (r = bind_vector(m, NAME("attn_q_a_norm.weight"), hp->q_lora, false, &L->attn_q_a_norm, e)) < 0 ||
                    (r = bind_matrix(m, NAME("attn_q_b.weight"), hp->q_lora, hp->n_head * dk, false, &L->attn_q_b, e)) < 0)
                        return r;
        } else if ((r = bind_matrix(m, NAME("attn_q.weight"), hp->n_embd, hp->n_head * dk, false, &L->attn_q, e)) < 0)
                return r;
        if ((r = bind_matrix(m, NAME("attn_kv_a_mqa.weight"), hp->n_embd, hp->kv_lora + hp->n_rot, false,
                             &L->attn_kv_a_mqa, e)) < 0 ||
            (r = bind_vector(m, NAME("attn_kv_a_norm.weight"), hp->kv_lora, false, &L->attn_kv_a_norm, e)) < 0 ||
            (r = bind_matrix(m, NAME("attn_output.weight"), hp->n_head * hp->n_v, hp->n_embd, false,
                             &L->attn_output, e)) < 0)
                return r;
        if (!hp->split_mla)
                return bind_legacy_kv_b(m, L, NAME("attn_kv_b.weight"), e);
        if ((r = bind_stack3(m, NAME("attn_k_b.weight"), hp->n_nope, hp->kv_lora, hp->n_head, &L->k_b, e)) < 0)
                return r;
        return bind_stack3(m, NAME("attn_v_b.weight"), hp->kv_lora, hp->n_v, hp->n_head, &L->v_b, e);
}

static int bind_experts(struct mo_model *m, struct mo_layer *L, int64_t il, struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        const struct gguf_tensor *t;
        char n[96];
        int r;

        snprintf(n, sizeof n, "blk.%lld.ffn_gate_up_exps.weight", (long long)il);
        if ((r = find_tensor(m, n, 3, (int64_t[]){ hp->n_embd, 2 * hp->n_ff_exp, hp->n_expert }, true, &t, e)) < 0)
                return r;
        if (t) {
                m->hp.fused_gate_up = true;
                if ((r = bind_stack(m, t, hp->n_expert, hp->n_ff_exp, 2 * hp->n_ff_exp, 0, &L->gate_exps, e)) < 0 ||
                    (r = bind_stack(m, t, hp->n_expert, hp->n_ff_exp, 2 * hp->n_ff_exp, hp->n_ff_exp, &L->up_exps, e)) < 0)
                        return r;
        } else if ((r = bind_stack3(m, NAME("ffn_gate_exps.weight"), hp->n_embd, hp->n_ff_exp, hp->n_expert,
                                    &L->gate_exps, e)) < 0 ||
                   (r = bind_stack3(m, NAME("ffn_up_exps.weight"), hp->n_embd, hp->n_ff_exp, hp->n_expert,
                                    &L->up_exps, e)) < 0)
                return r;
        return bind_stack3(m, NAME("ffn_down_exps.weight"), hp->n_ff_exp, hp->n_embd, hp->n_expert,
                           &L->down_exps, e);
}

static int bind_ffn(struct mo_model *m, struct mo_layer *L, int64_t il, struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        int64_t shared = hp->n_expert_shared * hp->n_ff_exp;
        char n[96];
        int r;

        if ((r = bind_vector(m, NAME("ffn_norm.weight"), hp->n_embd, false, &L->ffn_norm, e)) < 0)
                return r;
        if (il < hp->n_dense) {
                if ((r = bind_matrix(m, NAME("ffn_gate.weight"), hp->n_embd, hp->n_ff, false, &L->ffn_gate, e)) < 0 ||
                    (r = bind_matrix(m, NAME("ffn_up.weight"), hp->n_embd, hp->n_ff, false, &L->ffn_up, e)) < 0)
                        return r;
                return bind_matrix(m, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, false, &L->ffn_down, e);
        }
        if ((r = bind_matrix(m, NAME("ffn_gate_inp.weight"), hp->n_embd, hp->n_expert, false, &L->ffn_gate_inp, e)) < 0 ||
            (r = bind_vector(m, NAME("exp_probs_b.bias"), hp->n_expert, true, &L->exp_probs_b, e)) < 0 ||
            (r = bind_experts(m, L, il, e)) < 0)
                return r;
        if (shared == 0)
                return 0;
        if ((r = bind_matrix(m, NAME("ffn_gate_shexp.weight"), hp->n_embd, shared, false, &L->gate_shexp, e)) < 0 ||
            (r = bind_matrix(m, NAME("ffn_up_shexp.weight"), hp->n_embd, shared, false, &L->up_shexp, e)) < 0)
                return r;
        return bind_matrix(m, NAME("ffn_down_shexp.weight"), shared, hp->n_embd, false, &L->down_shexp, e);
#undef NAME
}

static int bind_tensors(struct mo_model *m, struct moerr *e)
{
        const struct mo_hparams *hp = &m->hp;
        int r;

        if ((r = bind_matrix(m, "token_embd.weight", hp->n_embd, hp->n_vocab, false, &m->token_embd, e)) < 0 ||
            (r = bind_vector(m, "output_norm.weight", hp->n_embd, false, &m->output_norm, e)) < 0 ||
            (r = bind_matrix(m, "output.weight", hp->n_embd, hp->n_vocab, true, &m->output, e)) < 0)
                return r;
        if (!m->output.data)
                m->output = m->token_embd; /* tied embeddings */
        m->layers = model_own(m, hp->n_layer * sizeof *m->layers);
        if (!m->layers)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (int64_t il = 0; il < hp->n_layer; il++) {
                if ((r = bind_attention(m, &m->layers[il], il, e)) < 0 ||
                    (r = bind_ffn(m, &m->layers[il], il, e)) < 0)
                        return r;
        }
        return 0;
}

/* ---- RoPE with YaRN, and the softmax scale ---- */

static float yarn_corr_dim(int64_t n_dims, int64_t n_orig, float n_rot, float base)
{
        return n_dims * logf((float)n_orig / (n_rot * 2.0f * (float)M_PI)) / (2.0f * logf(base));
}

void model_rope_init(const struct mo_hparams *hp, float *freq, float *mscale, float *kq_scale)
{
        float s = hp->yarn ? hp->yarn_factor : 1.0f;
        float lo = 0, hi = 0, M = 1.0f;
        bool scaled = hp->yarn && s != 1.0f;

        if (scaled) {
                lo = fmaxf(0.0f, floorf(yarn_corr_dim(hp->n_rot, hp->yarn_orig_ctx, hp->yarn_beta_fast, hp->rope_base)));
                hi = fminf((float)(hp->n_rot - 1),
                           ceilf(yarn_corr_dim(hp->n_rot, hp->yarn_orig_ctx, hp->yarn_beta_slow, hp->rope_base)));
        }
        for (int64_t i = 0; i < hp->n_rot / 2; i++) {
                float extrap = powf(hp->rope_base, -2.0f * (float)i / (float)hp->n_rot);
                float ramp = 0.0f; /* share of the interpolated frequency */

                if (scaled)
                        ramp = fminf(1.0f, fmaxf(0.0f, ((float)i - lo) / fmaxf(0.001f, hi - lo)));
                freq[i] = extrap / s * ramp + extrap * (1.0f - ramp);
        }
        /* With yarn_log_multiplier the rotation magnitude cancels to 1 and the
         * attention scale carries mscale_all_dim; without it llama.cpp's
         * general YaRN rule scales both by 1 + 0.1 ln s. */
        *mscale = 1.0f;
        if (scaled && hp->yarn_log_mul >= 0.0f) {
                M = 1.0f + 0.1f * hp->yarn_log_mul * logf(s);
        } else if (scaled) {
                M = 1.0f + 0.1f * logf(s);
                *mscale = M;
        }
        *kq_scale = M * M / sqrtf((float)(hp->n_nope + hp->n_rot));
}

/* ---- public ---- */

static char *model_name(const struct gguf *g)
{
        const char *s;
        size_t len;

        if (gguf_get_str(g, "general.name", &s, &len, NULL) == 0 && len > 0)
                return strndup(s, MO_MIN(len, 256));
        return strdup("deepseek2");
}

int model_from_gguf(struct gguf *g, struct mo_model **out, struct moerr *e)
{
        struct mo_model *m;
        int r;

        if ((r = check_arch(g, e)) < 0)
                return r;
        m = calloc(1, sizeof *m);
        if (!m || !(m->owned = calloc(1, sizeof(struct owned)))) {
                free(m);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        m->file = g;
        if ((r = read_hparams(g, &m->hp, e)) < 0 || (r = bind_tensors(m, e)) < 0)
                goto fail;
        if ((r = tok_new_from_gguf(g, &m->tok, e)) < 0) {
                moerr_prefix(e, r, "tokenizer");
                goto fail;
        }
        if (tok_n_vocab(m->tok) > m->hp.n_vocab) {
                r = moerr_set(e, -EINVAL, "tokenizer has %lld tokens but the model only %lld embeddings",
                              (long long)tok_n_vocab(m->tok), (long long)m->hp.n_vocab);
                goto fail;
        }
        for (int64_t i = 0; i < gguf_n_tensors(g); i++)
                m->weight_bytes += gguf_tensor_at(g, i)->nbytes;
        model_rope_init(&m->hp, m->rope_freq, &m->rope_mscale, &m->kq_scale);
        m->rope = (mo_rope){ .n_dims = m->hp.n_rot, .freq = m->rope_freq, .mscale = m->rope_mscale };
        m->router_proto = (struct moe_router){
                .n_expert = (int)m->hp.n_expert,
                .n_used = (int)m->hp.n_expert_used,
                .gating = m->hp.gating,
                .n_group = (int)m->hp.n_group,
                .n_group_used = (int)m->hp.n_group_used,
                .norm = m->hp.expert_norm,
                .scale = m->hp.expert_scale,
        };
        /* The router's own checks, for models that have MoE layers at all. */
        if (m->hp.n_dense < m->hp.n_layer && (r = moe_router_check(&m->router_proto, e)) < 0)
                goto fail;
        m->name = model_name(g);
        *out = m;
        return 0;
fail:
        m->file = NULL; /* the caller keeps g on failure */
        model_free(m);
        return r;
}

int model_load(const char *path, struct mo_model **out, struct moerr *e)
{
        struct gguf *g;
        int r;

        r = gguf_open(path, &g, e);
        if (r < 0)
                return moerr_prefix(e, r, "%s", path);
        r = model_from_gguf(g, out, e);
        if (r < 0) {
                gguf_close(g);
                return moerr_prefix(e, r, "%s", path);
        }
        return 0;
}

void model_free(struct mo_model *m)
{
        struct owned *o;

        if (!m)
                return;
        o = m->owned;
        if (o) {
                for (size_t i = 0; i < o->n; i++)
                        free(o->ptrs[i]);
                free(o->ptrs);
                free(o);
        }
        tok_free(m->tok);
        gguf_close(m->file);
        free(m->name);
        free(m);
}

static uint64_t weight_bytes(const mo_weight *w)
{
        return w->data ? (uint64_t)w->row_bytes * w->nrows : 0;
}

uint64_t model_weight_bytes_per_token(const struct mo_model *m)
{
        const struct mo_hparams *hp = &m->hp;
        uint64_t total = weight_bytes(&m->output);

        for (int64_t il = 0; il < hp->n_layer; il++) {
                const struct mo_layer *L = &m->layers[il];
                total += weight_bytes(&L->attn_q) + weight_bytes(&L->attn_q_a) + weight_bytes(&L->attn_q_b);
                total += weight_bytes(&L->attn_kv_a_mqa) + weight_bytes(&L->attn_output);
                total += hp->n_head * (weight_bytes(&L->k_b[0]) + weight_bytes(&L->v_b[0]));
                if (il < hp->n_dense) {
                        total += weight_bytes(&L->ffn_gate) + weight_bytes(&L->ffn_up) + weight_bytes(&L->ffn_down);
                        continue;
                }
                total += weight_bytes(&L->ffn_gate_inp);
                total += hp->n_expert_used * (weight_bytes(&L->gate_exps[0]) + weight_bytes(&L->up_exps[0]) +
                                              weight_bytes(&L->down_exps[0]));
                total += weight_bytes(&L->gate_shexp) + weight_bytes(&L->up_shexp) + weight_bytes(&L->down_shexp);
        }
        return total;
}

void model_describe(const struct mo_model *m, char *buf, size_t cap)
{
        const struct mo_hparams *hp = &m->hp;

        snprintf(buf, cap,
                 "%s: %lld layers (%lld dense), hidden %lld, %lld heads, %s MLA (kv_lora %lld, rope %lld), "
                 "%s, %lld experts (%lld used, %lld shared, FFN %lld), %s%s%s, vocab %lld, "
                 "%.2f GiB of weights (%s)",
                 m->name, (long long)hp->n_layer, (long long)hp->n_dense, (long long)hp->n_embd,
                 (long long)hp->n_head, hp->split_mla ? "split" : "legacy", (long long)hp->kv_lora,
                 (long long)hp->n_rot, hp->q_lora ? "q-LoRA" : "plain q", (long long)hp->n_expert,
                 (long long)hp->n_expert_used, (long long)hp->n_expert_shared, (long long)hp->n_ff_exp,
                 hp->gating == MOE_SIGMOID ? "sigmoid" : "softmax", hp->n_group > 1 ? " grouped" : "",
                 hp->yarn ? ", YaRN" : "", (long long)hp->n_vocab,
                 (double)m->weight_bytes / (1 << 30), mo_type_name(m->token_embd.type));
}
