/* test-model: hyperparameters, layouts and validation of engine/model.c.
 * Bad model files are made by rewriting a good fixture with one change
 * (a key dropped or altered, a tensor dropped, reshaped or retyped). */
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

#include "engine/gguf-write.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "kernels/quant.h"
#include "testutil.h"

/* ---- rewriting a GGUF file with one change ---- */

struct change {
        const char *drop_key;
        const char *u32_key;   /* set (or add) this key as u32 */
        uint32_t u32;
        const char *str_key;   /* set this key as a string */
        const char *str;
        const char *drop_tensor;
        const char *tensor;    /* reshape and/or retype this tensor */
        int64_t ne0;           /* new ne0 when non-zero */
        int type;              /* new type when >= 0 */
};

static void copy_kv(struct gguf_writer *w, const struct gguf *g, int64_t i)
{
        const char *key = gguf_key(g, i);
        enum gguf_vtype t = gguf_kv_type(g, i), et;
        uint64_t n;

        if (t == GGUF_STRING) {
                const char *s;
                size_t len;
                char *copy;
                assert_int_equal(gguf_get_str(g, key, &s, &len, NULL), 0);
                copy = strndup(s, len);
                gguf_w_str(w, key, copy);
                free(copy);
        } else if (t == GGUF_ARRAY) {
                assert_int_equal(gguf_get_arr(g, key, &et, &n, NULL), 0);
                if (et == GGUF_STRING) {
                        const char **strs = calloc(n + 1, sizeof *strs);
                        size_t *lens = calloc(n + 1, sizeof *lens);
                        for (uint64_t k = 0; k < n; k++)
                                strs[k] = gguf_arr_str(g, i, k, &lens[k]);
                        gguf_w_arr_str(w, key, strs, lens, n);
                        free(strs);
                        free(lens);
                } else {
                        int32_t *v = calloc(n + 1, sizeof *v);
                        assert_true(et == GGUF_I32 || et == GGUF_U32);
                        for (uint64_t k = 0; k < n; k++)
                                v[k] = (int32_t)gguf_arr_int(g, i, k);
                        gguf_w_arr(w, key, et, v, n);
                        free(v);
                }
        } else if (t == GGUF_U32) {
                uint32_t v;
                assert_int_equal(gguf_get_u32(g, key, &v, NULL), 0);
                gguf_w_u32(w, key, v);
        } else if (t == GGUF_F32) {
                float v;
                assert_int_equal(gguf_get_f32(g, key, &v, NULL), 0);
                gguf_w_f32(w, key, v);
        } else if (t == GGUF_BOOL) {
                bool v;
                assert_int_equal(gguf_get_bool(g, key, &v, NULL), 0);
                gguf_w_bool(w, key, v);
        } else {
                fail_msg("fixture key %s has an unexpected type %d", key, (int)t);
        }
}

static const char *rewrite(const char *src, const char *name, const struct change *c)
{
        struct gguf_writer *w = gguf_writer_new();
        struct moerr e = {0};
        struct gguf *g;
        char *dst = tu_path(name);

        assert_int_equal(gguf_open(src, &g, &e), 0);
        for (int64_t i = 0; i < gguf_n_kv(g); i++) {
                const char *key = gguf_key(g, i);
                if (c->drop_key && strcmp(key, c->drop_key) == 0)
                        continue;
                if (c->u32_key && strcmp(key, c->u32_key) == 0)
                        continue;
                if (c->str_key && strcmp(key, c->str_key) == 0)
                        continue;
                copy_kv(w, g, i);
        }
        if (c->u32_key)
                gguf_w_u32(w, c->u32_key, c->u32);
        if (c->str_key)
                gguf_w_str(w, c->str_key, c->str);
        for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
                const struct gguf_tensor *t = gguf_tensor_at(g, i);
                int64_t ne[4] = { t->ne[0], t->ne[1], t->ne[2], t->ne[3] };
                int type = t->type;
                void *zero;

                if (c->drop_tensor && strcmp(t->name, c->drop_tensor) == 0)
                        continue;
                if (!c->tensor || strcmp(t->name, c->tensor) != 0) {
                        assert_int_equal(gguf_w_tensor(w, t->name, t->type, t->n_dims, t->ne, t->data), 0);
                        continue;
                }
                if (c->ne0)
                        ne[0] = c->ne0;
                if (c->type >= 0)
                        type = c->type;
                zero = calloc(1, mo_row_bytes(type, ne[0]) * ne[1] * ne[2] * ne[3] + 1);
                assert_int_equal(gguf_w_tensor(w, t->name, type, t->n_dims, ne, zero), 0);
                free(zero);
        }
        if (gguf_writer_write(w, dst, &e) < 0)
                fail_msg("%s", e.msg);
        gguf_writer_free(w);
        gguf_close(g);
        return dst;
}

static void expect_refusal(const char *path, const char *needle)
{
        struct mo_model *m = NULL;
        struct moerr e = {0};

        assert_true(model_load(path, &m, &e) < 0);
        assert_null(m);
        if (!strstr(e.msg, needle))
                fail_msg("error '%s' does not mention '%s'", e.msg, needle);
}

/* ---- tests ---- */

static struct mo_model *load(const char *shape)
{
        struct mo_model *m = NULL;
        struct moerr e = {0};

        if (model_load(tu_fixture(shape, MO_TYPE_F32, false), &m, &e) < 0)
                fail_msg("%s: %s", shape, e.msg);
        return m;
}

static void model_reads_every_variant(void **state)
{
        struct mo_model *m;

        (void)state;
        m = load("tiny");
        assert_int_equal(m->hp.n_layer, 3);
        assert_int_equal(m->hp.n_dense, 1);
        assert_int_equal(m->hp.q_lora, 32);
        assert_true(m->hp.split_mla);
        assert_int_equal(m->hp.n_nope, 16);
        assert_int_equal(m->hp.n_v, 16);
        assert_int_equal(m->hp.gating, MOE_SIGMOID);
        assert_int_equal(m->hp.n_group, 4);
        assert_true(m->hp.expert_norm);
        assert_float_equal(m->hp.expert_scale, 2.5f, 1e-6);
        assert_float_equal(m->hp.yarn_log_mul, 1.0f, 1e-5); /* file stores 0.1 x mscale_all_dim */
        assert_non_null(m->layers[1].exp_probs_b);
        assert_non_null(m->layers[1].gate_shexp.data);
        assert_ptr_not_equal(m->output.data, m->token_embd.data);
        model_free(m);

        m = load("tiny-legacy");
        assert_false(m->hp.split_mla);
        assert_int_equal(m->hp.q_lora, 0);
        assert_int_equal(m->hp.n_nope, 16);
        assert_int_equal(m->layers[0].k_b[0].type, MO_TYPE_F32); /* transposed copy */
        assert_int_equal(m->layers[0].k_b[0].nrows, 32);
        model_free(m);

        m = load("tiny-noqlora");
        assert_int_equal(m->hp.q_lora, 0);
        assert_non_null(m->layers[0].attn_q.data);
        model_free(m);

        m = load("tiny-fused");
        assert_true(m->hp.fused_gate_up);
        /* up of expert e starts Fe rows after its gate in the fused tensor */
        assert_ptr_equal((const char *)m->layers[1].up_exps[0].data,
                         (const char *)m->layers[1].gate_exps[0].data + m->hp.n_ff_exp * m->layers[1].gate_exps[0].row_bytes);
        model_free(m);

        m = load("tiny-tied");
        assert_ptr_equal(m->output.data, m->token_embd.data);
        model_free(m);

        m = load("tiny-softmax");
        assert_int_equal(m->hp.gating, MOE_SOFTMAX);
        assert_null(m->layers[1].exp_probs_b);
        assert_false(m->hp.expert_norm);
        model_free(m);

        m = load("tiny-noyarn");
        assert_false(m->hp.yarn);
        assert_float_equal(m->kq_scale, 1.0f / sqrtf(32.0f), 1e-6);
        assert_float_equal(m->rope_freq[1], powf(10000.0f, -2.0f / 16.0f), 1e-7);
        model_free(m);
}

/* The constants DEEPSEEK-REFERENCE.md tabulates for the real models. */
static void model_yarn_matches_published_constants(void **state)
{
        struct mo_hparams hp = {
                .n_rot = 64, .n_nope = 128, .rope_base = 10000.0f, .yarn = true, .yarn_factor = 40.0f,
                .yarn_orig_ctx = 4096, .yarn_beta_fast = 32.0f, .yarn_beta_slow = 1.0f,
        };
        float freq[32], mscale, kq;

        (void)state;
        hp.yarn_log_mul = 1.0f; /* V3 / R1 */
        model_rope_init(&hp, freq, &mscale, &kq);
        assert_float_equal(kq, 0.1352338f, 2e-6);
        assert_float_equal(mscale, 1.0f, 0);
        /* pairs up to lo = 10 keep their frequency, from hi = 23 on divided by 40 */
        for (int i = 0; i <= 10; i++)
                assert_float_equal(freq[i], powf(10000.0f, -2.0f * i / 64), 1e-9);
        for (int i = 23; i < 32; i++)
                assert_float_equal(freq[i], powf(10000.0f, -2.0f * i / 64) / 40, 1e-9);
        assert_true(freq[16] < powf(10000.0f, -32.0f / 64) && freq[16] > powf(10000.0f, -32.0f / 64) / 40);

        hp.yarn_log_mul = 0.707f; /* V2 / V2-Lite */
        model_rope_init(&hp, freq, &mscale, &kq);
        assert_float_equal(kq, 0.1147214f, 2e-6);

        hp.yarn_log_mul = -1.0f; /* YaRN without the log multiplier */
        model_rope_init(&hp, freq, &mscale, &kq);
        assert_float_equal(mscale, 1.0f + 0.1f * logf(40.0f), 1e-6);
        assert_float_equal(kq, mscale * mscale / sqrtf(192.0f), 1e-6);

        hp.yarn = false;
        model_rope_init(&hp, freq, &mscale, &kq);
        assert_float_equal(kq, 0.0721688f, 1e-6);
}

static void model_counts_weight_bytes_per_token(void **state)
{
        struct mo_model *m;
        uint64_t b;

        (void)state;
        m = load("tiny");
        b = model_weight_bytes_per_token(m);
        /* at least the output matrix plus one used expert per MoE layer, and
         * less than the whole file (unused experts are not read) */
        assert_true(b > m->output.row_bytes * m->output.nrows);
        assert_true(b < m->weight_bytes);
        model_free(m);
}

static void model_rejects_bad_files(void **state)
{
        const char *good = tu_fixture("tiny", MO_TYPE_F32, false);

        (void)state;
        expect_refusal(rewrite(good, "arch.gguf", &(struct change){ .str_key = "general.architecture",
                                                                      .str = "llama", .type = -1 }),
                       "architecture 'llama' is not supported");
        expect_refusal(rewrite(good, "nolayers.gguf", &(struct change){ .drop_key = "deepseek2.block_count",
                                                                          .type = -1 }),
                       "deepseek2.block_count");
        expect_refusal(rewrite(good, "used.gguf", &(struct change){ .u32_key = "deepseek2.expert_used_count",
                                                                      .u32 = 9, .type = -1 }),
                       "expert_used_count");
        expect_refusal(rewrite(good, "gating.gguf", &(struct change){ .u32_key = "deepseek2.expert_gating_func",
                                                                        .u32 = 3, .type = -1 }),
                       "expert_gating_func");
        expect_refusal(rewrite(good, "groups.gguf", &(struct change){ .u32_key = "deepseek2.expert_group_count",
                                                                        .u32 = 3, .type = -1 }),
                       "expert_group_count");
        expect_refusal(rewrite(good, "missing.gguf", &(struct change){ .drop_tensor = "blk.1.ffn_down_exps.weight",
                                                                         .type = -1 }),
                       "tensor 'blk.1.ffn_down_exps.weight' is missing");
        expect_refusal(rewrite(good, "shape.gguf", &(struct change){ .tensor = "blk.2.attn_kv_a_mqa.weight",
                                                                       .ne0 = 64, .type = -1 }),
                       "blk.2.attn_kv_a_mqa.weight' has shape");
        expect_refusal(rewrite(good, "type.gguf", &(struct change){ .tensor = "blk.0.attn_output.weight",
                                                                      .type = MO_TYPE_Q4_1 }),
                       "cannot compute");
        expect_refusal(rewrite(good, "rope.gguf", &(struct change){ .str_key = "deepseek2.rope.scaling.type",
                                                                      .str = "longrope", .type = -1 }),
                       "rope scaling 'longrope'");
        expect_refusal(rewrite(good, "tok.gguf", &(struct change){ .str_key = "tokenizer.ggml.model",
                                                                     .str = "llama", .type = -1 }),
                       "tokenizer");
}

static void model_rejects_missing_and_foreign_files(void **state)
{
        char *path = tu_path("not-gguf.bin");
        FILE *f = fopen(path, "w");

        (void)state;
        fputs("this is not a model\n", f);
        fclose(f);
        expect_refusal(path, "not-gguf.bin");
        expect_refusal(tu_path("does-not-exist.gguf"), "does-not-exist.gguf");
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(model_reads_every_variant),
                cmocka_unit_test(model_yarn_matches_published_constants),
                cmocka_unit_test(model_counts_weight_bytes_per_token),
                cmocka_unit_test(model_rejects_bad_files),
                cmocka_unit_test(model_rejects_missing_and_foreign_files),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
